"""A forker has only the repository: every file it names by path (config/, bench/, scripts/, prepare/, tests/,
docs/, and any *.md) is in it, and nothing points outside it (the design notes it was built from).
An upstream file is cited as owner/repo:path, which the check leaves alone."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_PATH = re.compile(r"(?<![\w/.:-])((?:config|bench|scripts|prepare|tests|docs)/[\w./-]*\w\.(?:py|md|json))")
OUTSIDE = ".." + "/shared"  # spelled in two pieces so this file does not name it
MARKDOWN = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = out.stdout.split() if out.returncode == 0 else [
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) if "/." not in d and "/out" not in d for f in fs]
    return [n for n in names if n.endswith((".py", ".md", ".txt", ".json", ".yaml", ".cfg")) or n == ".ci/run"]


def test_no_file_refers_to_a_file_outside_the_repository():
    files = tracked_text_files()
    present = set(files) | {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs}
    basenames = {os.path.basename(f) for f in present}
    missing = []
    for name in files:
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if OUTSIDE in line:
                    missing.append(f"{name}:{n}: {OUTSIDE}")
                for path in OWN_PATH.findall(line):
                    if path not in present and not any(ch in path for ch in "*{<"):
                        missing.append(f"{name}:{n}: {path}")
                for md in MARKDOWN.findall(line):
                    if md not in basenames:
                        missing.append(f"{name}:{n}: {md}")
    assert not missing, "references to files the repository does not have:\n" + "\n".join(missing)


def test_the_check_finds_a_missing_file(tmp_path):
    missing = "NOTES" + ".md"  # built here so the repository itself never names it
    line = f"see {missing} and config/nowhere" + ".py, but README.md and config/libero_eval.py exist"
    assert MARKDOWN.findall(line) == [missing, "README.md"]
    assert OWN_PATH.findall(line) == ["config/nowhere" + ".py", "config/libero_eval.py"]

"""bench/libero_cpu.py: the Wilson interval by hand, and the whole wiring (every stage, three backbones) in its
dry mode: synthetic data, one or two steps per stage, no simulator; a second run skips every finished stage."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import libero_cpu  # noqa: E402


def test_wilson_interval_by_hand():
    # p = 0.5, n = 20, z = 1.96: centre 0.5, half-width 1.96 sqrt(0.25/20 + 1.96^2/1600) / (1 + 1.96^2/20) = 0.2007
    lo, hi = libero_cpu.wilson(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-4) and hi == pytest.approx(0.7007, abs=1e-4)
    assert libero_cpu.wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)  # never 0 wide at 0 successes
    assert libero_cpu.wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_dry_run_wires_every_stage_and_resumes(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "libero_cpu.py"), "--dry=True", f"--out={out}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "libero_cpu.json").read_text())
    assert set(result["stage_seconds"]) == {"demos", "sft", "align_rl", "vla SFT-only", "vla RoboAlign", "vla untrained"}
    assert result["results"] == {"SFT-only": None, "RoboAlign": None, "untrained": None}  # no simulator in dry mode
    for name in ("sft", "align_rl", "untrained"):
        assert (out / name / "config.json").is_file()
    for name in ("vla_sft_only", "vla_roboalign", "vla_untrained"):
        meta = json.loads((out / name / "vla.json").read_text())
        assert meta["image_size"] == 56 and meta["head"]["horizon"] == 8
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 6
    assert json.loads((out / "libero_cpu.json").read_text())["stage_seconds"] == {}

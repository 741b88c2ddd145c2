"""The whole RoboAlign recipe on the embedded default, on a laptop CPU, and the comparison that matters:

    prepare/synthetic.py (data) -> sft.py -> align_rl.py -> train_vla.py on the SFT-only backbone  (the baseline)
                                              -> train_vla.py on the aligned backbone   (RoboAlign)
    -> offline evaluation on held-out demonstrations -> a short real-LIBERO episode if LIBERO is installed
    -> one summary table, also written to out/summary.json

Both VLAs use the same seed, data and budget, so the only difference is the backbone (the paper's claim, arXiv 2603.21341).
Each stage is its own script with its own defaults; this file only runs them in order and reads their
metrics.jsonl. Extra --key=value arguments are passed to every stage that knows the key is not checked
here, so prefer running the stages by hand to change them.

    python scripts/embedded_default.py            # everything, about 11 min on 2 cores
    python scripts/embedded_default.py --skip_done  # reuse stages whose checkpoint already exists
    python scripts/embedded_default.py --overwrite  # run every stage again over the earlier runs
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(stage, args, out_dir, skip_done):
    if skip_done and os.path.isdir(os.path.join(ROOT, out_dir)) and os.path.exists(os.path.join(ROOT, out_dir, "run_config.json")):
        print(f"== {stage} {' '.join(args)}: {out_dir} exists, skipped (--skip_done)")
        return 0.0
    cmd = [sys.executable, stage, *args]
    print(f"\n== {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def read_metrics(out_dir):
    path = os.path.join(ROOT, out_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last(metrics, key):
    values = [m[key] for m in metrics if key in m]
    return values[-1] if values else None


def first(metrics, key):
    values = [m[key] for m in metrics if key in m]
    return values[0] if values else None


def fmt(x):
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


# config (nanoGPT style, as the stages: --key=value)
skip_done = False  # skip a stage whose out dir already holds a checkpoint
overwrite = False  # run every stage again over its earlier run (each stage refuses an out dir that holds a run otherwise)
seed = 0


def main():
    sys.path.insert(0, ROOT)
    from data import configure
    args = configure({k: v for k, v in globals().items() if k in ("skip_done", "overwrite", "seed")})
    seed = [f"--seed={args['seed']}"] + (["--overwrite"] if args["overwrite"] else [])
    times = {}
    times["data"] = run("prepare/synthetic.py", [], "", False)  # reuses out/data when it is already this dataset
    times["sft"] = run("sft.py", seed, "out/sft", args["skip_done"])
    times["align_rl"] = run("align_rl.py", seed, "out/align_rl", args["skip_done"])
    times["vla_sft"] = run("train_vla.py", [*seed, "--init_from=out/sft", "--out_dir=out/vla_sft"], "out/vla_sft", args["skip_done"])
    times["vla"] = run("train_vla.py", [*seed, "--init_from=out/align_rl", "--out_dir=out/vla"], "out/vla", args["skip_done"])

    libero = None
    if importlib.util.find_spec("libero") is not None:
        times["eval_libero"] = run("eval_libero.py", ["--checkpoint=out/vla", "--suites=libero_spatial", "--task_ids=0",
                                                      "--trials=1", "--max_steps=20", "--num_envs=1"], "", False)
        with open(os.path.join(ROOT, "out", "eval_libero", "results.json")) as f:
            libero = json.load(f)
    else:
        print("\nLIBERO not installed: skipping the real-simulator episode (see eval_libero.py for how to install it)")

    sft, rl = read_metrics("out/sft"), read_metrics("out/align_rl")
    vla_sft, vla_rl = read_metrics("out/vla_sft"), read_metrics("out/vla")
    rows = [
        ("SFT: held-out greedy action prefix match", last(sft, "action_prefix"), None),
        ("RL reward on held-out prompts (format + action) / 2", first(rl, "eval_reward"), last(rl, "eval_reward")),
        ("RL action reward (prefix match) on held-out prompts", first(rl, "eval_reward_action"), last(rl, "eval_reward_action")),
        ("VLA held-out action MSE (normalized), whole chunk", last(vla_sft, "val_action_mse"), last(vla_rl, "val_action_mse")),
        ("VLA held-out action MSE, first action", last(vla_sft, "val_action_mse_first"), last(vla_rl, "val_action_mse_first")),
        ("  floor: always predict the mean chunk", first(vla_sft, "val_mse_mean_action"), first(vla_rl, "val_mse_mean_action")),
    ]
    print("\nRoboAlign on the embedded default (synthetic tabletop, tiny Qwen2.5-VL; not a benchmark)")
    print(f"{'':<56}{'SFT-only':>12}{'RoboAlign':>12}")
    for name, a, b in rows:
        print(f"{name:<56}{fmt(a):>12}{fmt(b):>12}")
    print("(RL rows: SFT-only = before GRPO, RoboAlign = after GRPO)")
    if libero is not None:
        t = libero.get("timing", {})
        print(f"LIBERO smoke episode (libero_spatial task 0, 1 trial, 20 steps, the synthetic-data VLA so 0 is expected): "
              f"success rate {libero['average_success_rate']}, {t.get('env_steps')} env steps at {t.get('env_step_s', 0):.2f} s")
    print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    summary = dict(rows=[dict(metric=n, sft_only=a, roboalign=b) for n, a, b in rows], libero_smoke=libero,
                   stage_seconds=times, seed=args["seed"])
    with open(os.path.join(ROOT, "out", "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("wrote out/summary.json")


if __name__ == "__main__":
    main()

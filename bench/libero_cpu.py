"""The whole RoboAlign recipe in the real LIBERO simulator, on CPU, from scripted demonstrations:

    prepare/libero_expert.py (demos from seeded resets) -> sft.py -> align_rl.py
    -> train_vla.py on (a) the SFT-only backbone, (b) the RoboAlign backbone, (c) the untrained backbone
    -> eval_libero.py closed loop on the task's benchmark init states (disjoint from the demos' resets)
    -> success rates with 95% Wilson intervals side by side, and <out>/libero_cpu.json

Every stage is its own script run as a subprocess with its output directory under <out>; a stage whose output
is complete is skipped, so the bench runs across sittings (stop it any time, run it again).

    python bench/libero_cpu.py                                  # libero_object task 0
    python bench/libero_cpu.py --tasks=0,1,2 --out=out/libero_cpu_3
    python bench/libero_cpu.py --dry=True --out=/tmp/dry         # the wiring in seconds: synthetic data, 1-2 steps
                                                                # per stage, no simulator

Needs LIBERO (eval_libero.py's install lines) except in dry mode. The choices below (image size, chunk length,
execution horizon, head size, steps) are this bench's, for a tiny backbone trained from scratch on CPU.
What they rest on (libero_object task 0, 20 benchmark init states, 2 CPU cores; docs/libero_cpu.md):
  - demonstrations that cover the states the policy meets: the expert's arm start gets the benchmark's own
    joint spread (std 0.02 rad) and its executed actions DART noise (std 0.3, clean labels). From 50 noise-free
    demos (every grasp at the same point) the VLAs replayed one path and grasped 1-2 cm off: 0/20 and 1/20.
  - 50 demos recorded at 128 px, fed at 56 px (4 tokens per camera on the tiny backbone); chunk 8, execute 4;
    head 128 wide x 4 deep; SFT 1500 steps, GRPO 20, VLA 3000. With these: SFT-only 12/20, RoboAlign 12/20,
    untrained backbone 5/20, in 39 min of compute per task (demos 12 min with 2 workers, sft 9.5, align_rl 1,
    train_vla 5.5 each) plus 9-10 min of evaluation per backbone.
"""

import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import configure  # noqa: E402

# -----------------------------------------------------------------------------
# config (nanoGPT style: --key=value)
suite = "libero_object"
tasks = "0"  # comma-separated task ids of the suite
demos_per_task = 50
image_size = 56  # every stage feeds the backbone this size (resize_with_pad)
demo_workers = 2  # simulators recording demonstrations at once (the file does not depend on it)
record_size = 128  # the demos' camera size: eval_libero renders 256 and resizes to image_size; 128 resized alike
trials = 20  # evaluation episodes per task: benchmark init states 0 .. trials-1
action_horizon = 8  # FAST chunk and action-head horizon
replan_steps = 4  # actions executed per prediction in closed loop
sft_iters = 1500
rl_iters = 20
vla_iters = 3000
head_width = 128
head_depth = 4
out = "out/libero_cpu"
dry = False  # the wiring only: synthetic data, one or two steps per stage, no simulator
# -----------------------------------------------------------------------------


def wilson(successes, n, z=1.96):
    """95% Wilson score interval of a success rate (better than the normal one at small n or rates near 0 / 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def run(script, args, done_file, times, name):
    """Run a stage unless its output is complete (done_file exists); record its wall time."""
    if done_file and os.path.exists(done_file):
        print(f"== {name}: {done_file} exists, skipped")
        return
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    times[name] = round(time.time() - t0, 1)


def untrained_backbone(path, fast_vocab_size, seed=0):
    """The untrained baseline: the tiny backbone sft.py starts from (its default sizes), saved without training."""
    import sft
    from model import Backbone
    if not os.path.isfile(os.path.join(path, "config.json")):
        Backbone.tiny(fast_vocab_size=fast_vocab_size, seed=seed, hidden_size=sft.n_embd, num_layers=sft.n_layer,
                      num_heads=sft.n_head, vision_depth=sft.vision_depth, vision_hidden_size=sft.vision_embd,
                      image_size=image_size).save_pretrained(path)


def main():
    cfg = configure({k: v for k, v in globals().items() if k in (
        "suite", "tasks", "demos_per_task", "demo_workers", "image_size", "record_size", "trials", "action_horizon",
        "replan_steps", "sft_iters", "rl_iters", "vla_iters", "head_width", "head_depth", "out", "dry")})
    o = lambda *p: os.path.join(cfg["out"], *p)
    os.makedirs(cfg["out"], exist_ok=True)
    times = {}
    steps = dict(sft=2, rl=1, vla=2) if cfg["dry"] else dict(sft=cfg["sft_iters"], rl=cfg["rl_iters"], vla=cfg["vla_iters"])

    # ---- demonstrations: the scripted expert in the simulator (dry: the synthetic toy, LIBERO's layout too) ----
    if cfg["dry"]:
        run("prepare/synthetic.py", [f"--out_dir={o('data')}", "--demos_per_task=1", "--val_demos_per_task=1",
                                     "--qa_per_demo=0", f"--image_size={cfg['image_size']}"], o("data", "dataset.json"), times, "demos")
        demos, flip = o("data", "libero", "train"), "False"
    else:
        run("prepare/libero_expert.py", [f"--suite={cfg['suite']}", f"--tasks={cfg['tasks']}",
                                         f"--demos_per_task={cfg['demos_per_task']}", f"--image_size={cfg['record_size']}",
                                         f"--workers={cfg['demo_workers']}", f"--out_dir={o('demos')}"],
            o("demos", "expert_stats.json"), times, "demos")
        demos, flip = o("demos"), "True"  # recorded as robosuite renders, upside down, as LIBERO's own files
    robot = [f"--data_dir={cfg['out']}", f"--robot_train={demos}", "--robot_val=", f"--flip_images={flip}",
             f"--image_size={cfg['image_size']}", "--seed=0"]

    # ---- stage 1: SFT on action tokens and think-then-act (the expert's sub-goal is the thought) ----
    run("sft.py", [*robot, f"--out_dir={o('sft')}", "--vqa_train=", "--vqa_val=", "--reasoning_train=", "--reasoning_val=",
                   "--vqa_weight=0.0", "--reasoning_weight=0.0", "--action_weight=0.7", "--think_action_weight=0.3",
                   f"--action_horizon={cfg['action_horizon']}", f"--max_iters={steps['sft']}", "--eval_interval=0",
                   f"--save_interval={steps['sft']}"], o("sft", "run_config.json"), times, "sft")
    # ---- stage 2: GRPO ----
    run("align_rl.py", [*robot, f"--init_from={o('sft')}", f"--out_dir={o('align_rl')}", "--num_eval_prompts=0",
                        f"--max_iters={steps['rl']}", f"--save_interval={steps['rl']}"], o("align_rl", "run_config.json"),
        times, "align_rl")
    # ---- stage 3: the same VLA recipe on three backbones ----
    with open(o("sft", "fast_tokenizer.json")) as f:
        untrained_backbone(o("untrained"), json.load(f)["vocab_size"])
    backbones = {"SFT-only": o("sft"), "RoboAlign": o("align_rl"), "untrained": o("untrained")}
    for name, path in backbones.items():
        vla_dir = o("vla_" + name.lower().replace("-", "_"))
        run("train_vla.py", [*robot, f"--init_from={path}", f"--out_dir={vla_dir}", f"--action_horizon={cfg['action_horizon']}",
                             f"--head_width={cfg['head_width']}", f"--head_depth={cfg['head_depth']}",
                             f"--max_iters={steps['vla']}", f"--eval_interval={steps['vla']}", f"--save_interval={steps['vla']}",
                             f"--cache_dir={o('feature_cache')}"], os.path.join(vla_dir, "run_config.json"), times, "vla " + name)

    # ---- closed loop on the benchmark init states ----
    rows = {}
    for name in backbones:
        vla_dir = o("vla_" + name.lower().replace("-", "_"))
        eval_dir = vla_dir + "_eval"
        if not cfg["dry"]:
            run("eval_libero.py", [f"--checkpoint={vla_dir}", f"--suites={cfg['suite']}", f"--task_ids={cfg['tasks']}",
                                   f"--trials={cfg['trials']}", f"--replan_steps={cfg['replan_steps']}", "--num_envs=2",
                                   "--batch_size=2", f"--out_dir={eval_dir}"], os.path.join(eval_dir, "results.json"),
                times, "eval " + name)
        results = os.path.join(eval_dir, "results.json")
        if os.path.isfile(results):
            with open(results) as f:
                suite_result = json.load(f)["suites"][cfg["suite"]]
            k, n = suite_result["successes"], suite_result["episodes"]
            rows[name] = dict(successes=k, episodes=n, rate=k / n, wilson95=wilson(k, n),
                              tasks={t: v["successes"] / v["trials"] for t, v in suite_result["tasks"].items()})
        else:
            rows[name] = None

    print(f"\nLIBERO {cfg['suite']} tasks {cfg['tasks']}: closed-loop success over {cfg['trials']} benchmark init states per task"
          + (" (dry run: no simulator)" if cfg["dry"] else ""))
    print(f"{'backbone':<12}{'success':>10}{'rate':>8}   95% Wilson interval")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<12}{'-':>10}{'-':>8}   -")
        else:
            lo, hi = r["wilson95"]
            print(f"{name:<12}{r['successes']:>6} / {r['episodes']:<3}{100 * r['rate']:>6.1f}%   [{100 * lo:.1f}%, {100 * hi:.1f}%]")
    print("stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    with open(o("libero_cpu.json"), "w") as f:
        json.dump(dict(config=cfg, results=rows, stage_seconds=times), f, indent=1)
    print(f"wrote {o('libero_cpu.json')}")


if __name__ == "__main__":
    main()

"""GRPO step time of align_rl.py, split into generation / log-probs / update, and (--compare_trl) the same
workload under TRL's GRPOTrainer. Prints one table; the last line is `ratio_vs_trl: X` (TRL's s/step / ours).

    python bench/grpo_throughput.py                     # align_rl.py alone
    python bench/grpo_throughput.py --compare_trl       # needs TRL, installed for this bench only:
        pip install "trl==0.24.0" "torch==2.13.0"        # (keeps the CPU torch; never in requirements.txt)

The workload (the issue's): the tiny vision-language backbone (Backbone.tiny, ~4.5M parameters), prompts of two
56x56 images + the RL instruction from the embedded synthetic data, G = 8, 64 new tokens (the random model never
ends early, so every completion has 64), temperature 0.7, one optimizer step per rollout (TRL: num_iterations 1),
beta 0, the same prompts per optimizer step. align_rl.py runs as its own process exactly as a user runs it, and
its per-step timings are read from metrics.jsonl (time_generate / time_logprob / time_update); TRL's are taken
with a callback and by timing its generation and log-prob calls. The first step of each is a warm-up and not
counted. Both run single-process with the same number of threads.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from data import LiberoDataset, NormStats, chunk_at, make_synthetic_dataset  # noqa: E402
from model import Backbone, FastTokenizer  # noqa: E402

BACKBONE = dict(hidden_size=192, num_layers=4, num_heads=4, vision_depth=2, vision_hidden_size=256)  # sft.py's tiny sizes


def prepare(work, horizon=8, fast_vocab_size=16):
    """A stage-1-like checkpoint (random tiny backbone + FAST tokenizer + norm stats) and the synthetic data."""
    data_dir, ckpt = os.path.join(work, "data"), os.path.join(work, "ckpt")
    if not os.path.isdir(data_dir):
        make_synthetic_dataset(data_dir, seed=0, demos_per_task=2, val_demos_per_task=1, qa_per_demo=0)
    if not os.path.isfile(os.path.join(ckpt, "fast_tokenizer.json")):
        ds = LiberoDataset(os.path.join(data_dir, "libero", "train"), horizon=horizon)
        stats = NormStats.compute(ds.all_actions(), ds.all_states())
        chunks = np.stack([chunk_at(ep["actions"], t, horizon)[0] for ep in ds.episodes for t in range(len(ep["actions"]))])
        fast = FastTokenizer.fit(stats.normalize_actions(chunks), vocab_size=fast_vocab_size, scale=1.0)
        Backbone.tiny(fast_vocab_size=fast_vocab_size, seed=0, **BACKBONE).save_pretrained(ckpt)
        fast.save(os.path.join(ckpt, "fast_tokenizer.json"))
        stats.save(os.path.join(ckpt, "norm_stats.json"))
    return data_dir, ckpt


def ours(work, data_dir, ckpt, prompts, group_size, new_tokens, temperature, steps, threads):
    """align_rl.py as a subprocess; the mean per-step timings after the first step."""
    out = os.path.join(work, "align_rl")
    n = prompts * group_size
    argv = [sys.executable, os.path.join(ROOT, "align_rl.py"), f"--init_from={ckpt}", f"--data_dir={data_dir}", f"--out_dir={out}",
            f"--group_size={group_size}", f"--max_new_tokens={new_tokens}", f"--temperature={temperature}",
            f"--rollout_batch={prompts}", f"--update_batch={prompts}", f"--generation_batch={prompts}",
            f"--micro_batch_size={n}", f"--max_iters={steps + 1}", "--num_eval_prompts=0", f"--save_interval={10 ** 9}",
            "--num_prompts=64", "--lr=1e-6"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if '"time_generate"' in line][1:]
    split = {k: float(np.mean([m[f"time_{k}"] for m in lines])) for k in ("generate", "logprob", "update")}
    return dict(s_per_step=sum(split.values()), **split, response_len=float(np.mean([m["response_len"] for m in lines])))


def trl(work, data_dir, ckpt, prompts, group_size, new_tokens, temperature, steps):
    """TRL's GRPOTrainer on the same checkpoint, prompts and settings (see the module docstring)."""
    raise NotImplementedError


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step (= per rollout)")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare_trl", action="store_true")
    p.add_argument("--work", default="out/bench/grpo_throughput")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    data_dir, ckpt = prepare(args.work)
    common = (args.work, data_dir, ckpt, args.prompts, args.group_size, args.new_tokens, args.temperature, args.steps)
    rows = {"align_rl.py": ours(*common, args.threads)}
    if args.compare_trl:
        rows["TRL GRPOTrainer"] = trl(*common)
    print(f"GRPO step, tiny VL backbone: {args.prompts} prompts x G={args.group_size} (two 56x56 images each), "
          f"{args.new_tokens} new tokens, T {args.temperature}, {args.threads} CPU threads, mean of {args.steps} steps")
    print(f"{'':<18}{'s/step':>8}{'generate':>10}{'log-probs':>11}{'update':>8}")
    for name, r in rows.items():
        print(f"{name:<18}{r['s_per_step']:>8.2f}{r['generate']:>10.2f}{r['logprob']:>11.2f}{r['update']:>8.2f}")
    with open(os.path.join(args.work, "result.json"), "w") as f:
        json.dump(dict(rows=rows, config=vars(args)), f, indent=1)
    if args.compare_trl:
        print(f"ratio_vs_trl: {rows['TRL GRPOTrainer']['s_per_step'] / rows['align_rl.py']['s_per_step']:.2f}")


if __name__ == "__main__":
    main()

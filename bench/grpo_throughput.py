"""GRPO step time of align_rl.py, split into generation / log-probs / update, and (--compare_trl) the same
workload under TRL's GRPOTrainer. Prints one table; the last line is `ratio_vs_trl: X` (TRL's s/step / ours).

    python bench/grpo_throughput.py                     # align_rl.py alone
    python bench/grpo_throughput.py --compare_trl [--text_only]   # needs TRL, installed for this bench only:
        pip install "trl==1.16.0" "torch==2.13.0"        # (keeps the CPU torch; never in requirements.txt)

The workload (the issue's): the tiny vision-language backbone (Backbone.tiny, ~4.5M parameters), prompts of two
56x56 images + the RL instruction from the embedded synthetic data, G = 8, 64 new tokens (the random model never
ends early, so every completion has 64), temperature 0.7, one optimizer step per rollout (TRL: num_iterations 1),
beta 0, the same prompts per optimizer step. align_rl.py runs as its own process exactly as a user runs it, and
its per-step timings are read from metrics.jsonl (time_generate / time_logprob / time_update); TRL's are taken
with a callback and by timing its generation and log-prob calls ("log-probs" is then its training forward, and
"update" the rest: backward, optimizer, prompt processing; align_rl.py's "log-probs" is only the extra no-grad
forwards, none with one step per rollout). The first step of each is a warm-up and not counted. Both run
single-process with the same number of threads; run it on an idle machine.
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
from data import LiberoDataset, NormStats, chunk_at  # noqa: E402
from prepare.synthetic import make_synthetic_dataset  # noqa: E402
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


def ours(work, data_dir, ckpt, prompts, group_size, new_tokens, temperature, steps, text_only=False, threads=2):
    """align_rl.py as a subprocess; the mean per-step timings after the first step."""
    out = os.path.join(work, "align_rl")
    n = prompts * group_size
    argv = [sys.executable, os.path.join(ROOT, "align_rl.py"), f"--init_from={ckpt}", f"--data_dir={data_dir}", f"--out_dir={out}",
            f"--group_size={group_size}", f"--max_new_tokens={new_tokens}", f"--temperature={temperature}",
            f"--rollout_batch={prompts}", f"--update_batch={prompts}", f"--generation_batch={prompts}",
            f"--micro_batch_size={n}", f"--max_iters={steps + 1}", "--num_eval_prompts=0", f"--save_interval={10 ** 9}",
            "--num_prompts=64", "--lr=1e-6", "--overwrite", f"--prompt_images={not text_only}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if '"time_generate"' in line][1:]
    split = {k: float(np.mean([m[f"time_{k}"] for m in lines])) for k in ("generate", "logprob", "update")}
    return dict(s_per_step=sum(split.values()), **split, response_len=float(np.mean([m["response_len"] for m in lines])))


def rl_prompts(data_dir, prompts, steps, num_prompts=64, seed=0):
    """The prompts align_rl.py uses in its first steps (its seeded RL subset, its per-step order): (images, text)."""
    train_set = LiberoDataset(os.path.join(data_dir, "libero", "train"), horizon=8)
    prompt_ids = np.sort(np.random.default_rng(seed).permutation(len(train_set))[:num_prompts]).tolist()
    order = [prompt_ids[i] for step in range(steps) for i in data.global_batch_indices(step, len(prompt_ids), prompts, seed)]
    samples = [train_set[i] for i in order]
    return [s["images"] for s in samples], [data.REASONING_ACTION_PROMPT.format(instruction=s["instruction"]) for s in samples]


def trl(work, data_dir, ckpt, prompts, group_size, new_tokens, temperature, steps, text_only=False):
    """TRL's GRPOTrainer on the same checkpoint, prompts (with their images) and settings: one optimizer step =
    one generate call for prompts x G completions, one clipped-ratio forward / backward, one AdamW step (lr 1e-6,
    betas (0.9, 0.99), clip 1.0, as align_rl.py's tiny default), beta 0, num_iterations 1 (TRL then skips the
    old-log-prob forward, as align_rl.py does), fp32, KV-cached generation, vision blocks frozen. Timed with a
    callback per step; generation and log-prob calls wrapped with timers; update = backward + optimizer."""
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    images, texts = rl_prompts(data_dir, prompts, steps + 1)
    backbone = Backbone.from_pretrained(ckpt, dtype=torch.float32)
    backbone.freeze_vision_blocks()
    rows = [{"prompt": [{"role": "user", "content": t}]} | ({} if text_only else {"images": [Image.fromarray(im) for im in ims]})
            for ims, t in zip(images, texts)]
    rng = np.random.default_rng(0)
    n = prompts * group_size
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_", dir=work), use_cpu=True, bf16=False, fp16=False, seed=0,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=group_size,
        max_completion_length=new_tokens, temperature=temperature, top_p=1.0, top_k=0, generation_kwargs={"use_cache": True},
        beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group", epsilon=0.2, use_vllm=False,
        gradient_checkpointing=False, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, optim="adamw_torch", max_steps=steps + 1, shuffle_dataset=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0)
    times = {k: [] for k in ("step", "generate", "logprob", "update")}
    clock = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            for v in times.values():
                v.append(0.0)
            clock["begin"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times["step"][-1] = now - clock["begin"]
            times["update"][-1] += now - clock["after_update"]  # clipping, optimizer step, zero_grad

    trainer = GRPOTrainer(model=backbone.model, reward_funcs=lambda completions, **k: rng.random(len(completions)).tolist(),
                          args=args, train_dataset=Dataset.from_list(rows), processing_class=backbone.processor,
                          callbacks=[StepTimer()])

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            clock["after_" + key] = time.perf_counter()
            times[key][-1] += clock["after_" + key] - t0
            return out
        return wrapper

    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timed("logprob", trainer._get_per_token_logps_and_entropies)
    trainer.accelerator.backward = timed("update", trainer.accelerator.backward)
    trainer.train()
    mean = {k: float(np.mean(v[1:])) for k, v in times.items()}  # the first step is a warm-up
    # TRL's log-prob call is its training forward; its backward is timed apart
    return dict(s_per_step=mean["step"], generate=mean["generate"], logprob=mean["logprob"],
                update=mean["step"] - mean["generate"] - mean["logprob"], response_len=float(new_tokens))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step (= per rollout)")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare_trl", action="store_true")
    p.add_argument("--text_only", action="store_true", help="prompts without their images (align_rl --prompt_images=False)")
    p.add_argument("--work", default="out/bench/grpo_throughput")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    data_dir, ckpt = prepare(args.work)
    common = (args.work, data_dir, ckpt, args.prompts, args.group_size, args.new_tokens, args.temperature, args.steps)
    rows = {"align_rl.py": ours(*common, text_only=args.text_only, threads=args.threads)}
    if args.compare_trl:
        rows["TRL GRPOTrainer"] = trl(*common, text_only=args.text_only)
    what = "text only" if args.text_only else "two 56x56 images each"
    print(f"GRPO step, tiny VL backbone: {args.prompts} prompts x G={args.group_size} ({what}), "
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

"""GRPO step throughput of align_rl.py's pieces: rollouts/s of KV-cached batched generation (Backbone.generate)
vs a naive loop that re-runs the whole sequence for every new token, and update tokens/s of the GRPO loss
forward + backward + AdamW step, for the tiny and a ~100M config. TRL is not a dependency; when it is
installed, compare against its GRPOTrainer separately (not done here). Prints one table, writes json.

    python bench/grpo_throughput.py [--configs=tiny,100m] [--prompts=4] [--group_size=5] [--new_tokens=32]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from align_rl import completion_mask, group_advantages, grpo_loss  # noqa: E402
from data import REASONING_ACTION_PROMPT  # noqa: E402
from model import Backbone  # noqa: E402

CONFIGS = {"tiny": dict(hidden_size=192, num_layers=4, num_heads=4, vision_depth=2, vision_hidden_size=256),
           "100m": dict(hidden_size=768, num_layers=12, num_heads=12, vision_depth=4, vision_hidden_size=256)}


@torch.no_grad()
def naive_generate(backbone, inputs, new_tokens):
    """Sampling without a KV cache: one full forward over prompt + completion so far per new token."""
    x = backbone._model_inputs(inputs)
    out = []
    for _ in range(new_tokens):
        logits = backbone.model(**x, use_cache=False).logits[:, -1].float()
        logits[:, backbone.image_token_ids] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        out.append(nxt)
        x["input_ids"] = torch.cat([x["input_ids"], nxt], 1)
        x["attention_mask"] = torch.cat([x["attention_mask"], torch.ones_like(nxt)], 1)
        x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return torch.cat(out, 1)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,100m")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group_size", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--out", default="out/bench/grpo_throughput.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        backbone = Backbone.tiny(fast_vocab_size=256, **CONFIGS[name])
        n = args.prompts * args.group_size
        images = [[rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(2)] for _ in range(n)]
        prompts = [REASONING_ACTION_PROMPT.format(instruction="put the red block on the blue block")] * n
        inputs = backbone.build_inputs(images, prompts)
        backbone.model.eval()
        # force the full length: no early stop at <|im_end|> (a random model may emit it)
        eos = backbone.eos_id
        backbone.eos_id = -1
        cached, t_cached = timed(lambda: backbone.generate(inputs, max_new_tokens=args.new_tokens, do_sample=True))
        backbone.eos_id = eos
        _, t_naive = timed(lambda: naive_generate(backbone, inputs, args.new_tokens))
        # one GRPO update on the cached rollouts (align_rl.py's loss, advantages and masks)
        completions = cached
        mask = completion_mask(completions, backbone.eos_id)
        P = inputs["input_ids"].shape[1]
        full = dict(backbone._model_inputs(inputs))
        full["input_ids"] = torch.cat([full["input_ids"], completions], 1)
        full["attention_mask"] = torch.cat([full["attention_mask"], mask], 1)
        full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(completions)], 1)
        backbone.model.train()
        opt = torch.optim.AdamW([q for q in backbone.model.parameters() if q.requires_grad], lr=1e-6)
        adv = group_advantages(torch.rand(args.prompts, args.group_size)).reshape(-1)

        def update():
            logits = backbone.model(**full, use_cache=False).logits[:, P - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, completions[..., None])[..., 0]
            loss, _ = grpo_loss(logp, logp.detach(), adv, mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        _, t_update = timed(update)
        tokens = int(full["attention_mask"].sum())
        rows.append(dict(config=name, params_m=round(sum(q.numel() for q in backbone.parameters()) / 1e6, 1), sequences=n,
                         rollouts_per_s_cached=round(n / t_cached, 2), rollouts_per_s_naive=round(n / t_naive, 2),
                         kv_cache_speedup=round(t_naive / t_cached, 2), update_tokens_per_s=round(tokens / t_update)))
    print(f"GRPO throughput ({args.prompts} prompts x G={args.group_size}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} CPU threads)")
    print(f"{'config':<8}{'params':>8}{'rollouts/s KV':>15}{'naive':>8}{'speed-up':>10}{'update tok/s':>14}")
    for r in rows:
        print(f"{r['config']:<8}{r['params_m']:>7}M{r['rollouts_per_s_cached']:>15}{r['rollouts_per_s_naive']:>8}"
              f"{r['kv_cache_speedup']:>9}x{r['update_tokens_per_s']:>14}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, config=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()

"""SFT step throughput: tokens/s and achieved FLOP/s of one training step (forward + backward + AdamW) as a
fraction of this machine's measured matmul peak (torch.mm, same dtype), for the tiny and a ~100M config.
FLOPs are counted the usual way, 6 x (trained language-model parameters) x tokens, so vision and attention
score FLOPs are left out (an underestimate). Prints one table, writes out/bench/sft_throughput.json.

    python bench/sft_throughput.py [--configs=tiny,100m] [--batch_size=16] [--steps=5]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ACTION_PROMPT  # noqa: E402
from model import Backbone  # noqa: E402

CONFIGS = {"tiny": dict(hidden_size=192, num_layers=4, num_heads=4, vision_depth=2, vision_hidden_size=256),
           "100m": dict(hidden_size=768, num_layers=12, num_heads=12, vision_depth=4, vision_hidden_size=256)}


def matmul_peak(dtype, n=2048, repeats=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,100m")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="out/bench/sft_throughput.json")
    args = p.parse_args()
    peak = matmul_peak(torch.float32)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        backbone = Backbone.tiny(fast_vocab_size=256, **CONFIGS[name])
        for n, p_ in backbone.model.model.visual.named_parameters():
            p_.requires_grad_(n.startswith("merger."))
        backbone.model.train()
        images = [[rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(2)] for _ in range(args.batch_size)]
        prompts = [ACTION_PROMPT.format(instruction="put the red block on the blue block")] * args.batch_size
        responses = [backbone.action_text(rng.integers(0, 256, 20)) for _ in range(args.batch_size)]
        inputs = backbone.build_inputs(images, prompts, responses)
        params = [q for q in backbone.model.parameters() if q.requires_grad]
        lm_params = sum(q.numel() for n, q in backbone.model.named_parameters() if "visual" not in n)
        opt = torch.optim.AdamW(params, lr=1e-4)
        tokens = int(inputs["attention_mask"].sum())

        def step():
            logits = backbone.model(**backbone._model_inputs(inputs), use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dt = (time.perf_counter() - t0) / args.steps
        flops = 6 * lm_params * tokens / dt
        rows.append(dict(config=name, lm_params_m=round(lm_params / 1e6, 1), tokens_per_step=tokens, step_ms=round(dt * 1000, 1),
                         tokens_per_s=round(tokens / dt), gflops=round(flops / 1e9, 1), frac_of_peak=round(flops / peak, 3)))
    print(f"SFT step throughput, fp32, {torch.get_num_threads()} threads; torch.mm 2048^2 peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'config':<8}{'LM params':>10}{'tokens':>8}{'ms/step':>9}{'tok/s':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for r in rows:
        print(f"{r['config']:<8}{r['lm_params_m']:>9}M{r['tokens_per_step']:>8}{r['step_ms']:>9}{r['tokens_per_s']:>8}"
              f"{r['gflops']:>9}{r['frac_of_peak']:>9.1%}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(peak_gflops=round(peak / 1e9, 1), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

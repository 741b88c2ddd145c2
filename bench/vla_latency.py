"""predict_action latency: backbone prefix (truncated at the VLA layer) once + K Euler steps of the head,
vs the backbone forward alone, for K in {1, 4, 10}. Prints one table, writes out/bench/vla_latency.json.

    python bench/vla_latency.py                       # Backbone.tiny + ActionHead's class defaults (not the
                                                      # embedded default's sizes: for those, --checkpoint=out/vla)
    python bench/vla_latency.py --config=100m         # a ~100M-parameter Qwen2.5-VL-shaped config
    python bench/vla_latency.py --checkpoint=out/vla  # a trained VLA
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ACTION_PROMPT, NormStats  # noqa: E402
from model import VLA, ActionHead, Backbone  # noqa: E402

CONFIGS = {  # Backbone.tiny sizes; "100m" is ~100M parameters with the same architecture
    "tiny": dict(),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, vision_depth=4, vision_hidden_size=256, image_size=112),
}


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--checkpoint", default="")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="out/bench/vla_latency.json")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        vla = VLA.load(args.checkpoint)
        size = vla.backbone.processor.image_processor.max_pixels ** 0.5 if hasattr(vla.backbone.processor.image_processor, "max_pixels") else 56
    else:
        backbone = Backbone.tiny(**CONFIGS[args.config])
        head = ActionHead(backbone.hidden_size, action_dim=7, state_dim=8, horizon=16)
        stats = NormStats.compute(np.random.default_rng(0).normal(size=(100, 7)), np.random.default_rng(1).normal(size=(100, 8)))
        vla = VLA(backbone, head, backbone.default_layer, stats, prompt_template=ACTION_PROMPT, backbone_path="in-memory")
        size = CONFIGS[args.config].get("image_size", 56)
    vla.eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (int(size), int(size), 3), dtype=np.uint8) for _ in range(2)]
    state = np.zeros(vla.state_dim, np.float32)
    instruction = "put the red block on the blue block"
    n_params = sum(p.numel() for p in vla.backbone.parameters())
    inputs = vla.backbone.build_inputs([images], [vla.prompt_template.format(instruction=instruction)])

    rows = []
    with torch.no_grad():
        full = timeit(lambda: vla.backbone.model(**vla.backbone._model_inputs(inputs)), args.repeats)
        prefix = timeit(lambda: vla.backbone.hidden_states(inputs, vla.layer), args.repeats)
        prompt = vla.prompt_template.format(instruction=instruction)
        rows.append(("build_inputs (chat template + image processor)", timeit(lambda: vla.backbone.build_inputs([images], [prompt]), args.repeats)))
        rows.append(("backbone forward, all layers + LM head", full))
        rows.append((f"backbone prefix, layers 1..{vla.layer} of {vla.backbone.num_layers}", prefix))
        feats, mask = vla.backbone.hidden_states(inputs, vla.layer)
        for k in (1, 4, 10):
            head_ms = timeit(lambda: vla.head.sample(feats, mask, torch.zeros(1, vla.state_dim), num_steps=k), args.repeats)
            total = timeit(lambda: vla.predict_action(images, instruction, state, num_steps=k), args.repeats)
            rows.append((f"head only, K={k} Euler steps", head_ms))
            rows.append((f"predict_action, K={k}", total))
    title = f"VLA latency on {torch.get_num_threads()} CPU threads, backbone {args.checkpoint or args.config} ({n_params / 1e6:.1f}M params)"
    print(title)
    print(f"{'what':<52}{'median ms':>10}")
    for name, ms in rows:
        print(f"{name:<52}{ms:>10.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(title=title, rows=[dict(what=n, median_ms=round(m, 3)) for n, m in rows]), f, indent=1)


if __name__ == "__main__":
    main()

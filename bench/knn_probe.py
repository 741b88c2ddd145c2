"""KNN probe (the paper's Table 8 diagnostic): do a backbone's hidden states at the VLA layer encode the
robot state? For each backbone: mean-pool layer-`layer` features of (images, ACTION_PROMPT) over the
training demonstrations, predict the held-out frames' normalized proprio state from the k nearest
training features (cosine), and report the error against two floors: predicting the mean state, and
the same probe on a randomly initialized backbone of the same shape. Prints one table and writes json.

    python bench/knn_probe.py --backbones=out/sft,out/align_rl          # the embedded default
    python bench/knn_probe.py --backbones=A,B --train=<libero dir> --val=<libero dir> --layer=18
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ACTION_PROMPT, LiberoDataset, NormStats  # noqa: E402
from model import Backbone  # noqa: E402


@torch.no_grad()
def pooled_features(backbone, dataset, indices, layer, batch_size):
    out = []
    for i in range(0, len(indices), batch_size):
        samples = [dataset[j] for j in indices[i:i + batch_size]]
        inputs = backbone.build_inputs([s["images"] for s in samples],
                                       [ACTION_PROMPT.format(instruction=s["instruction"]) for s in samples])
        feats, mask = backbone.hidden_states(inputs, layer)
        m = mask.unsqueeze(-1).float()
        out.append(((feats.float() * m).sum(1) / m.sum(1)).cpu().numpy())
    return np.concatenate(out)


def knn_predict(train_x, train_y, query_x, k):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    return train_y[nearest].mean(axis=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbones", default="out/sft,out/align_rl")
    p.add_argument("--train", default="out/data/libero/train")
    p.add_argument("--val", default="out/data/libero/val")
    p.add_argument("--layer", type=int, default=0, help="0: the backbone's default VLA layer")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--num_train", type=int, default=1000)
    p.add_argument("--num_val", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench/knn_probe.json")
    args = p.parse_args()
    train, val = LiberoDataset(args.train, horizon=1), LiberoDataset(args.val, horizon=1)
    stats = NormStats.compute(train.all_actions(), train.all_states())
    rng = np.random.default_rng(args.seed)
    train_idx = np.sort(rng.choice(len(train), min(args.num_train, len(train)), replace=False)).tolist()
    val_idx = np.sort(rng.choice(len(val), min(args.num_val, len(val)), replace=False)).tolist()
    y_train = stats.normalize_state(np.stack([train.episodes[train.index[i][0]]["states"][train.index[i][1]] for i in train_idx]))
    y_val = stats.normalize_state(np.stack([val.episodes[val.index[i][0]]["states"][val.index[i][1]] for i in val_idx]))
    rows = [("predict the mean state", float(((y_val - y_train.mean(0)) ** 2).mean()))]
    names = [b for b in args.backbones.split(",") if b]
    for name in ["random init"] + names:
        if name == "random init":
            reference = Backbone.from_pretrained(names[0]) if names else Backbone.tiny()
            torch.manual_seed(args.seed)
            backbone = Backbone(type(reference.model)(reference.model.config), reference.processor,
                                reference.fast_vocab_size, reference.act_first_id)
        else:
            backbone = Backbone.from_pretrained(name)
        backbone.eval()
        layer = args.layer or backbone.default_layer
        x_train = pooled_features(backbone, train, train_idx, layer, args.batch_size)
        x_val = pooled_features(backbone, val, val_idx, layer, args.batch_size)
        mse = float(((knn_predict(x_train, y_train, x_val, args.k) - y_val) ** 2).mean())
        rows.append((f"{name} (layer {layer})", mse))
    print(f"KNN probe (k={args.k}): held-out normalized robot-state MSE from mean-pooled hidden states "
          f"({len(train_idx)} train / {len(val_idx)} val frames); lower = the state is better encoded")
    print(f"{'features':<40}{'state MSE':>10}")
    for name, mse in rows:
        print(f"{name:<40}{mse:>10.4f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(k=args.k, rows=[dict(features=n, state_mse=m) for n, m in rows], config=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()

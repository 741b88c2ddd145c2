"""Where the VLA's held-out error comes from on the embedded default: the flow head against plain regressors
with train_vla.py's budget (same steps, batch, optimizer and schedule), on inputs from "no image" to "perfect
perception". Rows (held-out normalized action-chunk MSE, as train_vla.py's val_action_mse):

    mean chunk                 the floor (val_mse_mean_action)
    MLP: state                 what the proprio state alone gives
    MLP: state + features      mean-pooled backbone features at the VLA's layer (what the head reads)
    MLP: state + image tokens  the same layer's image tokens, flattened (where each token sits is kept)
    MLP: state + pixels        both cameras' images at half resolution: what the pixels hold for an MLP
    MLP: state + pick/place    the true poses of the two named blocks (perfect perception, embedded data only)
    head: state only           the VLA's ActionHead with a constant context token: what the state gives a flow head
    head: pick/place tokens    the same head fed those poses as its context tokens. Head rows: one sample (4 Euler
                               steps, as train_vla evaluates), the mean of 8 samples, one Euler step (= its mean)
    head: features             train_vla's own final val_action_mse (from <vla>/metrics.jsonl)
    regressor: GR00T blocks / no self-attention
                               the head's network trained as a plain regressor (noisy actions 0, t = 0, target the
                               chunk) on the pick/place tokens, with GR00T's alternating cross / self-attention
                               blocks and with cross-attention only: is it the architecture that needs the samples?

A calibrated flow head's sample misses by twice the conditional variance of the action given its inputs, which
a good regressor's error estimates; comparing rows says whether the backbone, the data or the sampling is the limit.
One sample reaches a third of the floor only if its inputs explain more than 5/6 of the chunk's variance.

    python bench/vla_ceiling.py                     # after python train_vla.py; ~8 min on 2 CPU cores
"""

import argparse
import json
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import LiberoDataset, NormStats, chunk_at, cosine_lr, global_batch_indices  # noqa: E402
from prepare.synthetic import COLORS, TABLE  # noqa: E402
from model import VLA, ActionHead  # noqa: E402


def targets(dataset, indices, stats, horizon):
    states, chunks, masks = [], [], []
    for i in indices:
        e, t = dataset.index[i]
        ep = dataset.episodes[e]
        chunk, mask = chunk_at(ep["actions"], t, horizon)
        states.append(ep["states"][t]), chunks.append(chunk), masks.append(mask)
    as_t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)
    return as_t(stats.normalize_state(np.stack(states))), as_t(stats.normalize_actions(np.stack(chunks))), as_t(np.stack(masks))


def pick_place_tokens(dataset, indices):
    """[N, 2, 8]: (x / TABLE, y / TABLE, yaw, is_pick, is_place, 0, 0, 0) of the two blocks the instruction names,
    from the simulator state the embedded data stores in data/demo_i/states (blocks first, in COLORS order)."""
    scenes, out = {}, np.zeros((len(indices), 2, 8), np.float32)
    for n, i in enumerate(indices):
        e, _ = dataset.index[i]
        ep = dataset.episodes[e]
        if e not in scenes:
            with h5py.File(ep["file"], "r") as f:
                scenes[e] = f["data"][ep["demo"]]["states"][0]
        words = ep["instruction"].split()  # "put the A block on the B block"
        for k, colour in enumerate((words[2], words[-2])):
            if colour not in COLORS:
                raise ValueError(f"{ep['file']}: {ep['instruction']!r} is not an embedded-default instruction")
            x, y, yaw = scenes[e][3 * list(COLORS).index(colour): 3 * list(COLORS).index(colour) + 3]
            out[n, k, :5] = x / TABLE, y / TABLE, yaw, k == 0, k == 1
    return torch.tensor(out)


@torch.no_grad()
def layer_inputs(vla, dataset, indices, batch_size=32):
    """One pass of the VLA's backbone (its prompt, its layer): the layer's mean-pooled features [N, d], its image tokens flattened [N, n_image * d],
    and the cameras' images at half resolution, flattened [N, cameras * H/2 * W/2 * 3] (uint8 -> float)."""
    pooled, tokens, pixels = [], [], []
    for i in range(0, len(indices), batch_size):
        samples = [dataset[j] for j in indices[i:i + batch_size]]
        inputs = vla.backbone.build_inputs([s["images"] for s in samples],
                                           [vla.prompt_template.format(instruction=s["instruction"]) for s in samples])
        feats, mask = vla.backbone.hidden_states(inputs, vla.layer)
        feats, m = feats.float(), mask.unsqueeze(-1).float()
        pooled.append((feats * m).sum(1) / m.sum(1))
        image = inputs["input_ids"].to(feats.device) == vla.backbone.image_token_id
        shapes = {im.shape for s in samples for im in s["images"]}
        if len(shapes) > 1 or len(set(image.sum(1).tolist())) > 1:
            files = sorted({dataset.episodes[dataset.index[j][0]]["file"] for j in indices[i:i + batch_size]})
            raise ValueError(f"{files}: frames {indices[i:i + batch_size]} have images of shapes {sorted(shapes)}; "
                             "flattened images and image tokens need one shape for every camera and frame")
        tokens.append(feats[image].view(len(samples), -1))
        pixels.append(torch.tensor(np.stack([np.concatenate([im[::2, ::2] for im in s["images"]], -1) for s in samples]),
                                   dtype=torch.float32).flatten(1))
    return torch.cat(pooled).cpu(), torch.cat(tokens).cpu(), torch.cat(pixels)


def masked_mse_loss(pred, target, mask):
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def masked_mse(pred, target, mask):
    return float(masked_mse_loss(pred, target, mask))


def train(model, loss_fn, n, cfg, seed):
    """train_vla.py's loop without its plumbing: AdamW with its betas and no decay on biases / norms, warmup +
    cosine, grad clip, epoch-wise batches (data.global_batch_indices)."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg["weight_decay"]),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    # run_configs from before train_vla had a `betas` key: the (0.9, 0.95) it then hard-coded
    opt = torch.optim.AdamW(groups, cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.95))))
    warmup = int(np.ceil(cfg["warmup_frac"] * cfg["max_iters"]))
    for step in range(cfg["max_iters"]):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg["max_iters"], cfg["lr"], warmup, cfg["min_lr"])
        loss = loss_fn(torch.tensor(global_batch_indices(step, n, cfg["batch_size"], seed)), g)  # epochs, as train_vla
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
    return model.eval()


def mlp_row(x_train, x_val, y_train, m_train, y_val, m_val, cfg, seed):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                              torch.nn.GELU(), torch.nn.Linear(512, y_train[0].numel()))
    loss = lambda i, g: masked_mse_loss(net(x_train[i]).view_as(y_train[i]), y_train[i], m_train[i])
    train(net, loss, len(x_train), cfg, seed)
    with torch.no_grad():
        return masked_mse(net(x_val).view_as(y_val), y_val, m_val)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vla", default="out/vla")
    p.add_argument("--train", default="out/data/libero/train")
    p.add_argument("--val", default="out/data/libero/val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench/vla_ceiling.json")
    args = p.parse_args()
    vla = VLA.load(args.vla).eval()
    with open(os.path.join(args.vla, "run_config.json")) as f:
        cfg = json.load(f)  # train_vla's budget: max_iters, batch_size, lr, min_lr, warmup_frac, weight_decay, grad_clip
    horizon = vla.head.horizon
    train_set, val_set = LiberoDataset(args.train, horizon=horizon), LiberoDataset(args.val, horizon=horizon)
    stats = NormStats.compute(train_set.all_actions(), train_set.all_states())
    train_idx = list(range(len(train_set)))
    # the held-out frames train_vla.py evaluates on, so the last row compares like with like
    val_idx = np.sort(np.random.default_rng(cfg["seed"] + 1).permutation(len(val_set))[:cfg["eval_samples"]]).tolist()
    s_tr, y_tr, m_tr = targets(train_set, train_idx, stats, horizon)
    s_va, y_va, m_va = targets(val_set, val_idx, stats, horizon)
    rows = [("mean chunk (floor)", masked_mse(y_tr.mean(0, keepdim=True), y_va, m_va))]
    rows.append(("MLP: state", mlp_row(s_tr, s_va, y_tr, m_tr, y_va, m_va, cfg, args.seed)))
    (f_tr, tok_tr, px_tr), (f_va, tok_va, px_va) = (layer_inputs(vla, ds, idx)
                                                    for ds, idx in ((train_set, train_idx), (val_set, val_idx)))
    for name, x_tr, x_va in ((f"features (layer {vla.layer}, mean-pooled)", f_tr, f_va),
                             (f"image tokens (layer {vla.layer}, flattened)", tok_tr, tok_va),
                             ("pixels (both cameras, half resolution)", px_tr, px_va)):
        rows.append((f"MLP: state + {name}", mlp_row(torch.cat([s_tr, x_tr], 1), torch.cat([s_va, x_va], 1),
                                                     y_tr, m_tr, y_va, m_va, cfg, args.seed)))
    pp_tr, pp_va = pick_place_tokens(train_set, train_idx), pick_place_tokens(val_set, val_idx)
    rows.append(("MLP: state + pick/place poses", mlp_row(torch.cat([s_tr, pp_tr.flatten(1)], 1), torch.cat([s_va, pp_va.flatten(1)], 1),
                                                          y_tr, m_tr, y_va, m_va, cfg, args.seed)))
    # the same head on a context that says nothing (one constant token): what the state alone gives a flow head
    for name, c_tr, c_va in (("head: state only (constant context)", torch.ones(len(s_tr), 1, 8), torch.ones(len(s_va), 1, 8)),
                             ("head: pick/place tokens", pp_tr, pp_va)):
        torch.manual_seed(args.seed)
        head = ActionHead(**{**vla.head.config, "feature_dim": c_tr.shape[-1]})
        train(head, lambda i, g: head.loss(c_tr[i], None, s_tr[i], y_tr[i], m_tr[i], generator=g), len(c_tr), cfg, args.seed)
        with torch.no_grad():
            draw = lambda k, steps: head.sample(c_va, None, s_va, num_steps=steps, generator=torch.Generator().manual_seed(args.seed + k))
            samples = [draw(k, 4) for k in range(8)]
            rows.append((f"{name}, one sample", masked_mse(samples[0], y_va, m_va)))
            rows.append((f"{name}, mean of 8 samples", masked_mse(torch.stack(samples).mean(0), y_va, m_va)))
            rows.append((f"{name}, one Euler step", masked_mse(draw(0, 1), y_va, m_va)))
    for name, blocks in (("GR00T blocks", dict(self_attention=True, num_future_tokens=8)),
                         ("no self-attention", dict(self_attention=False, num_future_tokens=0))):
        torch.manual_seed(args.seed)
        head = ActionHead(**{**vla.head.config, "feature_dim": pp_tr.shape[-1], **blocks})
        regress = lambda c, s, m: head(c, None, s, torch.zeros(len(s), horizon, head.action_dim), torch.zeros(len(s)), m)
        train(head, lambda i, g: masked_mse_loss(regress(pp_tr[i], s_tr[i], m_tr[i]), y_tr[i], m_tr[i]), len(s_tr), cfg, args.seed)
        with torch.no_grad():
            rows.append((f"regressor: {name}, pick/place tokens", masked_mse(regress(pp_va, s_va, m_va), y_va, m_va)))
    metrics = os.path.join(args.vla, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            evals = [json.loads(line) for line in f if "val_action_mse" in line]
        if evals:
            rows.append(("head: features (train_vla's last val_action_mse)", evals[-1]["val_action_mse"]))
    floor = rows[0][1]
    print(f"held-out normalized action-chunk MSE, budget {cfg['max_iters']} steps x batch {cfg['batch_size']} "
          f"({len(train_idx)} train frames, {len(val_idx)} held-out frames)")
    print(f"{'predictor':<62}{'MSE':>8}{'/ floor':>9}")
    for name, mse in rows:
        print(f"{name:<62}{mse:>8.4f}{mse / floor:>9.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(rows=[dict(predictor=n, mse=m) for n, m in rows], config=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()

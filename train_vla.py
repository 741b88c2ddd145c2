"""Stage 3 of RoboAlign: the VLA. A frozen MLLM backbone (the aligned one from align_rl.py, or any other for
the baselines) feeds the hidden states of one middle layer to a new flow-matching DiT action head, trained on
robot demonstrations (arXiv 2603.21341 stage 3, GR00T N1.5).

    python train_vla.py                                   # embedded default: backbone out/align_rl, CPU
    python train_vla.py --init_from=out/sft --out_dir=out/vla_sft    # the SFT-only baseline, same budget
    torchrun --nproc_per_node=8 train_vla.py config/vla_qwen2_5_vl_7b_libero.py

Because the backbone is frozen, its features are a pure function of (backbone weights, layer, prompt, images):
with feature_cache=True they are computed once for every training sample (batched, no_grad) and stored in
safetensors shards under cache_dir/<fingerprint>/, and the head trains from them. Without image augmentation
the gradients are the same as computing the features every step, only much cheaper (README, measurements).
The fingerprint hashes the backbone's weights, the layer, the prompt template, the image settings and the
dataset files, so a cache built from another backbone or layer is never reused.

Writes out_dir: a VLA checkpoint (vla.json, action_head.safetensors, norm_stats.json; see model.VLA) that
eval_libero.py / eval_calvin.py load, plus run_config.json, train_state.pt (--resume) and metrics.jsonl
(step/loss/lr; eval lines with val_action_mse, val_action_mse_first and, once, val_mse_mean_action).
"""

import copy
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from data import (check_out_dir, check_step, MetricsLogger, NormStats, configure, cosine_lr, check_data_dir, global_batch_indices,
                  open_robot_dataset, recover_checkpoint, rng_state, save_checkpoint, set_rng_state, setup_distributed,
                  split_global_batch)
from model import VLA, ActionHead, Backbone, clip_grad_norm, compute_context, fsdp_shard, full_state_dict, weights_fingerprint

# -----------------------------------------------------------------------------
# config: these defaults ARE the embedded tiny CPU recipe (config/vla_qwen2_5_vl_7b_libero.py: the paper's)
out_dir = "out/vla"
init_from = "out/align_rl"  # a stage checkpoint dir (out/align_rl, out/sft), a hub name, or "tiny" (random, for tests)
dtype = "float32"  # compute dtype ("bfloat16" on GPUs), also the frozen backbone's storage; the head trains in fp32
attn_implementation = "sdpa"  # or "flash_attention_2" where installed
gradient_checkpointing = False  # recompute each DiT block of the head in backward (the backbone is frozen)
fsdp = False  # shard the frozen backbone with FSDP2 (model.fsdp_shard; gathered for feature extraction); the head,
# small, stays replicated with one gradient all-reduce per step
seed = 0
# the VL features: the hidden states of decoder layer `layer` (arXiv 2603.21341 section 4: layer 18 of the 7B's 28;
# 0 = two thirds of the depth), read through the backbone's final norm as GR00T N1.5 does (Isaac-GR00T
# gr00t/model/backbone/eagle_backbone.py keeps the first select_layer layers and reads the normed last state)
layer = 0
feature_final_norm = True
image_size = 56  # model.resize_with_pad size: the backbone checkpoint's (checked; the real recipe: 224); saved in vla.json
prompt_template = data.ACTION_PROMPT
# data
data_dir = "out/data"  # the embedded default is generated here if missing
robot_data = "libero"  # "libero" | "calvin"
robot_train = "{data_dir}/libero/train"
robot_val = "{data_dir}/libero/val"
flip_images = False  # official LIBERO hdf5 files: True (see data.LiberoDataset)
no_noops = True  # LIBERO: drop no-op steps as openvla / openpi train (data.LiberoDataset)
action_horizon = 16  # arXiv 2603.21341: horizon 16
action_dim = 7
clip_actions = False  # the training actions are clipped to [-1, 1] (CALVIN's rel_actions are: calvin_env
# utils.to_relative_action); saved in vla.json, so eval_calvin.py clips the policy's actions only then
# action head (GR00T N1.5 shape, scaled down for CPU: width 128 x depth 4 did no better, 0.165 vs 0.160, 3x slower)
head_width = 64
head_depth = 2
head_heads = 4
head_dropout = 0.0  # attention and MLP dropout of the head in training (GR00T N1.5: 0.2, the paper configs)
# GR00T alternates cross- and self-attention blocks; at this size and budget the flow head learns faster without
# the self-attention block (embedded default: 0.25 of the floor vs 0.39 with GR00T's blocks; README), so the tiny
# default cross-attends only and adds the state to each action token. The paper's config keeps GR00T's blocks.
head_self_attention = False
num_future_tokens = 0  # GR00T's future tokens are read only through self-attention
num_vl_self_attn_layers = 1
num_inference_steps = 4  # Euler steps at inference (arXiv 2603.21341)
# feature cache
feature_cache = True
cache_dir = "out/feature_cache"
cache_dtype = "float32"  # "bfloat16" halves the disk for a 7B (features then differ from on-the-fly by rounding)
cache_shard_size = 1024  # samples per safetensors shard
cache_in_memory = True  # load shards into RAM (False: memory-map them, for caches larger than RAM)
cache_batch_size = 32
# optimization
batch_size = 32  # micro-batch per process (split further when processes outnumber accumulation steps)
gradient_accumulation_steps = 1  # over all processes: global batch = batch_size * this
max_iters = 1000
lr = 1e-3
min_lr = 1e-4
warmup_frac = 0.05
weight_decay = 1e-5  # GR00T's fine-tuning value
betas = (0.9, 0.95)  # AdamW; GR00T fine-tunes with (0.95, 0.999): 0.158 vs 0.160 here, same within noise
grad_clip = 1.0
ema_decay = 0.0  # > 0: evaluate and save an exponential moving average of the head weights
# evaluation and logging
eval_interval = 1000  # and at the end; 0 = only at the end
eval_samples = 256  # fixed held-out frames
save_interval = 1000
log_interval = 100
resume = False  # continue the run in out_dir
overwrite = False  # start again over a run in out_dir (its log and checkpoint are replaced)
# -----------------------------------------------------------------------------


def dataset_fingerprint(dataset):
    files = getattr(dataset, "files", None) or [dataset.root]
    return [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]


class FeatureCache:
    """Backbone features of every sample of a dataset, trimmed to the valid tokens, in safetensors shards:
    shard k holds `features` [n, L_max, d] (right-padded) and `lengths` [n]. Rank r builds shards r, r + W, ..."""

    def __init__(self, root, fingerprint, num_samples, shard_size, in_memory=True):
        self.in_memory = in_memory
        self.dir = os.path.join(root, fingerprint[:20])
        self.fingerprint, self.num_samples, self.shard_size = fingerprint, num_samples, shard_size
        self.num_shards = math.ceil(num_samples / shard_size)
        self.shards = {}

    def shard_path(self, k):
        return os.path.join(self.dir, f"shard_{k:05d}.safetensors")

    def complete(self):
        meta = os.path.join(self.dir, "meta.json")
        if not os.path.isfile(meta):
            return False
        with open(meta) as f:
            stored = json.load(f)
        if stored.get("fingerprint") != self.fingerprint or stored.get("num_samples") != self.num_samples:
            raise ValueError(f"{meta}: feature cache of another backbone / layer / dataset "
                             f"(fingerprint {stored.get('fingerprint')}, expected {self.fingerprint}); delete {self.dir}")
        sizes = stored.get("shard_bytes")
        for k in range(self.num_shards):  # a truncated or replaced shard is never reused
            path = self.shard_path(k)
            if not os.path.isfile(path):
                return False
            if sizes is not None and os.path.getsize(path) != sizes[k]:
                raise ValueError(f"{path}: {os.path.getsize(path)} bytes, {meta} recorded {sizes[k]}: the shard is damaged; "
                                 f"delete {self.dir} to rebuild the cache")
            if sizes is None:  # a cache written before sizes were recorded: safetensors checks its header covers the file
                try:
                    safe_open(path, framework="pt")
                except Exception as e:
                    raise ValueError(f"{path}: unreadable ({e}); delete {self.dir} to rebuild the cache") from e
        return True

    def build(self, vla, dataset, rank, world_size, batch_size, torch_dtype, master):
        os.makedirs(self.dir, exist_ok=True)
        mine = [k for k in range(rank, self.num_shards, world_size) if not os.path.isfile(self.shard_path(k))]
        bar = tqdm(total=sum(min(self.shard_size, self.num_samples - k * self.shard_size) for k in mine),
                   disable=not master, desc="feature cache", dynamic_ncols=True)
        for k in mine:
            feats, lengths = [], []
            lo, hi = k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)
            for b in range(lo, hi, batch_size):
                samples = [dataset[i] for i in range(b, min(b + batch_size, hi))]
                with torch.no_grad():
                    f, m = vla.features([s["images"] for s in samples], [s["instruction"] for s in samples])
                for row, valid in zip(f, m):
                    feats.append(row[valid].to("cpu", torch_dtype))  # left padding removed
                    lengths.append(int(valid.sum()))
                bar.update(len(samples))
            padded = torch.zeros(len(feats), max(lengths), feats[0].shape[-1], dtype=torch_dtype)
            for j, row in enumerate(feats):
                padded[j, :len(row)] = row
            tmp = self.shard_path(k) + ".tmp"
            save_file({"features": padded, "lengths": torch.tensor(lengths)}, tmp)
            os.replace(tmp, self.shard_path(k))  # a killed build keeps its finished shards
        bar.close()
        if world_size > 1:
            dist.barrier()
        if master:
            with open(os.path.join(self.dir, "meta.json"), "w") as f:
                json.dump(dict(fingerprint=self.fingerprint, num_samples=self.num_samples,
                               shard_bytes=[os.path.getsize(self.shard_path(k)) for k in range(self.num_shards)]), f)
        if world_size > 1:
            dist.barrier()

    def get(self, indices):
        """(features [B, L, d] right-padded, mask [B, L]) for dataset indices."""
        rows = []
        for i in indices:
            k, j = divmod(i, self.shard_size)
            if k not in self.shards:
                if self.in_memory:  # the embedded default's cache is a few hundred MB
                    self.shards[k] = load_file(self.shard_path(k))
                else:  # a 7B's cache is read lazily (mmap)
                    f = safe_open(self.shard_path(k), framework="pt")
                    self.shards[k] = dict(features=f.get_slice("features"), lengths=f.get_tensor("lengths"))
            shard = self.shards[k]
            rows.append(shard["features"][j:j + 1][0, :int(shard["lengths"][j])])
        width = max(len(r) for r in rows)
        feats = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            feats[b, :len(r)], mask[b, :len(r)] = r, True
        return feats, mask


def load_backbone(source, torch_dtype, attn_implementation=None):
    if source == "tiny":
        backbone = Backbone.tiny(seed=seed)
        backbone.set_image_size(image_size)
        return backbone, None
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"init_from={source!r}: no backbone in this directory (expected an HF checkpoint, "
                                "config.json + model.safetensors, as sft.py / align_rl.py write)")
    if not os.path.isdir(source) and source.startswith(("out/", "./", "/")):
        raise FileNotFoundError(f"init_from={source!r} does not exist: run `python sft.py && python align_rl.py` first "
                                "(or --init_from=out/sft for the SFT-only baseline)")
    backbone = Backbone.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
    backbone.set_image_size(image_size, source)
    return backbone, source


def main():
    config = configure(globals())
    check_out_dir(out_dir, resume, overwrite)  # before anything is read or written
    rank, local_rank, world_size, device = setup_distributed()
    ddp, master = world_size > 1, rank == 0
    torch.manual_seed(seed)
    micro_batch, accum_per_rank = split_global_batch(batch_size, gradient_accumulation_steps, world_size)
    global_batch = batch_size * gradient_accumulation_steps
    compute_dtype = getattr(torch, dtype)
    autocast = compute_context(device, compute_dtype)  # the head's fp32 weights, matmuls in the compute dtype

    # ---- data ----
    check_data_dir(data_dir)
    path = lambda p: p.format(data_dir=data_dir)
    robot_kwargs = dict(flip_images=flip_images, no_noops=no_noops) if robot_data == "libero" else {}
    train_set = open_robot_dataset(robot_data, path(robot_train), action_horizon, **robot_kwargs)
    val_set = open_robot_dataset(robot_data, path(robot_val), action_horizon, **robot_kwargs) if robot_val else None
    _, chunk, _ = train_set.targets(0)
    if chunk.shape[-1] != action_dim:
        raise ValueError(f"{path(robot_train)}: demonstrations have {chunk.shape[-1]}-D actions, the head is configured "
                         f"for action_dim={action_dim}")
    demos = train_set.demonstrations(max_steps=200_000, seed=seed)  # CALVIN: a seeded subset of its windows
    actions = np.concatenate([a for a, _ in demos])
    norm_stats = NormStats.compute(actions, np.concatenate([s for _, s in demos]))
    if clip_actions and np.abs(actions[:, :-1]).max() > 1.0 + 1e-6:
        raise ValueError(f"clip_actions=True, but the actions of {path(robot_train)} reach {np.abs(actions[:, :-1]).max():.3f} "
                         "outside [-1, 1]: they were not clipped, so the policy's actions must not be either")

    # ---- frozen backbone + new head (arXiv 2603.21341 stage 3) ----
    if master:
        recover_checkpoint(out_dir)
    state_path = os.path.join(out_dir, "train_state.pt")
    if resume and not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume: {state_path} not found")
    backbone, backbone_path = load_backbone(init_from, compute_dtype, attn_implementation)
    frozen_fingerprint = weights_fingerprint(backbone.state_dict()) if feature_cache else None
    backbone.to(device)
    if fsdp:
        fsdp_shard(backbone.requires_grad_(False), compute_dtype)
    feature_layer = layer or backbone.default_layer
    state_dim = len(train_set.targets(0)[0])
    head = ActionHead(backbone.hidden_size, action_dim=action_dim, state_dim=state_dim, horizon=action_horizon,
                      width=head_width, depth=head_depth, heads=head_heads, num_future_tokens=num_future_tokens,
                      num_vl_self_attn_layers=num_vl_self_attn_layers, dropout=head_dropout,
                      self_attention=head_self_attention).to(device)
    head.gradient_checkpointing = gradient_checkpointing
    vla = VLA(backbone, head, feature_layer, norm_stats, freeze_backbone=True, prompt_template=prompt_template,
              backbone_path=backbone_path, final_norm=feature_final_norm, clip_actions=clip_actions)
    ema = copy.deepcopy(head).requires_grad_(False) if ema_decay > 0 else None
    params = [p for p in head.parameters()]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type == "cuda")
    step = 0
    if resume:
        train_state = torch.load(state_path, map_location="cpu", weights_only=False)
        head.load_state_dict(train_state["head"])
        optimizer.load_state_dict(train_state["optimizer"])
        if ema is not None:
            ema.load_state_dict(train_state["ema"])
        set_rng_state(train_state["rng"])
        step = train_state["step"]
        if master:
            print(f"resuming from {state_path} at step {step}")
    logger = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=master, resume_step=step if resume else None)
    if master:
        print(f"backbone {init_from} (frozen, layer {feature_layer} of {backbone.num_layers}); head "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M params; {len(train_set)} training frames; "
              f"{world_size} process(es) on {device}")

    # ---- features: from the cache or computed per batch ----
    cache = None
    if feature_cache:
        fingerprint = hashlib.sha256(json.dumps(dict(
            backbone=frozen_fingerprint, layer=feature_layer, final_norm=feature_final_norm, image_size=image_size,
            prompt=prompt_template, dtype=cache_dtype, flip=flip_images, no_noops=no_noops, kind=robot_data,
            data=dataset_fingerprint(train_set))).encode()).hexdigest()
        cache = FeatureCache(cache_dir, fingerprint, len(train_set), cache_shard_size, cache_in_memory)
        if not cache.complete():
            t0 = time.time()
            with backbone.gathered():  # under FSDP: parameters gathered once for the whole pass
                cache.build(vla, train_set, rank, world_size, cache_batch_size, getattr(torch, cache_dtype), master)
            if master:
                print(f"feature cache {cache.dir}: built in {time.time() - t0:.1f} s")
        elif master:
            print(f"feature cache {cache.dir}: reused")

    def batch(indices):
        states, chunks, masks = zip(*(train_set.targets(i) for i in indices))
        out = dict(state=norm_stats.normalize_state(np.stack(states)), actions=norm_stats.normalize_actions(np.stack(chunks)),
                   action_mask=np.stack(masks))
        if cache is not None:
            out["features"], out["feature_mask"] = cache.get(indices)
        else:
            samples = [train_set[i] for i in indices]
            with torch.no_grad(), autocast:
                out["features"], out["feature_mask"] = vla.features([s["images"] for s in samples], [s["instruction"] for s in samples])
        return {k: torch.as_tensor(v).to(device) for k, v in out.items()}

    # ---- held-out evaluation: fixed frames, features computed once, fixed sampling noise ----
    val_probe = np.sort(np.random.default_rng(seed + 1).permutation(len(val_set))[:eval_samples]).tolist() if val_set else []
    val_features = []
    for b in range(0, len(val_probe), cache_batch_size):
        samples = [val_set[i] for i in val_probe[b:b + cache_batch_size]]
        with torch.no_grad(), autocast, backbone.gathered():
            f, m = vla.features([s["images"] for s in samples], [s["instruction"] for s in samples])
        val_features.append((f.float(), m, norm_stats.normalize_state(np.stack([s["state"] for s in samples])),
                             norm_stats.normalize_actions(np.stack([s["actions"] for s in samples])),
                             np.stack([s["action_mask"] for s in samples])))

    def masked_mse(pred, target, mask):
        err = ((pred - target) ** 2).mean(-1)  # [B, H]
        return float((err * mask).sum() / mask.sum())

    @torch.no_grad()
    def evaluate(net, with_floor=False):
        net.eval()
        generator = torch.Generator(device=device).manual_seed(seed + 2)
        preds, tgts, masks = [], [], []
        for f, m, state, actions, mask in val_features:
            with autocast:
                pred = net.sample(f, m, torch.as_tensor(state, device=device), num_steps=num_inference_steps, generator=generator)
            preds.append(pred.float().cpu().numpy()), tgts.append(actions), masks.append(mask)
        net.train()
        pred, tgt, mask = np.concatenate(preds), np.concatenate(tgts), np.concatenate(masks).astype(np.float64)
        out = dict(val_action_mse=masked_mse(pred, tgt, mask), val_action_mse_first=masked_mse(pred[:, :1], tgt[:, :1], mask[:, :1]))
        if with_floor:  # always predicting the training set's mean normalized chunk
            idx = np.random.default_rng(seed + 3).permutation(len(train_set))[:4096]
            mean_chunk = norm_stats.normalize_actions(np.stack([train_set.targets(i)[1] for i in idx])).mean(0)
            out["val_mse_mean_action"] = masked_mse(mean_chunk[None], tgt, mask)
        return {k: round(v, 6) for k, v in out.items()}

    def run_eval(step):
        if not val_features or not master:
            return
        metrics = evaluate(ema if ema is not None else head)
        logger.log(step=step, **metrics)
        tqdm.write(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def checkpoint(step):
        backbone_state = full_state_dict(backbone.model) if backbone_path is None else None  # a collective under FSDP

        def write(tmp):
            saved = copy.deepcopy(vla.head.state_dict())
            if ema is not None:
                vla.head.load_state_dict(ema.state_dict())
            if backbone_path is None:  # "tiny": the random backbone is part of this checkpoint
                backbone.save_pretrained(os.path.join(tmp, "backbone"), state_dict=backbone_state)
                vla.backbone_path = os.path.join(tmp, "backbone")
            vla.save(tmp, final_dir=out_dir)
            vla.head.load_state_dict(saved)
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            torch.save(dict(step=step, head=saved, optimizer=optimizer.state_dict(), rng=rng_state(), config=config,
                            ema=ema.state_dict() if ema is not None else None), os.path.join(tmp, "train_state.pt"))
        if master:
            save_checkpoint(out_dir, write)
        if ddp:
            dist.barrier()

    # ---- training loop ----
    if step == 0 and master and val_features:
        logger.log(step=0, **evaluate(head, with_floor=True))
    warmup_iters = math.ceil(warmup_frac * max_iters)
    if master and step >= max_iters:
        print(f"{out_dir} is already at step {step} of max_iters={max_iters}: nothing to train (raise --max_iters to go on)")
    bar = tqdm(total=max_iters, initial=step, disable=not master, desc="train_vla", dynamic_ncols=True)
    t_log = time.time()
    while step < max_iters:
        step_lr = cosine_lr(step, max_iters, lr, warmup_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        per_rank = global_batch // world_size
        indices = global_batch_indices(step, len(train_set), global_batch, seed)[rank * per_rank:(rank + 1) * per_rank]
        total = 0.0
        for k in range(accum_per_rank):
            b = batch(indices[k * micro_batch:(k + 1) * micro_batch])
            # the flow noise and time of a micro-batch depend only on (seed, step, its place in the global batch),
            # so any world size and a resumed run draw the same ones
            micro = rank * accum_per_rank + k
            generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0]))
            with autocast:  # flow-matching velocity loss (ActionHead.loss: t ~ Beta(1.5, 1), GR00T convention)
                loss = head.loss(b["features"].float(), b["feature_mask"], b["state"].float(), b["actions"].float(),
                                 b["action_mask"], generator=generator)
            (loss / accum_per_rank).backward()
            total += loss.item() / accum_per_rank
        if ddp:  # data parallel by hand: the head is small, so one all-reduce per parameter after accumulation
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
            total_t = torch.tensor([total], device=device)
            dist.all_reduce(total_t)
            total = total_t.item() / world_size
        grad_norm = clip_grad_norm(params, grad_clip)
        check_step(step + 1, total, grad_norm, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), head.parameters()):
                    pe.lerp_(p, 1 - ema_decay)
        step += 1
        logger.log(step=step, loss=round(total, 6), lr=step_lr)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if master and (step % log_interval == 0 or step == max_iters):
            tqdm.write(f"step {step}/{max_iters} | loss {total:.4f} | lr {step_lr:.2e} | "
                       f"{(time.time() - t_log) * 1000 / log_interval:.0f} ms/step")
            t_log = time.time()
        if (eval_interval and step % eval_interval == 0) or step == max_iters:
            run_eval(step)
        if step % save_interval == 0 or step == max_iters:
            checkpoint(step)
    bar.close()
    weights = full_state_dict(backbone) if feature_cache else None  # a collective under FSDP: rank 0 checks
    if feature_cache and master:
        assert weights_fingerprint(weights) == frozen_fingerprint, "the frozen backbone changed: the feature cache no longer matches it"
    if master:
        print(f"done: {out_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

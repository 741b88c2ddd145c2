# -----------------------------------------------------------------------------
# Run plumbing shared by the stage scripts: configuration, distributed set-up,
# deterministic data order, atomic checkpoints, metrics. (nanoGPT style.)

import ast
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

__all__ = [
    "configure", "setup_distributed", "global_batch_indices", "cosine_lr",
    "save_checkpoint", "recover_checkpoint", "rng_state", "set_rng_state", "MetricsLogger",
]

_CONFIG_TYPES = (int, float, bool, str, tuple, list)


def configure(config: dict, argv=None) -> dict:
    """nanoGPT's configurator as a function: `config` is a script's globals().

    Each argument without '=' is a python config file exec'd into `config`; each `--key=value`
    overrides an existing key (value parsed with ast.literal_eval, falling back to a string) and
    must keep the key's type; a bare `--flag` sets a bool key to True. Returns the resolved config
    (every public key of a plain type), which each run writes next to its checkpoint.
    """
    argv = sys.argv[1:] if argv is None else argv
    keys = {k for k, v in config.items() if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg!r} does not exist (arguments are config files or --key=value)")
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), config)
            continue
        key, sep, raw = arg[2:].partition("=")
        if key not in keys:
            raise KeyError(f"unknown config key --{key}; known keys: {', '.join(sorted(keys))}")
        old = config[key]
        if not sep:
            if not isinstance(old, bool):
                raise ValueError(f"--{key} needs a value (--{key}=...); only bool keys can be given bare")
            value = True
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a plain string such as a path
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(old, str) and not isinstance(value, str):
                value = raw  # e.g. --task_ids=3 for a string key keeps the text
            if type(value) is not type(old):
                raise TypeError(f"--{key}={raw}: expected {type(old).__name__}, got {type(value).__name__}")
        config[key] = value
    return {k: config[k] for k in sorted(keys)}


def setup_distributed():
    """DDP from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); single process without it.

    Returns (rank, local_rank, world_size, device). nccl on GPU, gloo on CPU, so
    `torchrun --nproc_per_node=2` also works on a laptop.
    """
    if "RANK" not in os.environ:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 0, 1, torch.device(device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo")
    return rank, local_rank, world_size, device


def global_batch_indices(step: int, num_samples: int, global_batch: int, seed: int) -> list:
    """Dataset indices of the global batch at `step`: a pure function of (step, seed).

    Walks a fresh seeded permutation per epoch, so every sample is seen once per epoch; a resumed
    run or a different world size sees exactly the same batches. Each rank takes its own contiguous
    slice of this list, so no sample is duplicated across ranks.
    """
    if num_samples <= 0:
        raise ValueError("global_batch_indices: the dataset is empty")
    out, pos = [], step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos, num_samples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
        take = min(global_batch - len(out), num_samples - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up then cosine decay to min_lr (the paper's SFT schedule: warm-up 3%, cosine)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str, write) -> None:
    """Write a checkpoint directory atomically: `write(tmp_dir)` fills a sibling temp dir, files
    already in out_dir that the checkpoint does not rewrite (metrics.jsonl, ...) are carried over,
    then the temp dir replaces out_dir by rename. A run killed at any point leaves either the old
    or the new checkpoint; `recover_checkpoint` finishes a swap interrupted between the renames.
    """
    out_dir = os.path.normpath(out_dir)
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if not os.path.exists(os.path.join(tmp, name)):
                os.replace(os.path.join(out_dir, name), os.path.join(tmp, name))
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    os.remove(os.path.join(out_dir, ".complete"))
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(out_dir: str) -> None:
    """If a save was killed between its two renames, put the complete new checkpoint in place."""
    out_dir = os.path.normpath(out_dir)
    tmp = out_dir + ".tmp"
    if not os.path.isdir(out_dir) and os.path.exists(os.path.join(tmp, ".complete")):
        os.replace(tmp, out_dir)
        os.remove(os.path.join(out_dir, ".complete"))


class MetricsLogger:
    """One json object per line in `path` (a plot or a notebook reads it); only rank 0 writes.

    The file is opened per line so it survives the checkpoint directory swap above.
    """

    def __init__(self, path: str, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            # a killed run may have logged steps after its last checkpoint: drop them, they are redone
            with open(path) as f:
                lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(lines)

    def log(self, **metrics) -> None:
        if not self.enabled:
            return
        metrics.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

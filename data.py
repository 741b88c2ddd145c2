"""RoboAlign data and run plumbing, shared by every stage script.

    run plumbing      configure (nanoGPT configurator), setup_distributed, global_batch_indices,
                      cosine_lr, rng_state, save_checkpoint (atomic), MetricsLogger
    NormStats         per-dimension q01/q99 normalization of actions and proprio state to [-1, 1]
    readers           LiberoDataset (official hdf5 layout), CalvinDataset (episode_XXXXXXX.npz +
                      auto_lang_ann.npy), ConversationDataset (LLaVA-style json / jsonl)
    prompts           the prompt templates and example builders sft.py / align_rl.py / train_vla.py share
    embedded default  make_synthetic_dataset: a tabletop pick-and-place world in the LIBERO layout plus
                      matching VQA and reasoning json, generated from a seed in seconds

Robot samples are dicts: images (list of uint8 [H, W, 3], third-person camera first, then wrist),
instruction (str), state (float32 [S]), actions (float32 [horizon, 7], starting at t, padded at the
episode end by repeating the last action), action_mask (bool [horizon], False on padding),
episode (str), t (int). Actions are in the dataset's own units; NormStats maps them to [-1, 1].
"""

import ast
import functools
import glob
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
from collections import Counter
from datetime import datetime

import h5py
import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# Run plumbing: configuration, distributed set-up, deterministic data order, atomic checkpoints,
# metrics (nanoGPT style, REFERENCES.md section 6).

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


def split_global_batch(batch_size: int, gradient_accumulation_steps: int, world_size: int) -> tuple:
    """(micro-batch size, micro-batches per process) for a global batch of batch_size * gradient_accumulation_steps,
    the same for every world size (nanoGPT convention). More processes than accumulation steps split each
    micro-batch instead, so `torchrun --nproc_per_node=2 <stage>.py` runs with the single-process defaults."""
    global_batch = batch_size * gradient_accumulation_steps
    if gradient_accumulation_steps % world_size == 0:
        return batch_size, gradient_accumulation_steps // world_size
    if world_size % gradient_accumulation_steps == 0 and global_batch % world_size == 0:
        return global_batch // world_size, 1
    raise ValueError(f"batch_size={batch_size} x gradient_accumulation_steps={gradient_accumulation_steps} cannot be "
                     f"split evenly over {world_size} processes: make gradient_accumulation_steps a multiple of the "
                     f"number of processes, or the global batch ({global_batch}) divisible by it with fewer "
                     f"accumulation steps than processes; the global batch must not depend on the world size")


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


CHECKPOINT_TMP = ".checkpoint.tmp"  # inside out_dir: every rename below stays on one filesystem


def save_checkpoint(out_dir: str, write) -> None:
    """Write a checkpoint into out_dir without ever leaving a mix of two: `write(tmp)` fills
    out_dir/.checkpoint.tmp, a `.complete` marker commits it, then its files replace their namesakes in
    out_dir one rename at a time. A run killed before the marker keeps the old checkpoint (the next start
    discards the partial one); killed after it, the next start finishes the renames (recover_checkpoint).
    Files the checkpoint does not write (metrics.jsonl, anything of the user's) are never touched.
    """
    tmp = os.path.join(out_dir, CHECKPOINT_TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        for root, _, names in os.walk(tmp):  # on disk before the marker commits them (a power loss, not only a kill)
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # a full disk shows up as either (torch.save raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2 ** 30
        raise OSError(f"saving a checkpoint into {tmp} failed ({e}); {free:.1f} GB free there (a save needs room for "
                      f"a second copy of the checkpoint); the previous checkpoint in {out_dir} is intact") from e
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("\n".join(sorted(os.listdir(tmp))))
        f.flush()
        os.fsync(f.fileno())
    recover_checkpoint(out_dir)


def recover_checkpoint(out_dir: str) -> None:
    """Finish a committed checkpoint (its renames into out_dir), or discard an uncommitted one."""
    tmp = os.path.join(out_dir, CHECKPOINT_TMP)
    if not os.path.isdir(tmp):
        return
    if not os.path.exists(os.path.join(tmp, ".complete")):
        shutil.rmtree(tmp)
        return
    for name in sorted(os.listdir(tmp)):
        if name == ".complete":
            continue
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):  # a subdirectory (train_vla's backbone/)
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    shutil.rmtree(tmp)


def check_out_dir(out_dir: str, resume: bool, overwrite: bool) -> None:
    """A stage never starts over a finished or running run by accident: an out_dir that holds metrics.jsonl
    or train_state.pt needs --resume (continue it) or --overwrite (start again; its checkpoint files and log
    are replaced). Nothing is changed when this raises."""
    found = [n for n in ("train_state.pt", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, n))]
    if found and not resume and not overwrite:
        raise FileExistsError(f"out_dir={out_dir!r} already holds a run ({', '.join(found)}): pass --resume to continue "
                              f"it, --overwrite to start again over it, or another --out_dir")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


def check_finite(x, where: str) -> None:
    """Raise if an array holds NaN or inf, naming where and the first bad index."""
    x = np.asarray(x)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{where}: non-finite value {x[index]} at index {index} (shape {x.shape})")


def check_step(step: int, loss: float, grad_norm: float, out_dir: str) -> None:
    """Stop before an optimizer step with a non-finite loss or gradient: nothing more is saved over out_dir."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopped before the optimizer "
                                 f"step and before any further save. The checkpoint in {out_dir} is the last one saved, "
                                 f"before this step; it may already hold diverging weights if the loss was climbing "
                                 f"(see metrics.jsonl). Lower lr, check the data")


class MetricsLogger:
    """One json object per line in `path` (a plot or a notebook reads it); only rank 0 writes.

    The file is opened per line (append-only). A fresh run (resume_step None) over an earlier run's log (the
    user's --overwrite) replaces it at its first line, i.e. once every check before training has passed: a run that
    fails before that leaves the earlier run's log in place.
    """

    def __init__(self, path: str, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled, self.replace = path, enabled, resume_step is None
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            # a killed run may have logged steps after its last checkpoint: drop them, they are redone
            with open(path) as f:
                raw = [l for l in f if l.strip()]
            lines = []
            for i, line in enumerate(raw):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(raw) - 1:  # a kill mid-write tears at most the last line
                        print(f"warning: {path}: dropped a torn last line ({line.strip()[:80]!r})", file=sys.stderr)
                        continue
                    raise ValueError(f"{path}: line {i + 1} is not json: {line.strip()[:80]!r}") from None
                if record.get("step", 0) <= resume_step:
                    lines.append(line if line.endswith("\n") else line + "\n")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(lines)
            os.replace(tmp, path)

    def log(self, **metrics) -> None:
        if not self.enabled:
            return
        metrics.setdefault("time", round(time.time(), 3))
        try:
            with open(self.path, "w" if self.replace else "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:  # e.g. a full disk: say which file
            raise OSError(f"{self.path}: cannot write the metrics line of step {metrics.get('step')} ({e})") from e
        self.replace = False


# -----------------------------------------------------------------------------
# Normalization: per-dimension 1st/99th percentiles -> [-1, 1] (FAST and openpi's quantile norm,
# REFERENCES.md 1.2). Computed once over the training demonstrations, saved with every checkpoint.

class NormStats:
    """q01/q99 of actions [D] and states [S]; x -> 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1].

    Clipping keeps the rare outliers (2% of the data) inside the range FAST and the action head see;
    unnormalize is the exact inverse inside the range.
    """

    KEYS = ("action_q01", "action_q99", "state_q01", "state_q99")
    EPS = 1e-6  # a constant dimension maps to -1 instead of dividing by zero

    def __init__(self, stats):
        missing = [k for k in self.KEYS if k not in stats]
        if missing:
            raise KeyError(f"NormStats: missing keys {missing} (expected {list(self.KEYS)})")
        self.stats = {k: np.asarray(stats[k], dtype=np.float32) for k in self.KEYS}
        for kind in ("action", "state"):
            lo, hi = self.stats[f"{kind}_q01"], self.stats[f"{kind}_q99"]
            if lo.ndim != 1 or lo.shape != hi.shape:
                raise ValueError(f"NormStats: {kind}_q01 {lo.shape} and {kind}_q99 {hi.shape} must be equal-length vectors")

    @classmethod
    def compute(cls, actions, states):
        """actions [N, D], states [N, S]: every time step of the training demonstrations."""
        actions, states = np.asarray(actions, np.float64), np.asarray(states, np.float64)
        if actions.ndim != 2 or states.ndim != 2 or len(actions) == 0:
            raise ValueError(f"NormStats.compute: expected actions [N, D] and states [N, S] with N > 0, "
                             f"got {actions.shape} and {states.shape}")
        check_finite(actions, "NormStats.compute: actions [step, dim]")
        check_finite(states, "NormStats.compute: states [step, dim]")
        q = lambda x, p: np.quantile(x, p, axis=0)
        return cls(dict(action_q01=q(actions, 0.01), action_q99=q(actions, 0.99),
                        state_q01=q(states, 0.01), state_q99=q(states, 0.99)))

    @property
    def action_dim(self):
        return len(self.stats["action_q01"])

    @property
    def state_dim(self):
        return len(self.stats["state_q01"])

    def _norm(self, x, kind):
        lo, hi = self.stats[f"{kind}_q01"], self.stats[f"{kind}_q99"]
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != len(lo):
            raise ValueError(f"NormStats: {kind} has {x.shape[-1]} dims, the statistics have {len(lo)}")
        return np.clip((x - lo) / (hi - lo + self.EPS) * 2 - 1, -1, 1).astype(np.float32)

    def _unnorm(self, x, kind):
        lo, hi = self.stats[f"{kind}_q01"], self.stats[f"{kind}_q99"]
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != len(lo):
            raise ValueError(f"NormStats: {kind} has {x.shape[-1]} dims, the statistics have {len(lo)}")
        return ((x + 1) / 2 * (hi - lo + self.EPS) + lo).astype(np.float32)

    def normalize_actions(self, a):
        return self._norm(a, "action")

    def unnormalize_actions(self, a):
        return self._unnorm(a, "action")

    def normalize_state(self, s):
        return self._norm(s, "state")

    def unnormalize_state(self, s):
        return self._unnorm(s, "state")

    def save(self, path):
        with open(path, "w") as f:
            json.dump({k: v.tolist() for k, v in self.stats.items()}, f, indent=1)

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: norm stats not found (written next to every checkpoint)")
        with open(path) as f:
            try:
                stats = cls(json.load(f))
                for k, v in stats.stats.items():
                    check_finite(v, k)
                return stats
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from e


def check_compatible(sample, data_path, norm_stats, stats_path, fast=None, fast_path=None):
    """Before the first step: a dataset sample's action / state dims (and the FAST tokenizer's action dim and
    horizon) must match the statistics and tokenizer a checkpoint brought along; both values in the message."""
    actions, state = np.asarray(sample["actions"]), np.asarray(sample["state"])
    for what, got, want in (("action", actions.shape[-1], norm_stats.action_dim), ("state", state.shape[-1], norm_stats.state_dim)):
        if got != want:
            raise ValueError(f"{data_path}: {got}-D {what}s, but {stats_path} normalizes {want}-D {what}s")
    if fast is not None and (fast.action_dim, fast.horizon) != (actions.shape[-1], len(actions)):
        raise ValueError(f"{data_path}: chunks of {len(actions)} x {actions.shape[-1]}-D actions, but {fast_path} encodes "
                         f"{fast.horizon} x {fast.action_dim}")


def chunk_at(actions, t, horizon):
    """actions[t : t + horizon], padded by repeating the last action; mask is False on the padding."""
    T = len(actions)
    idx = np.minimum(np.arange(t, t + horizon), T - 1)
    return np.asarray(actions[idx], dtype=np.float32), np.arange(t, t + horizon) < T


# -----------------------------------------------------------------------------
# LIBERO: the official hdf5 layout (REFERENCES.md section 7), one file per task.

LIBERO_CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
LIBERO_STATE_KEYS = ("ee_states", "gripper_states")  # eef pos + axis-angle (6) + finger qpos (2), as openpi


def non_noop_steps(actions, threshold=1e-4):
    """Indices of the steps a no_noops dataset keeps (openvla experiments/robot/libero/regenerate_libero_dataset.py):
    a step is a no-op when its translation + rotation command has norm < threshold and its gripper command equals
    that of the last kept step (the first step: the motion alone decides). openpi trains on the same files."""
    keep, last_gripper = [], None
    for t, action in enumerate(np.asarray(actions)):
        still = np.linalg.norm(action[:-1]) < threshold
        if still and (last_gripper is None or action[-1] == last_gripper):
            continue
        keep.append(t)
        last_gripper = action[-1]
    return np.asarray(keep, dtype=np.int64)


def _sorted_demos(group):
    return sorted((k for k in group.keys() if k.startswith("demo_")), key=lambda k: int(k.split("_")[1]))


def _expand_paths(paths, pattern, what):
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", pattern), recursive=True))
        elif any(c in p for c in "*?["):
            files += sorted(glob.glob(p))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{what}: {p!r} is neither a file nor a directory")
    if not files:
        raise FileNotFoundError(f"{what}: no {pattern} files under {paths}")
    return files


class LiberoDataset:
    """Every (demo, t) of LIBERO-layout hdf5 files; images are read lazily, everything else is in memory.

    paths: files, directories (searched recursively for *.hdf5) or globs, or a comma-separated string.
    flip_images: rotate images 180 degrees. Files written by LIBERO's scripts store robosuite's renders,
    which are upside down; eval_libero.py rotates the live renders by 180 degrees (the OpenVLA / openpi
    protocol), so set this for official files to see the same orientation in training and evaluation.
    A demo may carry per-step reasoning text, data/demo_i/reasoning [T] strings (the embedded default writes
    it; official LIBERO files have none): samples then have a "reasoning" key (sft.py's think_action uses it).
    """

    def __init__(self, paths, horizon=16, cameras=LIBERO_CAMERAS, state_keys=LIBERO_STATE_KEYS,
                 action_dim=7, flip_images=False, no_noops=False):
        self.files = _expand_paths(paths, "*.hdf5", "LiberoDataset")
        self.horizon, self.cameras, self.state_keys, self.flip_images = horizon, tuple(cameras), tuple(state_keys), flip_images
        self.episodes = []  # dicts: file, demo, instruction, frames [T] (hdf5 rows kept), actions [T, D], states [T, S]
        self.num_noops = 0
        for path in self.files:
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise OSError(f"{path}: cannot be read as hdf5 ({e})") from e
            with f:
                if "data" not in f:
                    raise KeyError(f"{path}: no 'data' group (expected the LIBERO layout data/demo_i/...)")
                instruction = self._instruction(f["data"], path)
                for demo in _sorted_demos(f["data"]):
                    g, where = f["data"][demo], f"{path}: data/{demo}"
                    if "actions" not in g:
                        raise KeyError(f"{where}/actions missing (expected [T, {action_dim}])")
                    actions = np.asarray(g["actions"], dtype=np.float32)
                    if actions.ndim != 2 or actions.shape[1] != action_dim or len(actions) == 0:
                        raise ValueError(f"{where}/actions has shape {actions.shape}, expected [T, {action_dim}]")
                    check_finite(actions, f"{where}/actions")
                    states = []
                    for key in self.state_keys:
                        if f"obs/{key}" not in g:
                            raise KeyError(f"{where}/obs/{key} missing (state keys {self.state_keys})")
                        s = np.asarray(g["obs"][key], dtype=np.float32)
                        if s.ndim != 2 or len(s) != len(actions):
                            raise ValueError(f"{where}/obs/{key} has shape {s.shape}, expected [T={len(actions)}, k]")
                        check_finite(s, f"{where}/obs/{key}")
                        states.append(s)
                    for cam in self.cameras:
                        shape = g["obs"][cam].shape if f"obs/{cam}" in g else None
                        if shape is None or len(shape) != 4 or shape[0] != len(actions) or shape[3] != 3:
                            raise ValueError(f"{where}/obs/{cam} has shape {shape}, expected uint8 [T={len(actions)}, H, W, 3]")
                    reasoning = None
                    if "reasoning" in g:
                        reasoning = [r.decode() if isinstance(r, bytes) else str(r) for r in g["reasoning"][()]]
                        if len(reasoning) != len(actions):
                            raise ValueError(f"{where}/reasoning has {len(reasoning)} entries, expected one per step ({len(actions)})")
                    frames = np.arange(len(actions))
                    if no_noops:
                        frames = frames[non_noop_steps(actions)]
                        self.num_noops += len(actions) - len(frames)
                        if len(frames) == 0:
                            continue
                    self.episodes.append(dict(file=path, demo=demo, instruction=instruction, frames=frames,
                                              actions=actions[frames], states=np.concatenate(states, axis=1)[frames],
                                              reasoning=None if reasoning is None else [reasoning[t] for t in frames]))
        if no_noops:
            total = self.num_noops + sum(len(ep["frames"]) for ep in self.episodes)
            _log(f"LiberoDataset: no_noops dropped {self.num_noops} of {total} steps ({', '.join(self.files[:2])}"
                 f"{', ...' if len(self.files) > 2 else ''})")
        self.index = [(e, t) for e, ep in enumerate(self.episodes) for t in range(len(ep["actions"]))]
        self._handles, self._pid = {}, None

    @staticmethod
    def _instruction(data, path):
        raw = data.attrs.get("problem_info")
        if raw is None:
            raise KeyError(f"{path}: data.attrs['problem_info'] missing (JSON with 'language_instruction')")
        info = json.loads(raw if isinstance(raw, str) else raw.decode())
        if "language_instruction" not in info:
            raise KeyError(f"{path}: data.attrs['problem_info'] has no 'language_instruction'")
        text = info["language_instruction"]
        return " ".join(text) if isinstance(text, list) else str(text)  # some releases store a word list

    def __len__(self):
        return len(self.index)

    def _file(self, path):
        if self._pid != os.getpid():  # h5py handles must not cross a fork (DataLoader workers)
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        obs = self._file(ep["file"])["data"][ep["demo"]]["obs"]
        images = [np.asarray(obs[cam][ep["frames"][t]], dtype=np.uint8) for cam in self.cameras]
        if self.flip_images:
            images = [np.ascontiguousarray(im[::-1, ::-1]) for im in images]
        actions, mask = chunk_at(ep["actions"], t, self.horizon)
        sample = dict(images=images, instruction=ep["instruction"], state=ep["states"][t].copy(), actions=actions,
                      action_mask=mask, episode=f"{os.path.basename(ep['file'])}:{ep['demo']}", t=t)
        if ep["reasoning"] is not None:
            sample["reasoning"] = ep["reasoning"][t]
        return sample

    def all_actions(self):
        return np.concatenate([ep["actions"] for ep in self.episodes])

    def all_states(self):
        return np.concatenate([ep["states"] for ep in self.episodes])


# -----------------------------------------------------------------------------
# CALVIN: one episode_XXXXXXX.npz per frame, language windows in lang_annotations/auto_lang_ann.npy
# (REFERENCES.md section 5). Only the annotated windows are used, as in CALVIN's language-conditioned
# training; rel_actions keep CALVIN's gripper convention (+1 open, -1 close), which eval_calvin.py's
# default gripper_convention="calvin" expects.

CALVIN_CAMERAS = ("rgb_static", "rgb_gripper")


class CalvinDataset:
    def __init__(self, root, horizon=16, cameras=CALVIN_CAMERAS, action_key="rel_actions", state_key="robot_obs"):
        self.root, self.horizon, self.cameras = root, horizon, tuple(cameras)
        self.action_key, self.state_key = action_key, state_key
        ann_path = os.path.join(root, "lang_annotations", "auto_lang_ann.npy")
        if not os.path.isfile(ann_path):
            raise FileNotFoundError(f"{ann_path} not found: CalvinDataset wants a split directory such as "
                                    "task_ABC_D/training with lang_annotations/auto_lang_ann.npy")
        ann = np.load(ann_path, allow_pickle=True).item()
        try:
            windows, texts = ann["info"]["indx"], ann["language"]["ann"]
        except (KeyError, TypeError) as e:
            raise KeyError(f"{ann_path}: expected ['info']['indx'] and ['language']['ann'], missing {e}") from e
        if len(windows) != len(texts):
            raise ValueError(f"{ann_path}: {len(windows)} windows but {len(texts)} annotations")
        self.digits = self._frame_digits(root)
        self.windows = [(int(s), int(e), str(text)) for (s, e), text in zip(windows, texts)]
        self.index = [(w, t) for w, (s, e, _) in enumerate(self.windows) for t in range(s, e + 1)]

    @staticmethod
    def _frame_digits(root):
        for name in os.listdir(root):
            m = re.fullmatch(r"episode_(\d+)\.npz", name)
            if m:
                return len(m.group(1))
        raise FileNotFoundError(f"{root}: no episode_XXXXXXX.npz frames")

    def frame(self, idx):
        path = os.path.join(self.root, f"episode_{idx:0{self.digits}d}.npz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: frame referenced by lang_annotations is missing")
        return np.load(path)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        w, t = self.index[i]
        start, end, text = self.windows[w]
        f = self.frame(t)
        for key in (*self.cameras, self.state_key, self.action_key):
            if key not in f:
                raise KeyError(f"{f.fid.name if hasattr(f, 'fid') else t}: key {key!r} missing")
        steps = [min(t + k, end) for k in range(self.horizon)]
        actions = np.stack([f[self.action_key] if s == t else self.frame(s)[self.action_key] for s in steps])
        if actions.shape != (self.horizon, 7):
            raise ValueError(f"{self.root}: frame {t} {self.action_key} has shape {actions.shape[1:]}, expected (7,)")
        return dict(images=[np.asarray(f[c], dtype=np.uint8) for c in self.cameras], instruction=text,
                    state=np.asarray(f[self.state_key], dtype=np.float32), actions=actions.astype(np.float32),
                    action_mask=np.arange(t, t + self.horizon) <= end, episode=f"calvin:{start}-{end}", t=t - start)

    def _scan(self, key, step=1):
        frames = [t for s, e, _ in self.windows for t in range(s, e + 1, step)]
        values = np.stack([self.frame(t)[key] for t in frames]).astype(np.float32)
        if not np.isfinite(values).all():
            t = frames[int(np.argwhere(~np.isfinite(values))[0][0])]
            check_finite(self.frame(t)[key], os.path.join(self.root, f"episode_{t:0{self.digits}d}.npz") + f": {key}")
        return values

    def all_actions(self, step=1):
        """Every annotated frame's action (step > 1 subsamples: a full ABC scan reads ~1M files)."""
        return self._scan(self.action_key, step)

    def all_states(self, step=1):
        return self._scan(self.state_key, step)


# -----------------------------------------------------------------------------
# BridgeData V2 (PAPER.md "Stage 1": 400K FAST-token SFT samples; "Stage 2": 12.8K RL prompts). WidowX 250
# arm, 5 Hz, 1-4 cameras, one instruction per trajectory. Two on-disk forms, read into the same samples:
#
#   raw release   .../<scene>/<task>/<NN>/<YYYY-MM-DD_HH-MM-SS>/raw/traj_groupG/trajK/ with
#                 obs_dict.pkl    dict of per-frame arrays; 'full_state' [N, 7] = xyz, roll-pitch-yaw,
#                                 gripper (always 7-D; 'state' drops the uncontrolled rotations in 4-D and
#                                 5-D action modes, so it is not used), 'qpos', 'time_stamp', 'eef_transform', ...
#                 policy_out.pkl  list of N-1 dicts whose 'actions' is the commanded 7-D action (xyz delta,
#                                 roll-pitch-yaw delta, gripper absolute: 1 open, 0 closed), or of bare arrays
#                 lang.txt        the instruction on its first line (then e.g. "confidence: 1")
#                 imagesC/im_k.jpg  camera C's frame k, k = 0..N-1 (images0 is the fixed main camera)
#   RLDS release  bridge_dataset/1.0.0/bridge_dataset-{train,val}.tfrecord-XXXXX-of-YYYYY: one
#                 tf.train.Example per trajectory, every step feature flattened over the steps:
#                 steps/observation/image_C (one jpeg per step), steps/observation/state (7 per step),
#                 steps/action (7 per step), steps/language_instruction (one per step), steps/is_first,
#                 steps/is_last, episode_metadata/file_path (the raw trajectory directory), has_image_C, ...
#
# The RLDS builder (read in rail-berkeley's bridge_dataset builder; nothing copied) turns N raw frames into
# N steps: state = full_state, action = policy_out actions plus a zero action appended on the last step,
# instruction = lang.txt's first line ("" when missing); trajectories recorded before 2021-07-23 had one frame
# of camera latency, so their first frame and state and their last action are dropped. Both readers here
# apply exactly these rules, then drop the final step, which has no real action, so trajectory i has
# T = N - 1 samples (N - 2 latency-shifted): t = 0..T-1 with image and state of frame t and the commanded
# actions t, t+1, ... (chunk_at pads with the last action). Gripper stays Bridge's 1 open / 0 closed.
#
# action_space="relabeled" is Octo / OpenVLA's Bridge convention instead: movement = full_state[t+1, :6] -
# full_state[t, :6] (the motion actually reached) and the gripper binarized (>0.95 open, <0.05 closed,
# values in between take the next decided value).
#
# Trajectories without language (no lang.txt, or an empty first line) are skipped, as are broken ones
# (missing pickle, inconsistent lengths, corrupted TFRecord record); each skip is a message naming the file
# (in .problems, the first ones printed) and a count per reason (in .skipped). Pickles run code when loaded:
# read only the release you downloaded.

# The RLDS builder renumbers cameras by ROS topic (fixed main camera -> image_0, wrist -> image_3, others -> 1, 2);
# camera 0 is the same view in both forms, the others need not be.
BRIDGE_CAMERAS = (0,)  # the fixed main camera
BRIDGE_LATENCY_FIXED = datetime(2021, 7, 23)  # data recorded before this had one frame of camera latency
BRIDGE_ID_PARTS = 7  # trajectory id: <scene>/<task>/<NN>/<date>/raw/traj_groupG/trajK, the same in both forms
RL_PROMPTS = 12_800  # PAPER.md "Stage 2": 1 epoch over 12.8K prompts


# ---- CRC-32C (Castagnoli), the checksum of TFRecord framing ----

def _crc32c_table():
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # reflected polynomial 0x1EDC6F41
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()
_CRC32C_TABLE_NP = np.array(_CRC32C_TABLE, dtype=np.uint32)


def _crc32c_scalar(data, crc=0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _gf2_apply(columns, x):
    """A linear map over GF(2)^32 given by the images of the 32 unit vectors, applied to x."""
    y, i = 0, 0
    while x:
        if x & 1:
            y ^= columns[i]
        x >>= 1
        i += 1
    return y


@functools.lru_cache(maxsize=64)
def _crc32c_shift_tables(n_bytes):
    """4 x 256 tables of the map 'CRC register -> register after feeding n_bytes zero bytes' (linear), by bytes
    of the register: shift(x) = T[0][x & 255] ^ T[1][x >> 8 & 255] ^ T[2][x >> 16 & 255] ^ T[3][x >> 24]."""
    one_zero = [_CRC32C_TABLE[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
    result, power, n = [1 << i for i in range(32)], one_zero, n_bytes  # identity, then square-and-multiply
    while n:
        if n & 1:
            result = [_gf2_apply(power, c) for c in result]
        power = [_gf2_apply(power, c) for c in power]
        n >>= 1
    return np.array([[_gf2_apply(result, v << (8 * k)) for v in range(256)] for k in range(4)], dtype=np.uint32)


def crc32c(data) -> int:
    """CRC-32C of bytes. Long inputs run as numpy lanes: the zero-initialized register is linear in the data,
    so K slices of L bytes are processed side by side and combined pairwise with crc(A + B) = shift_|B|(crc(A))
    ^ crc(B). Leading zero bytes leave a zero register unchanged, so the data is left-padded to K * L; the
    standard initial value 0xFFFFFFFF is the same as inverting the first 4 data bytes. ~100 MB/s on a CPU core."""
    n = len(data)
    if n < 4096:
        return _crc32c_scalar(data)
    lane = 1 << max(6, (-(-n // 2048) - 1).bit_length())  # bytes per lane (a power of two), ~2048 lanes
    lanes = 1 << (-(-n // lane) - 1).bit_length()
    buf = np.zeros(lanes * lane, dtype=np.uint8)
    buf[-n:] = np.frombuffer(data, dtype=np.uint8)
    buf[-n:-n + 4] ^= 0xFF
    columns = np.ascontiguousarray(buf.reshape(lanes, lane).T)  # row j = byte j of every lane
    reg = np.zeros(lanes, dtype=np.uint32)
    for row in columns:
        reg = _CRC32C_TABLE_NP[(reg ^ row) & 0xFF] ^ (reg >> 8)
    span = lane
    while len(reg) > 1:
        t = _crc32c_shift_tables(span)
        left = reg[0::2]
        reg = t[0][left & 0xFF] ^ t[1][(left >> 8) & 0xFF] ^ t[2][(left >> 16) & 0xFF] ^ t[3][left >> 24] ^ reg[1::2]
        span *= 2
    return int(reg[0]) ^ 0xFFFFFFFF


def masked_crc32c(data) -> int:
    """TFRecord's stored checksum: the CRC rotated right by 15 bits plus a constant (so a CRC of data that
    itself holds CRCs is not trivially related to them)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of the data ----

def iter_tfrecords(path, on_error=None):
    """(data offset in the file, data bytes) of each record of a TFRecord file, both checksums verified.

    A bad data checksum skips that record; a bad length checksum or a truncated record ends the file (record
    boundaries are lost). Each problem raises ValueError naming the file, record and byte offset, or, with
    on_error, is passed to on_error(message) and reading goes on with what is left."""
    def fail(message):
        if on_error is None:
            raise ValueError(message)
        on_error(message)

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos, index = 0, 0
        while pos < size:
            where = f"{path}: record {index} at byte {pos}"
            header = f.read(12)
            if len(header) < 12:
                fail(f"{where}: truncated header ({len(header)} of 12 bytes); the file ends here")
                return
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                fail(f"{where}: length checksum mismatch (stored {length_crc:#010x}, computed "
                     f"{masked_crc32c(header[:8]):#010x}); the rest of the file is skipped")
                return
            if pos + 12 + length + 4 > size:
                fail(f"{where}: truncated (the header announces {length} data bytes + 4 checksum bytes, "
                     f"the file has {size - pos - 12} left)")
                return
            data = f.read(length)
            (data_crc,) = struct.unpack("<I", f.read(4))
            if masked_crc32c(data) != data_crc:
                fail(f"{where}: data checksum mismatch (stored {data_crc:#010x}, computed "
                     f"{masked_crc32c(data):#010x}); record skipped")
            else:
                yield pos + 12, data
            pos += 12 + length + 4
            index += 1


# ---- tf.train.Example, decoded by hand (protobuf wire format) ----
# Example {Features features = 1}; Features {map<string, Feature> feature = 1} (entries: key = 1, value = 2);
# Feature {oneof: BytesList bytes_list = 1, FloatList float_list = 2, Int64List int64_list = 3};
# each list is `repeated value = 1`, floats and int64s packed or not.

def _varint(buf, pos):
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"protobuf: varint runs past the end of the data (byte {pos})")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"protobuf: varint longer than 10 bytes at byte {pos}")


def _proto_fields(buf, start, end):
    """(field number, wire type, value) of each field of the message buf[start:end]; value is the integer of
    a varint and the (start, end) span of the payload otherwise."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed 64 / 32 bit
            value = (pos, pos + (8 if wire == 1 else 4))
            pos = value[1]
        elif wire == 2:  # length-delimited
            n, pos = _varint(buf, pos)
            value = (pos, pos + n)
            pos += n
        else:
            raise ValueError(f"protobuf: unsupported wire type {wire} (field {field}) at byte {pos}")
        if pos > end:
            raise ValueError(f"protobuf: field {field} runs past the end of its message (byte {pos} > {end})")
        yield field, wire, value


def example_features(buf):
    """A serialized tf.train.Example -> {feature key: (start, end) span of its Feature message in buf}."""
    spans = {}
    for field, wire, features in _proto_fields(buf, 0, len(buf)):
        if field != 1 or wire != 2:
            continue
        for field2, wire2, entry in _proto_fields(buf, *features):
            if field2 != 1 or wire2 != 2:
                continue
            key, value = "", (entry[0], entry[0])  # protobuf defaults: empty key, empty Feature
            for field3, wire3, span in _proto_fields(buf, *entry):
                if wire3 == 2 and field3 == 1:
                    key = bytes(buf[span[0]:span[1]]).decode("utf-8")
                elif wire3 == 2 and field3 == 2:
                    value = span
            spans[key] = value
    return spans


def feature_value(buf, span, byte_spans=False):
    """A Feature message -> list of bytes (BytesList), float32 array (FloatList) or int64 array (Int64List).
    byte_spans=True gives BytesList items as (start, end) spans of buf instead of copies."""
    kind, value = None, None
    for field, wire, payload in _proto_fields(buf, *span):
        if wire == 2 and field in (1, 2, 3):
            kind, value = field, payload  # a oneof: the last one set wins
    if kind is None:
        return []
    items = list(_proto_fields(buf, *value))
    if kind == 1:
        spans = [s for field, wire, s in items if field == 1 and wire == 2]
        return spans if byte_spans else [bytes(buf[s:e]) for s, e in spans]
    if kind == 2:  # packed runs (wire 2) or single floats (wire 5), in order
        raw = b"".join(bytes(buf[v[0]:v[1]]) for field, wire, v in items if field == 1 and wire in (2, 5))
        if len(raw) % 4:
            raise ValueError(f"protobuf: FloatList of {len(raw)} bytes is not a whole number of floats")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    ints = []
    for field, wire, v in items:
        if field == 1 and wire == 0:
            ints.append(v)
        elif field == 1 and wire == 2:  # packed varints
            pos = v[0]
            while pos < v[1]:
                x, pos = _varint(buf, pos)
                ints.append(x)
    return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in ints], dtype=np.int64)  # two's complement


def parse_example(buf, keys=None):
    """A serialized tf.train.Example -> {key: list of bytes | float32 array | int64 array} (only `keys` if given)."""
    return {k: feature_value(buf, s) for k, s in example_features(buf).items() if keys is None or k in keys}


# ---- the two readers ----

def bridge_trajectory_id(path):
    """The last BRIDGE_ID_PARTS components of a raw trajectory path: the same for the raw directory and for
    the RLDS record converted from it (episode_metadata/file_path), wherever each copy lives."""
    return "/".join(os.path.normpath(str(path)).split(os.sep)[-BRIDGE_ID_PARTS:])


def bridge_instruction(text):
    """lang.txt's first line (or the RLDS instruction), stripped; "" means no language."""
    line = text.split("\n")[0].strip() if text else ""  # the first line even if empty, as the RLDS builder reads it
    return "" if line.lower().startswith("confidence") else line  # a file with only the annotator's confidence


def _binarize_gripper(g):
    """Octo / OpenVLA's Bridge gripper: > 0.95 open (1), < 0.05 closed (0), in between takes the next decided
    value (the last action's own value at the very end)."""
    out, carry = np.empty(len(g), dtype=np.float32), g[-1]
    for i in range(len(g) - 1, -1, -1):
        if g[i] > 0.95 or g[i] < 0.05:
            carry = float(g[i] > 0.95)
        out[i] = carry
    return out


def _log(message):
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks read the same files: log once
        print(message)


class _BridgeDataset:
    """Shared by BridgeRawDataset and BridgeRLDSDataset: episodes, skip bookkeeping, samples.

    Each episode: id, instruction, actions [T, 7], states [T, 7] (the per-sample states), plus where its
    frames are (reader-specific). Samples are LiberoDataset's: images (list of uint8 [H, W, 3], one per
    camera), instruction, state float32 [7], actions float32 [horizon, 7], action_mask bool [horizon],
    episode (the trajectory id), t."""

    ACTION_SPACES = ("recorded", "relabeled")

    def __init__(self, horizon, cameras, action_space, image_size):
        if action_space not in self.ACTION_SPACES:
            raise ValueError(f"action_space={action_space!r}: expected one of {self.ACTION_SPACES}")
        self.horizon, self.cameras, self.action_space, self.image_size = horizon, tuple(cameras), action_space, image_size
        self.episodes, self.skipped, self.problems = [], Counter(), []

    def _skip(self, reason, message):
        self.skipped[reason] += 1
        self.problems.append(message)

    def _add(self, episode_id, instruction, actions, states, **frames):
        """actions [T, 7] (T >= 1 real actions), states [T + 1, S] (the last one is reached after action T-1)."""
        if self.action_space == "relabeled":
            actions = np.concatenate([states[1:, :6] - states[:-1, :6], _binarize_gripper(actions[:, 6])[:, None]], axis=1)
        self.episodes.append(dict(id=episode_id, instruction=instruction, actions=np.asarray(actions, np.float32),
                                  states=np.asarray(states[:-1], np.float32), **frames))

    def _finish(self, what):
        lengths = [len(ep["actions"]) for ep in self.episodes]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # sample i of episode e: starts[e] + t
        self._episode_of = {ep["id"]: e for e, ep in enumerate(self.episodes)}
        if len(self._episode_of) != len(self.episodes):
            seen = Counter(ep["id"] for ep in self.episodes)
            raise ValueError(f"{type(self).__name__}: trajectory ids seen twice: {[i for i, n in seen.items() if n > 1][:5]} "
                             f"(the same trajectory given twice, e.g. overlapping paths?)")
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        _log(f"{type(self).__name__}: {len(self.episodes)} trajectories, {len(self)} samples from {what}; skipped: {skipped}")
        for message in self.problems[:20]:
            _log(f"  {message}")
        if len(self.problems) > 20:
            _log(f"  ... and {len(self.problems) - 20} more (the dataset's .problems)")
        if not self.episodes:
            raise ValueError(f"{type(self).__name__}: no usable trajectory in {what} (skipped: {skipped})")

    def __len__(self):
        return int(self._starts[-1])

    def frame_keys(self):
        """(trajectory id, t) of every sample, in dataset order (what a prompt manifest refers to)."""
        return [(ep["id"], t) for ep in self.episodes for t in range(len(ep["actions"]))]

    def index_of(self, episode_id, t):
        e = self._episode_of[episode_id]
        if not 0 <= t < len(self.episodes[e]["actions"]):
            raise KeyError((episode_id, t))
        return int(self._starts[e]) + t

    def _decode(self, data, where):
        try:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
        except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors
            raise ValueError(f"{where}: cannot decode the image ({e})") from e
        if self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.LANCZOS)
        return np.asarray(image, dtype=np.uint8)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i %= len(self)
        e = int(np.searchsorted(self._starts, i, side="right")) - 1
        ep, t = self.episodes[e], i - int(self._starts[e])
        actions, mask = chunk_at(ep["actions"], t, self.horizon)
        return dict(images=[self._image(ep, c, t) for c in range(len(self.cameras))], instruction=ep["instruction"],
                    state=ep["states"][t].copy(), actions=actions, action_mask=mask, episode=ep["id"], t=t)

    def all_actions(self):
        return np.concatenate([ep["actions"] for ep in self.episodes])

    def all_states(self):
        return np.concatenate([ep["states"] for ep in self.episodes])


class BridgeRawDataset(_BridgeDataset):
    """BridgeData V2's raw release: trajectory directories found under `paths` (directories, searched for
    traj_groupG/trajK; a trajectory directory itself; or a comma-separated string of these).

    cameras: indices C of the imagesC directories to return, main camera first. image_size: resize frames to
    image_size x image_size (None: as stored, 640 x 480 in the raw release, 256 x 256 in the RLDS one)."""

    def __init__(self, paths, horizon=16, cameras=BRIDGE_CAMERAS, action_space="recorded", image_size=None):
        super().__init__(horizon, cameras, action_space, image_size)
        paths = [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)
        trajectories = []
        for root in paths:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"BridgeRawDataset: {root!r} is not a directory")
            if any(os.path.exists(os.path.join(root, n)) for n in ("policy_out.pkl", "obs_dict.pkl", "images0")):
                trajectories.append(root)
                continue
            for dirpath, dirnames, _ in os.walk(root):
                if re.fullmatch(r"traj_group\d+", os.path.basename(dirpath)):
                    trajectories += [os.path.join(dirpath, d) for d in dirnames if re.fullmatch(r"traj\d+", d)]
                    dirnames[:] = []  # nothing to find inside trajectories (thousands of jpgs)
                else:
                    dirnames.sort()
        if not trajectories:
            raise FileNotFoundError(f"BridgeRawDataset: no .../raw/traj_groupG/trajK directories under {paths}")
        for traj in sorted(trajectories):
            self._load(traj)
        self._finish(", ".join(paths))

    def _load(self, traj):
        lang = os.path.join(traj, "lang.txt")
        if not os.path.isfile(lang):
            return self._skip("no language", f"{lang} not found: trajectory skipped (no language)")
        with open(lang, encoding="utf-8", errors="replace") as f:
            instruction = bridge_instruction(f.read())
        if not instruction:
            return self._skip("no language", f"{lang} has no instruction on its first line: trajectory skipped")
        pickles = {}
        for name in ("obs_dict.pkl", "policy_out.pkl"):
            path = os.path.join(traj, name)
            if not os.path.isfile(path):
                return self._skip("missing file", f"{path} not found: trajectory skipped")
            try:
                with open(path, "rb") as f:
                    pickles[name] = pickle.load(f, encoding="latin1")  # latin1: the early files are python 2 pickles
            except Exception as e:
                return self._skip("unreadable file", f"{path}: cannot be unpickled ({type(e).__name__}: {e}): trajectory skipped")
        obs, policy = pickles["obs_dict.pkl"], pickles["policy_out.pkl"]
        if not isinstance(obs, dict) or "full_state" not in obs:
            return self._skip("bad fields", f"{traj}/obs_dict.pkl has no 'full_state' (expected a dict of per-frame arrays)")
        try:
            states = np.asarray(obs["full_state"], dtype=np.float32)
            actions = np.asarray([p["actions"] if isinstance(p, dict) else p for p in policy], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            return self._skip("bad fields", f"{traj}/policy_out.pkl: expected a list of dicts with 'actions' "
                                            f"(7 floats) or of 7-float arrays ({type(e).__name__}: {e})")
        frames = []
        for c in self.cameras:
            image_dir = os.path.join(traj, f"images{c}")
            names = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
            n = sum(1 for name in names if re.fullmatch(r"im_\d+\.jpg", name))
            if n == 0 or any(f"im_{k}.jpg" not in names for k in range(n)):
                return self._skip("missing camera", f"{image_dir}: no im_0.jpg ... im_{{N-1}}.jpg frames: trajectory skipped")
            frames.append(n)
        n = frames[0]
        if actions.ndim != 2 or actions.shape[1] != 7 or states.ndim != 2 or len(set(frames)) > 1 \
                or len(states) != n or len(actions) != n - 1:
            return self._skip("inconsistent lengths", f"{traj}: cameras {self.cameras} have {frames} frames, full_state "
                                                      f"{states.shape}, actions {actions.shape}; expected N frames, [N, 7] "
                                                      f"states and [N-1, 7] actions: trajectory skipped")
        shift = 0
        try:  # the dated directory: .../<date>/raw/traj_groupG/trajK
            shift = int(datetime.strptime(os.path.normpath(traj).split(os.sep)[-4], "%Y-%m-%d_%H-%M-%S") < BRIDGE_LATENCY_FIXED)
        except (ValueError, IndexError):
            pass  # not in a dated directory: no latency correction
        if shift:  # frame k + 1 is what the camera saw when action k was chosen
            states, actions = states[1:], actions[:-1]
        if len(actions) == 0:
            return self._skip("too short", f"{traj}: {n} frames leave no action: trajectory skipped")
        self._add(bridge_trajectory_id(traj), instruction, actions, states, directory=traj, first_frame=shift)

    def _image(self, ep, c, t):
        path = os.path.join(ep["directory"], f"images{self.cameras[c]}", f"im_{t + ep['first_frame']}.jpg")
        return self._decode(path, path)


class BridgeRLDSDataset(_BridgeDataset):
    """BridgeData V2's RLDS / Open-X release (bridge_dataset/1.0.0/*.tfrecord-*) read without TensorFlow.

    paths: TFRecord files, globs, or directories holding them (comma-separated string or list). A directory
    holding several splits needs split="train" / "val" (or a glob such as .../bridge_dataset-train.tfrecord-*).
    The scan reads every record once (checksums verified) and keeps actions, states and the file offsets of
    the jpegs; a sample then reads and decodes only its own jpeg(s). index_cache: a file path keeping the scan's
    result for later runs, reused while the files (sizes, mtimes) and the options are the same."""

    def __init__(self, paths, horizon=16, cameras=BRIDGE_CAMERAS, action_space="recorded", image_size=None, split=None,
                 index_cache=""):
        super().__init__(horizon, cameras, action_space, image_size)
        self.files = bridge_tfrecord_files(paths, split)
        self._image_keys = [f"steps/observation/image_{c}" for c in self.cameras]
        # the scan is checksum-bound (~100 MB/s per process, ~20 min for the 124 GB release): index_cache, a file
        # path, keeps its result for the next run, valid while the files (size, mtime) and options are the same
        signature = [self.cameras, action_space,
                     [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.files]]
        cached = None
        if index_cache and os.path.isfile(index_cache):
            with open(index_cache, "rb") as f:
                cached = pickle.load(f)
        if cached is not None and cached["signature"] == signature:
            self.episodes, self.skipped, self.problems = cached["episodes"], cached["skipped"], cached["problems"]
        else:
            for path in self.files:
                for record, (offset, data) in enumerate(iter_tfrecords(path, on_error=lambda m: self._skip("corrupt record", m))):
                    self._load(path, record, offset, data)
            if index_cache:  # written whole, then renamed: concurrent ranks never read half a file
                os.makedirs(os.path.dirname(os.path.abspath(index_cache)), exist_ok=True)
                with open(f"{index_cache}.tmp{os.getpid()}", "wb") as f:
                    pickle.dump(dict(signature=signature, episodes=self.episodes, skipped=self.skipped,
                                     problems=self.problems), f)
                os.replace(f"{index_cache}.tmp{os.getpid()}", index_cache)
        self._finish(", ".join(self.files) if len(self.files) <= 3
                     else f"{len(self.files)} files in {os.path.dirname(self.files[0])}")

    def _load(self, path, record, offset, data):
        where = f"{path}: record {record} at byte {offset - 12}"
        try:
            spans = example_features(data)
            needed = ["steps/action", "steps/observation/state", "steps/language_instruction", *self._image_keys]
            missing = [k for k in needed if k not in spans]
            if missing:
                return self._skip("bad fields", f"{where}: no {missing} (this reader wants rail-berkeley's bridge_dataset "
                                                f"1.0.0 layout; the record has {sorted(spans)})")
            value = lambda key, **kw: feature_value(data, spans[key], **kw)
            if "episode_metadata/file_path" in spans and value("episode_metadata/file_path"):
                episode_id = bridge_trajectory_id(value("episode_metadata/file_path")[0].decode("utf-8"))
            else:
                episode_id = f"{os.path.basename(path)}:{record}"
            texts = value("steps/language_instruction")
            instruction = bridge_instruction(texts[0].decode("utf-8", errors="replace") if texts else "")
            if not instruction:
                return self._skip("no language", f"{where} ({episode_id}): empty language_instruction: trajectory skipped")
            for c, key in zip(self.cameras, self._image_keys):
                has = f"episode_metadata/has_image_{c}"
                if has in spans and not np.any(value(has)):  # the builder stores black frames for absent cameras
                    return self._skip("missing camera", f"{where} ({episode_id}): no camera {c} ({has} is false): "
                                                        "trajectory skipped")
            actions, states = value("steps/action"), value("steps/observation/state")
            images = [value(key, byte_spans=True) for key in self._image_keys]
        except ValueError as e:  # malformed protobuf or text (UnicodeDecodeError is a ValueError)
            return self._skip("corrupt record", f"{where}: cannot parse the tf.train.Example ({e})")
        steps = len(actions) // 7
        if len(actions) != 7 * steps or steps < 2 or len(states) % steps or any(len(im) != steps for im in images):
            return self._skip("inconsistent lengths", f"{where} ({episode_id}): steps/action has {len(actions)} floats, "
                                                      f"state {len(states)}, images {[len(im) for im in images]}: "
                                                      f"expected 7 * steps, S * steps and steps: trajectory skipped")
        # the last step holds the zero action the builder appends: T = steps - 1 samples, states up to step T
        jpegs = [np.array([(offset + s, e - s) for s, e in im[:steps - 1]], dtype=np.int64) for im in images]
        self._add(episode_id, instruction, actions.reshape(steps, 7)[:-1], states.reshape(steps, -1), file=path, jpegs=jpegs)

    def _image(self, ep, c, t):
        start, length = ep["jpegs"][c][t]
        with open(ep["file"], "rb") as f:
            f.seek(start)
            data = f.read(length)
        return self._decode(data, f"{ep['file']}: {ep['id']} camera {self.cameras[c]} step {t} (byte {start})")


def bridge_tfrecord_files(paths, split=None):
    """TFRecord files named by paths (files, globs, directories; a list or a comma-separated string)."""
    paths = [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.tfrecord*")))
            splits = sorted({m.group(1) for f in found for m in [re.search(r"-(\w+)\.tfrecord", os.path.basename(f))] if m})
            if split is not None:
                found = [f for f in found if f"-{split}.tfrecord" in os.path.basename(f)]
            elif len(splits) > 1:
                raise ValueError(f"{p} holds the splits {splits}: pass split=... or a glob such as "
                                 f"{os.path.join(p, '*-' + splits[-1] + '.tfrecord-*')}")
            files += found
        elif any(ch in p for ch in "*?["):
            files += sorted(glob.glob(p))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"BridgeRLDSDataset: {p!r} is neither a file, a glob nor a directory")
    if not files:
        raise FileNotFoundError(f"BridgeRLDSDataset: no *.tfrecord* files in {paths}"
                                + (f" for split {split!r}" if split else ""))
    return files


def open_bridge_dataset(paths, horizon=16, **kwargs):
    """The RLDS reader if paths name TFRecord files (or directories / globs of them), else the raw reader."""
    parts = [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)
    rlds = any(".tfrecord" in p or (os.path.isdir(p) and glob.glob(os.path.join(p, "*.tfrecord*"))) for p in parts)
    if rlds:
        return BridgeRLDSDataset(paths, horizon=horizon, **kwargs)
    kwargs.pop("split", None)  # the raw release has no splits: hold out directories instead
    return BridgeRawDataset(paths, horizon=horizon, **kwargs)


# ---- the RL prompt subset (PAPER.md "Stage 2": 12.8K prompts), fixed by a manifest ----

def sample_prompt_manifest(dataset, n=RL_PROMPTS, seed=0):
    """A seeded uniform sample of n (trajectory id, t) frames without replacement, drawn from the sorted list of
    all frames, so the raw and RLDS copies of the same data give the same subset. All frames if n exceeds them."""
    keys = sorted(dataset.frame_keys())
    if n >= len(keys):
        _log(f"sample_prompt_manifest: n={n} >= the {len(keys)} frames available: taking all of them")
        chosen = range(len(keys))
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(len(keys), size=n, replace=False))
    return dict(seed=seed, n=n, num_frames=len(keys), entries=[[keys[i][0], keys[i][1]] for i in chosen])


def save_prompt_manifest(path, manifest):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=0)


def load_prompt_manifest(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt manifest not found (write one with sample_prompt_manifest and "
                                "save_prompt_manifest)")
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        raise ValueError(f"{path}: expected a json object with 'entries': [[trajectory id, t], ...]")
    return manifest


class PromptSubset:
    """The samples of `dataset` a manifest (a dict or its json path) names, in the manifest's order."""

    def __init__(self, dataset, manifest):
        where = manifest if isinstance(manifest, str) else "the manifest"
        manifest = load_prompt_manifest(manifest) if isinstance(manifest, str) else manifest
        self.dataset, self.manifest, self.indices = dataset, manifest, []
        for k, (episode_id, t) in enumerate(manifest["entries"]):
            try:
                self.indices.append(dataset.index_of(episode_id, int(t)))
            except KeyError:
                raise KeyError(f"{where}: entry {k} ({episode_id!r}, t={t}) is not in the dataset (a different copy or "
                               f"subset of BridgeData, or different reader options?)") from None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


# -----------------------------------------------------------------------------
# LLaVA-style conversations (VQA and zero-shot reasoning data): a .json list or .jsonl of
# {"image": path or [paths], "conversations": [{"from": "human", "value": "<image>\n..."},
#  {"from": "gpt", "value": "..."}, ...]}. Each human -> gpt turn becomes one sample with the images.

class ConversationDataset:
    def __init__(self, path, image_root=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ConversationDataset: {path} not found")
        self.path, self.image_root = path, image_root or os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            try:
                if path.endswith(".jsonl"):
                    records = []
                    for n, line in enumerate(f, 1):
                        where = f"line {n}"
                        if line.strip():
                            records.append(json.loads(line))
                else:
                    where = "the file"
                    records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {where} is not valid json ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a json list of records (or .jsonl), got {type(records).__name__}")
        self.samples = []
        for r, rec in enumerate(records):
            turns = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(turns, list) or len(turns) < 2:
                raise ValueError(f"{path}: record {r} needs 'conversations' with at least a human and a gpt turn")
            images = rec.get("image", [])
            images = [images] if isinstance(images, str) else list(images)
            if len(turns) % 2:
                raise ValueError(f"{path}: record {r} has {len(turns)} turns, expected human / gpt pairs")
            prompts, responses = [], []
            for k in range(0, len(turns), 2):
                q, a = turns[k], turns[k + 1]
                if not isinstance(q, dict) or not isinstance(a, dict) or q.get("from") != "human" or a.get("from") != "gpt":
                    raise ValueError(f"{path}: record {r} turn {k}: expected {{'from': 'human'}} then {{'from': 'gpt'}}, "
                                     f"got {q!r:.80} then {a!r:.80}")
                if k and "<image>" in q.get("value", ""):
                    raise ValueError(f"{path}: record {r} turn {k}: <image> after the first turn (images go with the first)")
                prompts.append(q["value"].replace("<image>", "").strip())
                responses.append(a["value"].strip())
            # one sample per conversation: a multi-turn one is trained as one sequence, loss on every gpt turn
            # (LLaVA's preprocess); a single turn stays a plain string
            one = len(prompts) == 1
            self.samples.append(dict(image_paths=images, prompt=prompts[0] if one else prompts,
                                     response=responses[0] if one else responses, record=r))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        images = []
        for p in s["image_paths"]:
            full = p if os.path.isabs(p) else os.path.join(self.image_root, p)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{self.path}: record {s['record']}: image {full} not found")
            try:
                images.append(np.asarray(Image.open(full).convert("RGB")))
            except (OSError, SyntaxError, ValueError) as e:  # PIL: unreadable or truncated image data
                raise OSError(f"{self.path}: record {s['record']}: image {full} cannot be decoded ({e})") from e
        return dict(images=images, prompt=s["prompt"], response=s["response"])


# -----------------------------------------------------------------------------
# Prompts and example builders, shared so SFT, RL and the VLA see the same wording.

ACTION_PROMPT = "What action should the robot take to {instruction}?"  # SFT action data and the VLA
REASONING_ACTION_PROMPT = ("What action should the robot take to {instruction}? Reason about the scene inside "
                           "<think></think>, then give the action tokens inside <answer></answer>.")  # RL (Stage 2)


def fast_target(sample, fast_tokenizer, norm_stats):
    """The demonstration chunk of a robot sample as FAST ids (normalized units, PAPER.md Stage 0)."""
    return fast_tokenizer.encode(norm_stats.normalize_actions(sample["actions"]))


def collate_robot(samples, norm_stats):
    """Robot samples -> the batch VLA.loss takes: normalized state [B, S] and actions [B, H, D] (numpy)."""
    return dict(images=[s["images"] for s in samples], instructions=[s["instruction"] for s in samples],
                state=norm_stats.normalize_state(np.stack([s["state"] for s in samples])),
                actions=norm_stats.normalize_actions(np.stack([s["actions"] for s in samples])),
                action_mask=np.stack([s["action_mask"] for s in samples]))


def open_robot_dataset(kind, path, horizon, **kwargs):
    """kind 'libero' (hdf5 files / dirs / globs), 'calvin' (a split directory) or 'bridge' (raw trajectory
    directories or RLDS tfrecord files, see the BridgeData V2 section)."""
    if kind == "libero":
        return LiberoDataset(path, horizon=horizon, **kwargs)
    if kind == "calvin":
        return CalvinDataset(path, horizon=horizon, **kwargs)
    if kind == "bridge":
        return open_bridge_dataset(path, horizon=horizon, **kwargs)
    raise ValueError(f"unknown robot dataset kind {kind!r}: expected 'libero', 'calvin' or 'bridge'")


def prefix_match_reward(pred_fast_ids, target_fast_ids) -> float:
    """r_action (PAPER.md Stage 2), also sft.py's held-out `action_prefix`: the longest common prefix of the
    predicted and target FAST ids divided by the target length m. Edge cases (PAPER.md): an unparsable
    answer (None) or a wrong first token -> 0; tokens beyond the target add nothing; an answer shorter
    than the target scores its matched prefix only."""
    if len(target_fast_ids) == 0:
        raise ValueError("prefix_match_reward: the target FAST sequence is empty")
    if pred_fast_ids is None:
        return 0.0
    matched = 0
    for p, t in zip(pred_fast_ids, target_fast_ids):
        if int(p) != int(t):
            break
        matched += 1
    return matched / len(target_fast_ids)


_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ACTION_SPAN = re.compile(r"\s*<ACTION_START>(.*?)<ACTION_END>\s*", re.DOTALL)


def format_reward(text, require_action=False) -> float:
    """r_format (PAPER.md Stage 2): 1.0 if `text` is exactly <think>...</think><answer>...</answer> (whitespace
    around the tags allowed, nothing else, no tag repeated or nested, both parts non-empty), else 0.0.
    require_action=True: the answer must also be exactly one <ACTION_START>...<ACTION_END> span."""
    m = _THINK_ANSWER.fullmatch(text)
    if m is None:
        return 0.0
    think, answer = m.groups()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if not think.strip() or not answer.strip() or any(tag in think or tag in answer for tag in tags):
        return 0.0
    if require_action:
        span = _ACTION_SPAN.fullmatch(answer)
        if span is None or "<ACTION_START>" in span.group(1) or "<ACTION_END>" in span.group(1):
            return 0.0
    return 1.0


# -----------------------------------------------------------------------------
# The embedded default: a top-down tabletop with four coloured blocks. Each task is "put the A block
# on the B block"; the scripted demonstration moves above A (aligning its yaw), descends, closes,
# lifts, moves above B, descends, opens and lifts, with smoothed velocity commands in [-1, 1] like
# LIBERO's delta actions. Which way to move depends on where A and B are in *this* image, so a model
# that ignores the image (or the instruction) cannot predict the actions.

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SYNTH_TASKS = [("red", "blue"), ("blue", "green"), ("green", "yellow"), ("yellow", "red"), ("red", "green"), ("blue", "yellow")]
TABLE, BLOCK, STEP = 0.25, 0.05, 0.03   # table half-size, block size, max displacement per step (metres)
HOVER, GRASP_Z, PLACE_Z = 0.12, 0.02, 0.06
AGENT_SPAN, WRIST_SPAN = 0.30, 0.12      # half-width of the area each camera sees
HOME_JITTER = 0.02                        # start within +-2 cm of the table centre
SCENE_JITTER, YAW_JITTER = 0.01, 0.1      # blocks within +-1 cm / +-0.1 rad of their task's scene (LIBERO's init
                                          # regions are ~2 cm boxes)
FINGER_OPEN = 0.04                        # finger joint position when open; it closes or opens over 3 steps


def _render(blocks, held, gripper, center, span, size):
    """Top-down orthographic render: +x right, +y up in the image. The gripper is a ring whose radius
    grows with height, white when open, black when closed; a held block is drawn under it."""
    u = (np.arange(size) + 0.5) / size * 2 - 1
    px, py = center[0] + u[None, :] * span, center[1] - u[:, None] * span
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (150, 120, 90)
    img[(np.abs(px) > TABLE + 0.03) | (np.abs(py) > TABLE + 0.03)] = (60, 60, 60)
    for name, (x, y, yaw) in blocks.items():
        if name == held:
            x, y = gripper[0], gripper[1]
        c, s = math.cos(yaw), math.sin(yaw)
        lu, lv = (px - x) * c + (py - y) * s, -(px - x) * s + (py - y) * c
        img[(np.abs(lu) < BLOCK / 2) & (np.abs(lv) < BLOCK / 4)] = COLORS[name]  # 2:1 bars show the yaw
    r = np.hypot(px - gripper[0], py - gripper[1])
    radius = 0.012 + 0.1 * gripper[2]
    ring = (r > radius) & (r < radius + max(0.008, 1.5 * span / size))
    img[ring] = (0, 0, 0) if gripper[4] > 0 else (255, 255, 255)
    # the gripper's yaw: a short tick in the ring's colour
    c, s = math.cos(gripper[3]), math.sin(gripper[3])
    along = (px - gripper[0]) * c + (py - gripper[1]) * s
    across = -(px - gripper[0]) * s + (py - gripper[1]) * c
    img[(np.abs(across) < span / size) & (np.abs(along) < radius) & (np.abs(along) > radius * 0.4)] = img[ring][0] if ring.any() else 0
    return img


def _relation(dx, dy, tol=0.015):
    words = []
    if dy > tol:
        words.append("behind")
    elif dy < -tol:
        words.append("in front of")
    if dx > tol:
        words.append("right of")
    elif dx < -tol:
        words.append("left of")
    return " and ".join(words) if words else "right under"


def _move_words(dx, dy, tol=0.015):
    words = [w for w, cond in (("back", dy > tol), ("forward", dy < -tol), ("right", dx > tol), ("left", dx < -tol)) if cond]
    return " and ".join(words)


def _task_scene(rng):
    """A task's fixed scene: four blocks at least 0.1 m apart, away from the table edge (x, y, yaw each)."""
    while True:
        pos = rng.uniform(-TABLE + 0.04, TABLE - 0.04, size=(4, 2))
        if min(np.hypot(*(pos[i] - pos[j])) for i in range(4) for j in range(i)) > 0.1:
            return {name: (pos[i, 0], pos[i, 1], rng.uniform(-math.pi / 4, math.pi / 4)) for i, name in enumerate(COLORS)}


def _synthetic_episode(rng, task, scene, noise=0.01):
    """One scripted demonstration: dict of arrays in the LIBERO layout plus per-step phase notes."""
    pick, place = task
    # like a LIBERO task, each task has one scene and every episode places the blocks within a small region of it
    blocks = {name: (x + rng.uniform(-SCENE_JITTER, SCENE_JITTER), y + rng.uniform(-SCENE_JITTER, SCENE_JITTER),
                     yaw + rng.uniform(-YAW_JITTER, YAW_JITTER)) for name, (x, y, yaw) in scene.items()}
    # the arm starts near a home pose above the table centre, as LIBERO's init states do: a random start would
    # add two input dimensions the head must generalize over from a few hundred demonstrations
    g = np.array([*rng.uniform(-HOME_JITTER, HOME_JITTER, 2), HOVER + rng.uniform(0, 0.04), 0.0, -1.0])  # x, y, z, yaw, grip
    (ax, ay, ayaw), (bx, by, _) = blocks[pick], blocks[place]
    # waypoints: (target xyz, target yaw, gripper command, phase)
    plan = [((ax, ay, HOVER), ayaw, -1, "reach"), ((ax, ay, GRASP_Z), ayaw, -1, "descend"), (None, ayaw, 1, "grasp"),
            ((ax, ay, HOVER), ayaw, 1, "lift"), ((bx, by, HOVER), ayaw, 1, "carry"), ((bx, by, PLACE_Z), ayaw, 1, "lower"),
            (None, ayaw, -1, "release"), ((bx, by, HOVER), ayaw, -1, "retreat")]
    frames, prev = [], np.zeros(6)
    held, finger = None, FINGER_OPEN
    for target, yaw, grip, phase in plan:
        for k in range(40):
            if target is None:  # close or open in place over 3 steps
                if k == 3:
                    break
                cmd = np.zeros(6)
            else:
                delta = np.array([*target]) - g[:3]
                if np.abs(delta).max() < 0.004 and abs(yaw - g[3]) < 0.02:
                    break
                cmd = np.concatenate([np.clip(delta / STEP, -1, 1), [0, 0, np.clip((yaw - g[3]) / 0.15, -1, 1)]])
            cmd = 0.5 * prev + 0.5 * cmd  # smooth like a human teleoperator's velocity commands
            jitter = rng.normal(0, noise, 6) * np.array([1, 1, 1, 0, 0, 1]) * (target is not None)  # rx, ry stay 0
            action = np.concatenate([cmd + jitter, [grip]])
            frames.append(dict(g=g.copy(), held=held, finger=finger, action=action, phase=phase))
            prev = cmd
            g[:3] += cmd[:3] * STEP
            g[3] += cmd[5] * 0.15
            g[4] = grip
            finger = float(np.clip(finger - grip * FINGER_OPEN / 3, 0.0, FINGER_OPEN))
            if phase == "grasp" and k == 2:
                held = pick
            if phase == "release" and k == 2:
                held = None
    return blocks, frames


def _write_episode(group, blocks, frames, image_size, task):
    T = len(frames)
    agent = np.stack([_render(blocks, f["held"], f["g"], (0.0, 0.0), AGENT_SPAN, image_size) for f in frames])
    wrist = np.stack([_render(blocks, f["held"], f["g"], f["g"][:2], WRIST_SPAN, image_size) for f in frames])
    gs = np.stack([f["g"] for f in frames])
    finger = np.array([[f["finger"]] for f in frames])  # gripper_states are finger joint positions, as LIBERO's
    ee_states = np.concatenate([gs[:, :3], np.zeros((T, 2)), gs[:, 3:4]], axis=1)  # pos + axis-angle (yaw only)
    obs = group.create_group("obs")
    chunked = dict(chunks=(1, image_size, image_size, 3), compression="gzip", compression_opts=1)
    obs.create_dataset("agentview_rgb", data=agent, **chunked)
    obs.create_dataset("eye_in_hand_rgb", data=wrist, **chunked)
    obs.create_dataset("ee_states", data=ee_states.astype(np.float64))
    obs.create_dataset("ee_pos", data=gs[:, :3])
    obs.create_dataset("ee_ori", data=ee_states[:, 3:])
    obs.create_dataset("gripper_states", data=np.concatenate([finger, -finger], axis=1))
    obs.create_dataset("joint_states", data=np.tanh(np.concatenate([gs[:, :4], gs[:, :3]], axis=1)))  # a stand-in arm
    quat = np.stack([np.cos(gs[:, 3] / 2), np.zeros(T), np.zeros(T), np.sin(gs[:, 3] / 2)], axis=1)
    group.create_dataset("actions", data=np.stack([f["action"] for f in frames]).astype(np.float64))
    group.create_dataset("robot_states", data=np.concatenate([finger, -finger, gs[:, :3], quat], axis=1))
    scene = np.array([v for b in blocks.values() for v in b])
    group.create_dataset("states", data=np.concatenate([np.repeat(scene[None], T, 0), gs], axis=1))
    group.create_dataset("rewards", data=np.eye(T, dtype=np.uint8)[-1])
    group.create_dataset("dones", data=np.eye(T, dtype=np.uint8)[-1])
    # per-step reasoning annotations (an extension of the LIBERO layout, like ECoT's): LiberoDataset exposes them
    group.create_dataset("reasoning", data=[_scene_thought(blocks, f, task)[0] for f in frames], dtype=h5py.string_dtype())
    group.attrs["num_samples"] = T
    return agent, wrist


def _scene_thought(blocks, frame, task):
    """What the image shows and what to do next, in words (DESIGN.md "embedded default"): (thought, answer)."""
    pick, place = task
    g, phase = frame["g"], frame["phase"]
    target = pick if phase in ("reach", "descend", "grasp") else place
    tx, ty, _ = blocks[target]
    rel, move = _relation(tx - g[0], ty - g[1]), _move_words(tx - g[0], ty - g[1])
    state = "closed and holding the " + pick + " block" if frame["held"] else ("closed" if g[4] > 0 else "open")
    answer = {"reach": f"move {move} above the {pick} block" if move else f"turn to line up with the {pick} block",
              "descend": f"move down onto the {pick} block", "grasp": "close the gripper",
              "lift": "lift the block up", "carry": f"move {move} above the {place} block" if move else "hold still",
              "lower": f"move down onto the {place} block", "release": "open the gripper",
              "retreat": "move up away from the blocks"}[phase]
    return f"The gripper is {state}. The {target} block is {rel} the gripper. So the robot should {answer}.", answer


def _vqa(rng, blocks, frame):
    g = frame["g"]
    name = list(COLORS)[rng.integers(len(COLORS))]
    x, y, _ = blocks[name]
    nearest = min(COLORS, key=lambda c: np.hypot(blocks[c][0] - g[0], blocks[c][1] - g[1]) + 9 * (c == frame["held"]))
    return [("What colour is the block closest to the gripper?", f"The {nearest} block."),
            (f"Where is the {name} block relative to the gripper?", f"It is {_relation(x - g[0], y - g[1])} the gripper."),
            ("Is the gripper open or closed?", "Closed." if g[4] > 0 else "Open.")][rng.integers(3)]


SYNTHETIC_VERSION = 4  # 2: home start pose; 3: per-step reasoning in the hdf5 files; 4: a scene per task, gradual fingers


def make_synthetic_dataset(out_dir, seed=0, demos_per_task=64, val_demos_per_task=4, image_size=56,
                           qa_per_demo=6, tasks=None):
    """Write the embedded default dataset to out_dir (skipped if an identical one is already there):

        libero/{train,val}/<task>_demo.hdf5     LIBERO layout, one file per task, plus data/demo_i/reasoning:
                                                one thought per step (what the image shows, what to do next)
        vqa_{train,val}.json, reasoning_{train,val}.json, images/...png   LLaVA-style conversations
        dataset.json                            what was generated (the arguments below)

    Returns the dataset.json content. Deterministic per seed.
    """
    tasks = [tuple(t) for t in (tasks or SYNTH_TASKS)]
    meta = dict(version=SYNTHETIC_VERSION, seed=seed, demos_per_task=demos_per_task, val_demos_per_task=val_demos_per_task,
                image_size=image_size, qa_per_demo=qa_per_demo, tasks=[list(t) for t in tasks])
    meta_path = os.path.join(out_dir, "dataset.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return meta
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n_demos in (("train", demos_per_task), ("val", val_demos_per_task)):
        os.makedirs(os.path.join(tmp, "libero", split))
        os.makedirs(os.path.join(tmp, "images", split))
        vqa, reasoning = [], []
        for task_index, task in enumerate(tasks):
            instruction = f"put the {task[0]} block on the {task[1]} block"
            name = instruction.replace(" ", "_")
            rng = np.random.default_rng([seed, task_index, split == "val"])
            scene = _task_scene(np.random.default_rng([seed, task_index, 2]))  # shared by train and val
            with h5py.File(os.path.join(tmp, "libero", split, f"{name}_demo.hdf5"), "w") as f:
                data = f.create_group("data")
                data.attrs["problem_info"] = json.dumps(dict(problem_name="synthetic_blocks", domain_name="roboalign_synthetic",
                                                             language_instruction=instruction))
                data.attrs["env_name"] = "roboalign_synthetic_blocks"
                data.attrs["bddl_file_name"] = ""
                total = 0
                for d in range(n_demos):
                    blocks, frames = _synthetic_episode(rng, task, scene)
                    agent, wrist = _write_episode(data.create_group(f"demo_{d}"), blocks, frames, image_size, task)
                    total += len(frames)
                    for q in range(qa_per_demo):  # conversations about random frames of this demo
                        t = int(rng.integers(len(frames)))
                        stem = f"images/{split}/{name}_{d}_{t}"
                        for cam, img in (("agent", agent[t]), ("wrist", wrist[t])):
                            if not os.path.exists(os.path.join(tmp, f"{stem}_{cam}.png")):
                                Image.fromarray(img).save(os.path.join(tmp, f"{stem}_{cam}.png"))
                        if q % 2 == 0:
                            question, answer = _vqa(rng, blocks, frames[t])
                            vqa.append({"id": f"{name}_{d}_{t}_vqa", "image": f"{stem}_agent.png",
                                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                          {"from": "gpt", "value": answer}]})
                        else:
                            reasoning.append({"id": f"{name}_{d}_{t}_reason", "image": [f"{stem}_agent.png", f"{stem}_wrist.png"],
                                              "conversations": [{"from": "human", "value": "<image>\n" + REASONING_ACTION_PROMPT
                                                                 .replace(" give the action tokens", " say what to do")
                                                                 .format(instruction=instruction)},
                                                                {"from": "gpt", "value": "<think>{}</think><answer>{}</answer>".format(
                                                                    *_scene_thought(blocks, frames[t], task))}]})
                data.attrs["num_demos"], data.attrs["total"] = n_demos, total
        for kind, records in (("vqa", vqa), ("reasoning", reasoning)):
            with open(os.path.join(tmp, f"{kind}_{split}.json"), "w") as f:
                json.dump(records, f, indent=0)
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return meta


def ensure_synthetic_dataset(out_dir, seed=0, rank=0, **kwargs):
    """Rank 0 generates (or reuses) the embedded default; other ranks wait for it."""
    if rank == 0:
        make_synthetic_dataset(out_dir, seed=seed, **kwargs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir

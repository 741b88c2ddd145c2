"""RoboAlign data and run plumbing, shared by every stage script.

    run plumbing      configure (nanoGPT configurator), setup_distributed, global_batch_indices,
                      cosine_lr, rng_state, save_checkpoint (journaled), MetricsLogger
    NormStats         per-dimension q01/q99 normalization of actions and proprio state to [-1, 1]
    readers           LiberoDataset (LIBERO's hdf5 layout: the one robot-data format, prepare/ writes it for
                      BridgeData V2 and the embedded default), CalvinDataset (read natively: too large to copy),
                      ConversationDataset (LLaVA-style json / jsonl)
    prompts, rewards  the prompt templates and rewards sft.py / align_rl.py / train_vla.py share

The robot reader interface (what every stage uses, and all it uses): len(ds); ds[i] -> a sample dict with
images (list of uint8 [H, W, 3], third-person camera first, then wrist), instruction (str), state (float32 [S]),
actions (float32 [horizon, D], starting at t, padded at the episode end by repeating the last action),
action_mask (bool [horizon], False on padding), episode (str), t (int); ds.targets(i) -> (state, actions,
action_mask) without decoding images; ds.demonstrations(max_steps, seed) -> [(actions [T, D], states [T, S]), ...]
whole demonstrations for NormStats and the FAST fit; ds.files, what it reads (for cache fingerprints).
Actions are in the dataset's own units.
"""

import ast
import glob
import json
import math
import os
import random
import re
import shutil
import sys
import time

import h5py
import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# Run plumbing: configuration, distributed set-up, deterministic data order, atomic checkpoints,
# metrics (nanoGPT style: karpathy/nanoGPT train.py, configurator.py).

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


def log0(message):
    """Print once: torchrun's other ranks read the same files."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def check_data_dir(data_dir: str) -> None:
    """The stages' default data is the embedded default, which prepare/synthetic.py writes (nanoGPT's prepare.py)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir={data_dir!r} not found: write the embedded default with "
                                f"`python prepare/synthetic.py --out_dir={data_dir}`, or point --data_dir at your data")


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
# openpi src/openpi/transforms.py Normalize). Computed once over the training demonstrations, saved with every checkpoint.

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
    assert 0 <= t < T and horizon >= 1, (t, T, horizon)
    idx = np.minimum(np.arange(t, t + horizon), T - 1)
    return np.asarray(actions[idx], dtype=np.float32), np.arange(t, t + horizon) < T


# -----------------------------------------------------------------------------
# LIBERO: the official hdf5 layout (Lifelong-Robot-Learning/LIBERO:scripts/create_dataset.py), one file per task.

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

    def __init__(self, paths, horizon=16, cameras=None, state_keys=LIBERO_STATE_KEYS,
                 action_dim=7, flip_images=False, no_noops=False):
        self.files = _expand_paths(paths, "*.hdf5", "LiberoDataset")
        self.horizon, self.state_keys, self.flip_images = horizon, tuple(state_keys), flip_images
        self.cameras = None if cameras is None else tuple(cameras)  # None: the LIBERO_CAMERAS of the first demo
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
                file_instruction = None
                for demo in _sorted_demos(f["data"]):
                    g, where = f["data"][demo], f"{path}: data/{demo}"
                    instruction = g.attrs.get("language_instruction")  # per demo (prepare/bridge.py), else the file's
                    if not instruction:
                        file_instruction = file_instruction or self._instruction(f["data"], path)
                        instruction = file_instruction
                    if self.cameras is None:
                        self.cameras = tuple(c for c in LIBERO_CAMERAS if f"obs/{c}" in g)
                        if not self.cameras:
                            raise KeyError(f"{where}/obs has none of the cameras {LIBERO_CAMERAS}")
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
            log0(f"LiberoDataset: no_noops dropped {self.num_noops} of {total} steps ({', '.join(self.files[:2])}"
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

    def targets(self, i):
        e, t = self.index[i]
        ep = self.episodes[e]
        return (ep["states"][t], *chunk_at(ep["actions"], t, self.horizon))

    def demonstrations(self, max_steps=None, seed=0):
        return [(ep["actions"], ep["states"]) for ep in self.episodes]  # in memory already

    def all_actions(self):
        return np.concatenate([ep["actions"] for ep in self.episodes])

    def all_states(self):
        return np.concatenate([ep["states"] for ep in self.episodes])


# -----------------------------------------------------------------------------
# CALVIN: one episode_XXXXXXX.npz per frame, language windows in lang_annotations/auto_lang_ann.npy
# (mees/calvin calvin_models/calvin_agent/evaluation/evaluate_policy.py). Only the annotated windows are used, as in CALVIN's language-conditioned
# training; rel_actions keep CALVIN's gripper convention (+1 open, -1 close), which eval_calvin.py's
# default gripper_convention="calvin" expects.

CALVIN_CAMERAS = ("rgb_static", "rgb_gripper")


class CalvinDataset:
    def __init__(self, root, horizon=16, cameras=CALVIN_CAMERAS, action_key="rel_actions", state_key="robot_obs"):
        self.root, self.horizon, self.cameras, self.files = root, horizon, tuple(cameras), [root]
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

    def targets(self, i):
        sample = self[i]
        return sample["state"], sample["actions"], sample["action_mask"]

    def demonstrations(self, max_steps=200_000, seed=0):
        """Whole language windows in a seeded order until max_steps frames (a full ABC scan reads ~1M files)."""
        demos, n_frames = [], 0
        for w in np.random.default_rng(seed).permutation(len(self.windows)):
            start, end, _ = self.windows[w]
            frames = [self.frame(t) for t in range(start, end + 1)]
            actions = np.stack([f[self.action_key] for f in frames]).astype(np.float32)
            states = np.stack([f[self.state_key] for f in frames]).astype(np.float32)
            for key, values in ((self.action_key, actions), (self.state_key, states)):
                check_finite(values, f"{self.root}: {key} of frames {start}..{end}")
            demos.append((actions, states))
            n_frames += len(frames)
            if max_steps and n_frames >= max_steps:
                break
        return demos


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
    """The demonstration chunk of a robot sample as FAST ids (normalized units, arXiv 2603.21341 stage 0)."""
    return fast_tokenizer.encode(norm_stats.normalize_actions(sample["actions"]))


def open_robot_dataset(kind, path, horizon, **kwargs):
    """kind 'libero' (hdf5 files / dirs / globs in LIBERO's layout: LIBERO itself, and what prepare/ writes for
    BridgeData V2 and the embedded default) or 'calvin' (a split directory)."""
    if kind == "libero":
        return LiberoDataset(path, horizon=horizon, **kwargs)
    if kind == "calvin":
        return CalvinDataset(path, horizon=horizon, **kwargs)
    if kind == "bridge":
        raise ValueError("robot_data='bridge': convert BridgeData V2 once with `python prepare/bridge.py --src=... "
                         "--out_dir=...`, then read the result with robot_data='libero'")
    raise ValueError(f"unknown robot dataset kind {kind!r}: expected 'libero' or 'calvin'")


def prefix_match_reward(pred_fast_ids, target_fast_ids) -> float:
    """r_action (arXiv 2603.21341 stage 2), also sft.py's held-out `action_prefix`: the longest common prefix of the
    predicted and target FAST ids divided by the target length m. Edge cases (arXiv 2603.21341): an unparsable
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
    """r_format (arXiv 2603.21341 stage 2): 1.0 if `text` is exactly <think>...</think><answer>...</answer> (whitespace
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

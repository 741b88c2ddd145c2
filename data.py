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
                return cls(json.load(f))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from e


def chunk_at(actions, t, horizon):
    """actions[t : t + horizon], padded by repeating the last action; mask is False on the padding."""
    T = len(actions)
    idx = np.minimum(np.arange(t, t + horizon), T - 1)
    return np.asarray(actions[idx], dtype=np.float32), np.arange(t, t + horizon) < T


# -----------------------------------------------------------------------------
# LIBERO: the official hdf5 layout (REFERENCES.md section 7), one file per task.

LIBERO_CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
LIBERO_STATE_KEYS = ("ee_states", "gripper_states")  # eef pos + axis-angle (6) + finger qpos (2), as openpi


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
    """

    def __init__(self, paths, horizon=16, cameras=LIBERO_CAMERAS, state_keys=LIBERO_STATE_KEYS,
                 action_dim=7, flip_images=False):
        self.files = _expand_paths(paths, "*.hdf5", "LiberoDataset")
        self.horizon, self.cameras, self.state_keys, self.flip_images = horizon, tuple(cameras), tuple(state_keys), flip_images
        self.episodes = []  # dicts: file, demo, instruction, actions [T, D], states [T, S]
        for path in self.files:
            with h5py.File(path, "r") as f:
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
                    states = []
                    for key in self.state_keys:
                        if f"obs/{key}" not in g:
                            raise KeyError(f"{where}/obs/{key} missing (state keys {self.state_keys})")
                        s = np.asarray(g["obs"][key], dtype=np.float32)
                        if s.ndim != 2 or len(s) != len(actions):
                            raise ValueError(f"{where}/obs/{key} has shape {s.shape}, expected [T={len(actions)}, k]")
                        states.append(s)
                    for cam in self.cameras:
                        shape = g["obs"][cam].shape if f"obs/{cam}" in g else None
                        if shape is None or len(shape) != 4 or shape[0] != len(actions) or shape[3] != 3:
                            raise ValueError(f"{where}/obs/{cam} has shape {shape}, expected uint8 [T={len(actions)}, H, W, 3]")
                    self.episodes.append(dict(file=path, demo=demo, instruction=instruction, actions=actions,
                                              states=np.concatenate(states, axis=1)))
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
        images = [np.asarray(obs[cam][t], dtype=np.uint8) for cam in self.cameras]
        if self.flip_images:
            images = [np.ascontiguousarray(im[::-1, ::-1]) for im in images]
        actions, mask = chunk_at(ep["actions"], t, self.horizon)
        return dict(images=images, instruction=ep["instruction"], state=ep["states"][t].copy(), actions=actions,
                    action_mask=mask, episode=f"{os.path.basename(ep['file'])}:{ep['demo']}", t=t)

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
        return np.stack([self.frame(t)[key] for s, e, _ in self.windows for t in range(s, e + 1, step)]).astype(np.float32)

    def all_actions(self, step=1):
        """Every annotated frame's action (step > 1 subsamples: a full ABC scan reads ~1M files)."""
        return self._scan(self.action_key, step)

    def all_states(self, step=1):
        return self._scan(self.state_key, step)


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
            if path.endswith(".jsonl"):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a json list of records (or .jsonl), got {type(records).__name__}")
        self.samples = []
        for r, rec in enumerate(records):
            turns = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(turns, list) or len(turns) < 2:
                raise ValueError(f"{path}: record {r} needs 'conversations' with at least a human and a gpt turn")
            images = rec.get("image", [])
            images = [images] if isinstance(images, str) else list(images)
            for k in range(0, len(turns) - 1, 2):
                q, a = turns[k], turns[k + 1]
                if q.get("from") != "human" or a.get("from") != "gpt":
                    raise ValueError(f"{path}: record {r} turn {k}: expected human then gpt, "
                                     f"got {q.get('from')!r} then {a.get('from')!r}")
                prompt = q["value"].replace("<image>", "").strip()
                self.samples.append(dict(image_paths=images, prompt=prompt, response=a["value"].strip(), record=r))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        images = []
        for p in s["image_paths"]:
            full = p if os.path.isabs(p) else os.path.join(self.image_root, p)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{self.path}: record {s['record']}: image {full} not found")
            images.append(np.asarray(Image.open(full).convert("RGB")))
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
    """kind 'libero' (hdf5 files / dirs / globs) or 'calvin' (a split directory)."""
    if kind == "libero":
        return LiberoDataset(path, horizon=horizon, **kwargs)
    if kind == "calvin":
        return CalvinDataset(path, horizon=horizon, **kwargs)
    raise ValueError(f"unknown robot dataset kind {kind!r}: expected 'libero' or 'calvin'")


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


def _synthetic_episode(rng, task, noise=0.01):
    """One scripted demonstration: dict of arrays in the LIBERO layout plus per-step phase notes."""
    pick, place = task
    while True:  # four blocks at least 0.1 m apart, away from the table edge
        pos = rng.uniform(-TABLE + 0.04, TABLE - 0.04, size=(4, 2))
        if min(np.hypot(*(pos[i] - pos[j])) for i in range(4) for j in range(i)) > 0.1:
            break
    blocks = {name: (pos[i, 0], pos[i, 1], rng.uniform(-math.pi / 4, math.pi / 4)) for i, name in enumerate(COLORS)}
    g = np.array([*rng.uniform(-TABLE, TABLE, 2), HOVER + rng.uniform(0, 0.04), 0.0, -1.0])  # x, y, z, yaw, grip
    (ax, ay, ayaw), (bx, by, _) = blocks[pick], blocks[place]
    # waypoints: (target xyz, target yaw, gripper command, phase)
    plan = [((ax, ay, HOVER), ayaw, -1, "reach"), ((ax, ay, GRASP_Z), ayaw, -1, "descend"), (None, ayaw, 1, "grasp"),
            ((ax, ay, HOVER), ayaw, 1, "lift"), ((bx, by, HOVER), ayaw, 1, "carry"), ((bx, by, PLACE_Z), ayaw, 1, "lower"),
            (None, ayaw, -1, "release"), ((bx, by, HOVER), ayaw, -1, "retreat")]
    frames, prev = [], np.zeros(6)
    held = None
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
            frames.append(dict(g=g.copy(), held=held, action=action, phase=phase))
            prev = cmd
            g[:3] += cmd[:3] * STEP
            g[3] += cmd[5] * 0.15
            g[4] = grip
            if phase == "grasp" and k == 2:
                held = pick
            if phase == "release" and k == 2:
                held = None
    return blocks, frames


def _write_episode(group, blocks, frames, image_size):
    T = len(frames)
    agent = np.stack([_render(blocks, f["held"], f["g"], (0.0, 0.0), AGENT_SPAN, image_size) for f in frames])
    wrist = np.stack([_render(blocks, f["held"], f["g"], f["g"][:2], WRIST_SPAN, image_size) for f in frames])
    gs = np.stack([f["g"] for f in frames])
    finger = np.where(gs[:, 4:5] > 0, 0.0, 0.04)
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
    group.attrs["num_samples"] = T
    return agent, wrist


def _reasoning(blocks, frame, task):
    """A think/answer text about one frame, naming what the image shows (DESIGN.md "embedded default")."""
    pick, place = task
    g, phase = frame["g"], frame["phase"]
    target = pick if phase in ("reach", "descend", "grasp") else place
    tx, ty, _ = blocks[target]
    rel, move = _relation(tx - g[0], ty - g[1]), _move_words(tx - g[0], ty - g[1])
    state = "closed and holding the " + pick + " block" if frame["held"] else ("closed" if g[4] > 0 else "open")
    think = f"The gripper is {state}. The {target} block is {rel} the gripper."
    answer = {"reach": f"move {move} above the {pick} block" if move else f"turn to line up with the {pick} block",
              "descend": f"move down onto the {pick} block", "grasp": "close the gripper",
              "lift": "lift the block up", "carry": f"move {move} above the {place} block" if move else "hold still",
              "lower": f"move down onto the {place} block", "release": "open the gripper",
              "retreat": "move up away from the blocks"}[phase]
    return f"<think>{think} So the robot should {answer}.</think><answer>{answer}</answer>"


def _vqa(rng, blocks, frame):
    g = frame["g"]
    name = list(COLORS)[rng.integers(len(COLORS))]
    x, y, _ = blocks[name]
    nearest = min(COLORS, key=lambda c: np.hypot(blocks[c][0] - g[0], blocks[c][1] - g[1]) + 9 * (c == frame["held"]))
    return [("What colour is the block closest to the gripper?", f"The {nearest} block."),
            (f"Where is the {name} block relative to the gripper?", f"It is {_relation(x - g[0], y - g[1])} the gripper."),
            ("Is the gripper open or closed?", "Closed." if g[4] > 0 else "Open.")][rng.integers(3)]


SYNTHETIC_VERSION = 1


def make_synthetic_dataset(out_dir, seed=0, demos_per_task=16, val_demos_per_task=4, image_size=56,
                           qa_per_demo=6, tasks=None):
    """Write the embedded default dataset to out_dir (skipped if an identical one is already there):

        libero/{train,val}/<task>_demo.hdf5     LIBERO layout, one file per task
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
            with h5py.File(os.path.join(tmp, "libero", split, f"{name}_demo.hdf5"), "w") as f:
                data = f.create_group("data")
                data.attrs["problem_info"] = json.dumps(dict(problem_name="synthetic_blocks", domain_name="roboalign_synthetic",
                                                             language_instruction=instruction))
                data.attrs["env_name"] = "roboalign_synthetic_blocks"
                data.attrs["bddl_file_name"] = ""
                total = 0
                for d in range(n_demos):
                    blocks, frames = _synthetic_episode(rng, task)
                    agent, wrist = _write_episode(data.create_group(f"demo_{d}"), blocks, frames, image_size)
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
                                                                {"from": "gpt", "value": _reasoning(blocks, frames[t], task)}]})
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

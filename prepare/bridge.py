"""BridgeData V2 -> the one robot-data format every stage reads (LIBERO's hdf5 layout). Run once; it streams the
trajectories into files of `demos_per_file` demonstrations, each written whole then renamed, so a stopped run
resumes where it stopped. Either release works:

    python prepare/bridge.py --src=/data/bridge_dataset/1.0.0 --split=train --out_dir=/data/bridge_libero/train
    python prepare/bridge.py --src=/data/bridge_dataset/1.0.0 --split=val --out_dir=/data/bridge_libero/val
    python prepare/bridge.py --src=/data/bridge/raw/bridge_data_v2 --out_dir=/data/bridge_libero/train   # the raw release

Each trajectory becomes data/demo_i with actions [T, 7] (xyz delta, roll-pitch-yaw delta, gripper absolute:
1 open, 0 closed), obs/agentview_rgb [T, H, W, 3] (the fixed main camera, upright), obs/ee_states [T, 6]
(xyz, roll-pitch-yaw) and obs/gripper_states [T, 1], and its instruction in the demo's attrs
(language_instruction; data.LiberoDataset reads it before the file's problem_info).

BridgeData V2 (arXiv 2603.21341 section 3: 400K FAST-token SFT samples and the RL prompts). WidowX 250
arm, 5 Hz, 1-4 cameras, one instruction per trajectory. Two on-disk forms, read into the same samples:

  raw release   .../<scene>/<task>/<NN>/<YYYY-MM-DD_HH-MM-SS>/raw/traj_groupG/trajK/ with
                obs_dict.pkl    dict of per-frame arrays; 'full_state' [N, 7] = xyz, roll-pitch-yaw,
                                gripper (always 7-D; 'state' drops the uncontrolled rotations in 4-D and
                                5-D action modes, so it is not used), 'qpos', 'time_stamp', 'eef_transform', ...
                policy_out.pkl  list of N-1 dicts whose 'actions' is the commanded 7-D action (xyz delta,
                                roll-pitch-yaw delta, gripper absolute: 1 open, 0 closed), or of bare arrays
                lang.txt        the instruction on its first line (then e.g. "confidence: 1")
                imagesC/im_k.jpg  camera C's frame k, k = 0..N-1 (images0 is the fixed main camera)
  RLDS release  bridge_dataset/1.0.0/bridge_dataset-{train,val}.tfrecord-XXXXX-of-YYYYY: one
                tf.train.Example per trajectory, every step feature flattened over the steps:
                steps/observation/image_C (one jpeg per step), steps/observation/state (7 per step),
                steps/action (7 per step), steps/language_instruction (one per step), steps/is_first,
                steps/is_last, episode_metadata/file_path (the raw trajectory directory), has_image_C, ...

The RLDS builder (read in rail-berkeley's bridge_dataset builder; nothing copied) turns N raw frames into
N steps: state = full_state, action = policy_out actions plus a zero action appended on the last step,
instruction = lang.txt's first line ("" when missing); trajectories recorded before 2021-07-23 had one frame
of camera latency, so their first frame and state and their last action are dropped. Both readers here
apply exactly these rules, then drop the final step, which has no real action, so trajectory i has
T = N - 1 samples (N - 2 latency-shifted): t = 0..T-1 with image and state of frame t and the commanded
actions t, t+1, ... (chunk_at pads with the last action). Gripper stays Bridge's 1 open / 0 closed.

Trajectories without language (no lang.txt, or an empty first line) are skipped, as are broken ones
(missing pickle, inconsistent lengths, corrupted TFRecord record); each skip is a message naming the file
(in .problems, the first ones printed) and a count per reason (in .skipped). Pickles run code when loaded:
read only the release you downloaded.
"""

import functools
import glob
import io
import json
import os
import pickle
import re
import struct
import sys
from collections import Counter
from datetime import datetime

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import _expand_paths, chunk_at, configure, log0  # noqa: E402

# -----------------------------------------------------------------------------
# config (nanoGPT style: --key=value)
src = ""  # raw trajectory directories, or RLDS tfrecord files / globs / directories (comma-separated)
out_dir = ""  # where the hdf5 files go
split = ""  # an RLDS directory holding both splits: "train" or "val"
image_size = 256  # frames resized to image_size x image_size as the RLDS builder did (0: as stored)
demos_per_file = 256
# -----------------------------------------------------------------------------

# The RLDS builder renumbers cameras by ROS topic (fixed main camera -> image_0, wrist -> image_3, others -> 1, 2);
# camera 0 is the same view in both forms, the others need not be.
BRIDGE_CAMERAS = (0,)  # the fixed main camera
BRIDGE_LATENCY_FIXED = datetime(2021, 7, 23)  # data recorded before this had one frame of camera latency
BRIDGE_ID_PARTS = 7  # trajectory id: <scene>/<task>/<NN>/<date>/raw/traj_groupG/trajK, the same in both forms


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


class _BridgeDataset:
    """Shared by BridgeRawDataset and BridgeRLDSDataset: episodes, skip bookkeeping, samples.

    Each episode: id, instruction, actions [T, 7], states [T, 7] (the per-sample states), plus where its
    frames are (reader-specific). Samples are LiberoDataset's: images (list of uint8 [H, W, 3], one per
    camera), instruction, state float32 [7], actions float32 [horizon, 7], action_mask bool [horizon],
    episode (the trajectory id), t."""

    def __init__(self, horizon, cameras, image_size):
        self.horizon, self.cameras, self.image_size = horizon, tuple(cameras), image_size
        self.episodes, self.skipped, self.problems = [], Counter(), []

    def _skip(self, reason, message):
        self.skipped[reason] += 1
        self.problems.append(message)

    def _add(self, episode_id, instruction, actions, states, **frames):
        """actions [T, 7] (T >= 1 real actions), states [T + 1, S] (the last one is reached after action T-1)."""
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
        log0(f"{type(self).__name__}: {len(self.episodes)} trajectories, {len(self)} samples from {what}; skipped: {skipped}")
        for message in self.problems[:20]:
            log0(f"  {message}")
        if len(self.problems) > 20:
            log0(f"  ... and {len(self.problems) - 20} more (the dataset's .problems)")
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
        return dict(images=[self.image(ep, c, t) for c in range(len(self.cameras))], instruction=ep["instruction"],
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

    def __init__(self, paths, horizon=16, cameras=BRIDGE_CAMERAS, image_size=None):
        super().__init__(horizon, cameras, image_size)
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

    def image(self, ep, c, t):
        path = os.path.join(ep["directory"], f"images{self.cameras[c]}", f"im_{t + ep['first_frame']}.jpg")
        return self._decode(path, path)


class BridgeRLDSDataset(_BridgeDataset):
    """BridgeData V2's RLDS / Open-X release (bridge_dataset/1.0.0/*.tfrecord-*) read without TensorFlow.

    paths: TFRecord files, globs, or directories holding them (comma-separated string or list). A directory
    holding several splits needs split="train" / "val" (or a glob such as .../bridge_dataset-train.tfrecord-*).
    The scan reads every record once (checksums verified) and keeps actions, states and the file offsets of
    the jpegs; a sample then reads and decodes only its own jpeg(s). index_cache: a file path keeping the scan's
    result for later runs, reused while the files (sizes, mtimes) and the options are the same."""

    def __init__(self, paths, horizon=16, cameras=BRIDGE_CAMERAS, image_size=None, split=None, index_cache=""):
        super().__init__(horizon, cameras, image_size)
        self.files = bridge_tfrecord_files(paths, split)
        self._image_keys = [f"steps/observation/image_{c}" for c in self.cameras]
        # the scan is checksum-bound (~100 MB/s per process, ~20 min for the 124 GB release): index_cache, a file
        # path, keeps its result for the next run, valid while the files (size, mtime) and options are the same
        signature = [self.cameras,
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

    def image(self, ep, c, t):
        start, length = ep["jpegs"][c][t]
        with open(ep["file"], "rb") as f:
            f.seek(start)
            data = f.read(length)
        return self._decode(data, f"{ep['file']}: {ep['id']} camera {self.cameras[c]} step {t} (byte {start})")


def bridge_tfrecord_files(paths, split=None):
    """TFRecord files named by paths (files, globs, directories; a list or a comma-separated string), of one split:
    `split`, or the only one they hold."""
    files = _expand_paths(paths, "*.tfrecord*", "BridgeRLDSDataset")
    split_of = lambda f: (re.search(r"-(\w+)\.tfrecord", os.path.basename(f)) or [None, None])[1]
    if split is not None:
        files = [f for f in files if split_of(f) == split]
        if not files:
            raise FileNotFoundError(f"BridgeRLDSDataset: no *.tfrecord* files of split {split!r} in {paths}")
    splits = sorted({split_of(f) for f in files} - {None})
    if len(splits) > 1:
        raise ValueError(f"{paths} holds the splits {splits}: pass split=... or a glob such as "
                         f"*-{splits[-1]}.tfrecord-*")
    return files


def convert(dataset, out, demos_per_file=256, desc="bridge"):
    """Write dataset's trajectories as out/bridge_{k:05d}.hdf5, demos_per_file each, in the LIBERO layout.
    A finished file is never rewritten: a rerun skips it (the reader's trajectory order is deterministic)."""
    os.makedirs(out, exist_ok=True)
    episodes, written = dataset.episodes, 0
    with tqdm(total=len(episodes), desc=desc, dynamic_ncols=True) as bar:
        for k, first in enumerate(range(0, len(episodes), demos_per_file)):
            path = os.path.join(out, f"bridge_{k:05d}.hdf5")
            chunk = episodes[first:first + demos_per_file]
            if os.path.isfile(path):
                bar.update(len(chunk))
                continue
            with h5py.File(path + ".tmp", "w") as f:
                data = f.create_group("data")
                data.attrs["problem_info"] = json.dumps(dict(problem_name="bridge_data_v2", language_instruction=""))
                for d, ep in enumerate(chunk):
                    g = data.create_group(f"demo_{d}")
                    g.attrs.update(language_instruction=ep["instruction"], trajectory=ep["id"], num_samples=len(ep["actions"]))
                    g.create_dataset("actions", data=ep["actions"])
                    frames = np.stack([dataset.image(ep, 0, t) for t in range(len(ep["actions"]))])
                    obs = g.create_group("obs")
                    obs.create_dataset("agentview_rgb", data=frames, chunks=(1, *frames.shape[1:]), compression="gzip",
                                       compression_opts=1)
                    obs.create_dataset("ee_states", data=ep["states"][:, :6])
                    obs.create_dataset("gripper_states", data=ep["states"][:, 6:7])
                    bar.update(1)
            os.replace(path + ".tmp", path)
            written += 1
    return written


def main():
    config = configure({k: v for k, v in globals().items() if k in ("src", "out_dir", "split", "image_size", "demos_per_file")})
    if not config["src"] or not config["out_dir"]:
        raise ValueError("pass --src=<raw trajectory dirs or RLDS tfrecords> and --out_dir=<where the hdf5 files go>")
    parts = [p for p in config["src"].split(",") if p]
    rlds = any(".tfrecord" in p or (os.path.isdir(p) and glob.glob(os.path.join(p, "*.tfrecord*"))) for p in parts)
    image_size = config["image_size"] or None
    if rlds:
        dataset = BridgeRLDSDataset(config["src"], image_size=image_size, split=config["split"] or None,
                                    index_cache=os.path.join(config["out_dir"], "rlds_index.pkl"))
    else:
        dataset = BridgeRawDataset(config["src"], image_size=image_size)
    written = convert(dataset, config["out_dir"], config["demos_per_file"])
    print(f"{config['out_dir']}: {len(dataset.episodes)} trajectories in "
          f"{-(-len(dataset.episodes) // config['demos_per_file'])} files ({written} written now)")


if __name__ == "__main__":
    main()

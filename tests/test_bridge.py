"""BridgeData V2 -> LIBERO-layout hdf5 (prepare/bridge.py): the raw release and the RLDS / TFRecord release give
identical samples; checksums, corruption and missing-language handling; both convert to the same files, which
data.LiberoDataset reads and sft.py trains from.

Fixtures are written here in the real formats: pickles with the release's keys and shapes, jpgs, lang.txt, and
a TFRecord file framed and checksummed like TensorFlow's, holding tf.train.Example records built by the encoder
below (independent of the decoder under test) with rail-berkeley's RLDS builder rules.
"""

import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
from datetime import datetime

import h5py
import numpy as np
import pytest
from PIL import Image

import prepare.bridge as bridge_module
from data import LiberoDataset, NormStats
from prepare.bridge import (BridgeRawDataset, BridgeRLDSDataset, _crc32c_scalar, crc32c, iter_tfrecords, masked_crc32c,
                            parse_example)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HORIZON = 4


# ---- a protobuf encoder and a TFRecord writer (the test's own, for the decoder to be checked against) ----

def varint(v):
    v &= (1 << 64) - 1  # negative int64: ten-byte two's complement
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def delimited(field, payload):
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def encode_feature(kind, values, packed=True):
    if kind == "bytes":
        return delimited(1, b"".join(delimited(1, v) for v in values))
    if kind == "float":
        if packed:
            return delimited(2, delimited(1, struct.pack(f"<{len(values)}f", *values)))
        return delimited(2, b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values))
    if packed:
        return delimited(3, delimited(1, b"".join(varint(int(v)) for v in values)))
    return delimited(3, b"".join(varint(1 << 3 | 0) + varint(int(v)) for v in values))


def encode_example(features, packed=True):
    entries = b"".join(delimited(1, delimited(1, key.encode()) + delimited(2, encode_feature(kind, values, packed)))
                       for key, (kind, values) in features.items())
    return delimited(1, entries)


def write_tfrecord(path, payloads):
    """TensorFlow's framing; returns each record's byte offset."""
    offsets = []
    with open(path, "wb") as f:
        for data in payloads:
            offsets.append(f.tell())
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))
    return offsets


# ---- fixtures in the raw layout, and their RLDS conversion ----

def jpeg_bytes(rng, h=24, w=32):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_raw_trajectory(root, date, group, k, n, seed, lang="put the spoon in the pot\nconfidence: 1\n", cameras=1):
    """One trajectory of n frames: obs_dict.pkl, policy_out.pkl (n-1 actions), lang.txt, imagesC/im_i.jpg."""
    rng = np.random.default_rng(seed)
    traj = os.path.join(root, "toykitchen1", "put_spoon_in_pot", "00", date, "raw", f"traj_group{group}", f"traj{k}")
    os.makedirs(traj)
    full_state = np.concatenate([rng.normal(0, 0.1, (n, 6)), rng.uniform(0, 1, (n, 1))], axis=1)
    obs = dict(joint_effort=rng.normal(size=(n, 7)), qpos=rng.normal(size=(n, 6)), qvel=rng.normal(size=(n, 6)),
               full_state=full_state, state=full_state.copy(), desired_state=full_state + 0.01,
               time_stamp=[1.6e9 + 0.2 * i for i in range(n)], eef_transform=np.tile(np.eye(4), (n, 1, 1)),
               high_bound=np.ones(5), low_bound=-np.ones(5), env_done=[False] * n, t_get_obs=[0.05] * n)
    actions = np.concatenate([rng.normal(0, 0.02, (n - 1, 6)), rng.choice([0.0, 1.0], (n - 1, 1))], axis=1)
    policy = [dict(actions=a, new_robot_transform=np.eye(4), delta_robot_transform=np.eye(4), policy_type="VRTeleopPolicy")
              for a in actions]
    with open(os.path.join(traj, "obs_dict.pkl"), "wb") as f:
        pickle.dump(obs, f)
    with open(os.path.join(traj, "policy_out.pkl"), "wb") as f:
        pickle.dump(policy, f)
    with open(os.path.join(traj, "agent_data.pkl"), "wb") as f:
        pickle.dump(dict(traj_ok=True), f)
    if lang is not None:
        with open(os.path.join(traj, "lang.txt"), "w") as f:
            f.write(lang)
    for c in range(cameras):
        os.makedirs(os.path.join(traj, f"images{c}"))
        for i in range(n):
            with open(os.path.join(traj, f"images{c}", f"im_{i}.jpg"), "wb") as f:
                f.write(jpeg_bytes(rng))
    return traj


def rlds_record(traj, packed=True):
    """rail-berkeley's RLDS builder rules, written out independently of the reader: every frame is a step,
    state = full_state, actions + a zero action at the end, lang.txt's first line ("" when missing), the
    pre-2021-07-23 latency shift, black frames and has_image_C = False for absent cameras. The jpeg bytes are
    kept as they are (the real builder re-encodes at 256 x 256) so decoded pixels can be compared exactly."""
    with open(os.path.join(traj, "obs_dict.pkl"), "rb") as f:
        state = list(pickle.load(f)["full_state"])
    with open(os.path.join(traj, "policy_out.pkl"), "rb") as f:
        actions = [p["actions"] for p in pickle.load(f)]
    lang_path = os.path.join(traj, "lang.txt")
    lang = open(lang_path).readline().strip() if os.path.exists(lang_path) else ""
    n = len(state)
    images = {c: [open(os.path.join(traj, f"images{c}", f"im_{i}.jpg"), "rb").read() for i in range(n)]
              for c in range(4) if os.path.isdir(os.path.join(traj, f"images{c}"))}
    if datetime.strptime(traj.split(os.sep)[-4], "%Y-%m-%d_%H-%M-%S") < datetime(2021, 7, 23):
        images = {c: v[1:] for c, v in images.items()}
        state, actions = state[1:], actions[:-1]
    actions.append(np.zeros(7))
    steps = len(actions)
    black = io.BytesIO()
    Image.new("RGB", (32, 24)).save(black, format="JPEG")
    features = {f"steps/observation/image_{c}": ("bytes", images.get(c, [black.getvalue()] * steps)) for c in range(4)}
    features.update({
        "steps/observation/state": ("float", np.concatenate(state).tolist()),
        "steps/action": ("float", np.concatenate(actions).tolist()),
        "steps/is_first": ("int", [i == 0 for i in range(steps)]),
        "steps/is_last": ("int", [i == steps - 1 for i in range(steps)]),
        "steps/language_instruction": ("bytes", [lang.encode()] * steps),
        "episode_metadata/file_path": ("bytes", [traj.encode()]),
        "episode_metadata/has_language": ("int", [bool(lang)]),
        "episode_metadata/ep_idx": ("int", [-1]),
        **{f"episode_metadata/has_image_{c}": ("int", [c in images]) for c in range(4)},
    })
    return encode_example(features, packed=packed)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    """Five raw trajectories (one latency-shifted, one without lang.txt, one with an empty instruction, one with
    a single camera) and the same five as two TFRecord shards (packed and unpacked float lists)."""
    root = tmp_path_factory.mktemp("bridge")
    raw = str(root / "raw")
    trajs = dict(
        a=write_raw_trajectory(raw, "2023-03-15_14-35-28", 0, 0, n=7, seed=1, cameras=2),
        shifted=write_raw_trajectory(raw, "2021-06-01_10-00-00", 0, 0, n=6, seed=2, cameras=2, lang="open the drawer\n"),
        no_lang=write_raw_trajectory(raw, "2023-03-15_14-35-28", 0, 1, n=5, seed=3, cameras=2, lang=None),
        empty_lang=write_raw_trajectory(raw, "2023-03-15_14-35-28", 1, 2, n=5, seed=4, cameras=2, lang="\nconfidence: 0.5\n"),
        one_camera=write_raw_trajectory(raw, "2023-04-01_09-00-00", 0, 0, n=5, seed=5, cameras=1, lang="wipe the table"),
    )
    rlds = root / "bridge_dataset" / "1.0.0"
    os.makedirs(rlds)
    write_tfrecord(rlds / "bridge_dataset-train.tfrecord-00000-of-00002",
                   [rlds_record(trajs[k]) for k in ("one_camera", "a", "no_lang")])
    write_tfrecord(rlds / "bridge_dataset-train.tfrecord-00001-of-00002",
                   [rlds_record(trajs[k], packed=False) for k in ("empty_lang", "shifted")])
    return dict(root=root, raw=raw, rlds=str(rlds), trajs=trajs)


def load_pickles(traj):
    with open(os.path.join(traj, "obs_dict.pkl"), "rb") as f:
        obs = pickle.load(f)
    with open(os.path.join(traj, "policy_out.pkl"), "rb") as f:
        actions = np.array([p["actions"] for p in pickle.load(f)], dtype=np.float32)
    return obs["full_state"].astype(np.float32), actions


def image_file(traj, c, i):
    return decode(open(os.path.join(traj, f"images{c}", f"im_{i}.jpg"), "rb").read())


def assert_same_sample(x, y):
    assert x.keys() == y.keys()
    assert len(x["images"]) == len(y["images"])
    for a, b in zip(x["images"], y["images"]):
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    for key in ("state", "actions", "action_mask"):
        assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key
    assert (x["instruction"], x["episode"], x["t"]) == (y["instruction"], y["episode"], y["t"])


# ---- checksums and the wire format ----

def test_crc32c_known_values_and_fast_path():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4 test vectors
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(0)
    for n in (4096, 4099, 70001, 300_000):  # the numpy-lane path against the byte-at-a-time loop
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_scalar(data)
    # TFRecord's mask: rotate right by 15 bits, add 0xa282ead8 (mod 2^32); by hand for 0xE3069283:
    # 0xE3069283 >> 15 = 0x0001C60D, (0xE3069283 << 17) mod 2^32 = 0x25060000, sum of the rotation and the constant:
    assert masked_crc32c(b"123456789") == (0x0001C60D | 0x25060000) + 0xA282EAD8 == 0xC78AB0E5


def test_example_decoder_packed_unpacked_negative_and_empty():
    features = {"f": ("float", [1.5, -2.25, 3e-8]), "i": ("int", [0, 1, -1, 2 ** 40, -(2 ** 63)]),
                "b": ("bytes", [b"", b"jpeg\x00bytes", "héllo".encode()]), "none": ("bytes", [])}
    for packed in (True, False):
        buf = encode_example(features, packed=packed)
        buf = varint(5 << 3 | 0) + varint(99) + buf  # an unknown field before `features` is skipped
        parsed = parse_example(buf)
        assert sorted(parsed) == ["b", "f", "i", "none"]
        assert parsed["f"].dtype == np.float32 and parsed["f"].tolist() == np.float32([1.5, -2.25, 3e-8]).tolist()
        assert parsed["i"].dtype == np.int64 and parsed["i"].tolist() == [0, 1, -1, 2 ** 40, -(2 ** 63)]
        assert parsed["b"] == [b"", b"jpeg\x00bytes", "héllo".encode()] and parsed["none"] == []
        assert list(parse_example(buf, keys={"f"})) == ["f"]
    with pytest.raises(ValueError, match="past the end"):
        parse_example(encode_example(features)[:-3])


# ---- the two readers ----

def test_raw_and_rlds_give_identical_samples(bridge, capsys):
    raw = BridgeRawDataset(bridge["raw"], horizon=HORIZON)
    out = capsys.readouterr().out
    rlds = BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON)
    # kept: a (7 frames -> 6 samples), shifted (6 frames -> 4), one_camera (5 -> 4)
    assert len(raw) == len(rlds) == 6 + 4 + 4
    assert sorted(raw.frame_keys()) == sorted(rlds.frame_keys())
    for i, (episode, t) in enumerate(raw.frame_keys()):
        assert_same_sample(raw[i], rlds[rlds.index_of(episode, t)])
    assert np.array_equal(np.sort(raw.all_actions(), axis=0), np.sort(rlds.all_actions(), axis=0))
    assert np.array_equal(np.sort(raw.all_states(), axis=0), np.sort(rlds.all_states(), axis=0))
    # skipped: no lang.txt, and a first line that is empty; counted the same way by both readers
    assert raw.skipped == rlds.skipped == {"no language": 2}
    missing = os.path.join(bridge["trajs"]["no_lang"], "lang.txt")
    assert any(missing in p and "not found" in p for p in raw.problems)
    assert missing in out and "no language 2" in out

    # hand checks against the pickles: trajectory a, not shifted
    traj = bridge["trajs"]["a"]
    states, actions = load_pickles(traj)
    first = raw[raw.index_of("toykitchen1/put_spoon_in_pot/00/2023-03-15_14-35-28/raw/traj_group0/traj0", 0)]
    assert first["instruction"] == "put the spoon in the pot"
    assert np.array_equal(first["state"], states[0]) and first["state"].shape == (7,)
    assert np.array_equal(first["actions"], actions[:HORIZON]) and first["action_mask"].all()
    assert len(first["images"]) == 1 and np.array_equal(first["images"][0], image_file(traj, 0, 0))
    last = raw[raw.index_of(first["episode"], 5)]  # T = 6: the chunk at t = 5 repeats the last action
    assert np.array_equal(last["actions"], np.repeat(actions[5:6], HORIZON, axis=0))
    assert last["action_mask"].tolist() == [True, False, False, False]
    assert np.array_equal(last["state"], states[5]) and np.array_equal(last["images"][0], image_file(traj, 0, 5))

    # the latency-shifted trajectory: frame and state t + 1 go with action t, the last action is dropped
    traj = bridge["trajs"]["shifted"]
    states, actions = load_pickles(traj)
    episode = "toykitchen1/put_spoon_in_pot/00/2021-06-01_10-00-00/raw/traj_group0/traj0"
    samples = [raw[raw.index_of(episode, t)] for t in range(4)]
    with pytest.raises(KeyError):
        raw.index_of(episode, 4)
    assert samples[0]["instruction"] == "open the drawer"
    for t, s in enumerate(samples):
        assert np.array_equal(s["state"], states[t + 1]) and np.array_equal(s["images"][0], image_file(traj, 0, t + 1))
        assert np.array_equal(s["actions"][0], actions[t])
    assert np.array_equal(samples[3]["actions"], np.repeat(actions[3:4], HORIZON, axis=0))


def test_cameras_resize_and_missing_camera(bridge):
    raw = BridgeRawDataset(bridge["raw"], horizon=HORIZON, cameras=(0, 1), image_size=16)
    rlds = BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON, cameras=(0, 1), image_size=16)
    assert raw.skipped == rlds.skipped == {"no language": 2, "missing camera": 1}  # one_camera has no images1
    assert len(raw) == len(rlds) == 6 + 4
    for i, (episode, t) in enumerate(raw.frame_keys()):
        assert_same_sample(raw[i], rlds[rlds.index_of(episode, t)])
    sample = raw[raw.index_of("toykitchen1/put_spoon_in_pot/00/2023-03-15_14-35-28/raw/traj_group0/traj0", 2)]
    assert [im.shape for im in sample["images"]] == [(16, 16, 3), (16, 16, 3)]
    expected = Image.open(os.path.join(bridge["trajs"]["a"], "images1", "im_2.jpg")).convert("RGB")
    expected = expected.resize((16, 16), Image.LANCZOS)
    assert np.array_equal(sample["images"][1], np.asarray(expected))


def test_corrupted_tfrecords_name_the_file_and_the_rest_loads(bridge, tmp_path):
    trajs = bridge["trajs"]
    payloads = [rlds_record(trajs[k]) for k in ("a", "shifted", "one_camera")]
    intact = str(tmp_path / "bridge_dataset-train.tfrecord-00001-of-00002")  # trajectory a under another id
    write_tfrecord(intact, [rlds_record(trajs["a"]).replace(b"traj_group0/traj0", b"traj_group9/traj9")])  # same length

    def corrupted(name, damage):
        path = str(tmp_path / name)
        offsets = write_tfrecord(path, payloads)
        data = bytearray(open(path, "rb").read())
        data = damage(data, offsets)
        open(path, "wb").write(data)
        return path

    def flip(data, at):
        data[at] ^= 0x40
        return data

    bad_data = corrupted("bad_data.tfrecord", lambda d, o: flip(d, o[1] + 12 + 100))  # inside record 1's payload
    bad_length = corrupted("bad_length.tfrecord", lambda d, o: flip(d, o[1] + 9))  # record 1's length checksum
    truncated = corrupted("truncated.tfrecord", lambda d, o: d[:o[2] + 12 + 50])  # record 2 cut short

    ds = BridgeRLDSDataset([bad_data, intact], horizon=HORIZON)
    assert ds.skipped == {"corrupt record": 1}
    dates = sorted(ep["id"].split("/")[3] for ep in ds.episodes)  # a and one_camera from bad_data, a copy from intact
    assert dates == ["2023-03-15_14-35-28", "2023-03-15_14-35-28", "2023-04-01_09-00-00"]
    assert len(ds.problems) == 1 and bad_data in ds.problems[0] and "record 1" in ds.problems[0]
    assert "data checksum mismatch" in ds.problems[0]

    ds = BridgeRLDSDataset([bad_length, intact], horizon=HORIZON)
    assert ds.skipped == {"corrupt record": 1} and len(ds.episodes) == 2  # record 0 of bad_length, and intact
    assert bad_length in ds.problems[0] and "length checksum mismatch" in ds.problems[0] and "rest of the file" in ds.problems[0]

    ds = BridgeRLDSDataset([truncated, intact], horizon=HORIZON)
    assert ds.skipped == {"corrupt record": 1} and len(ds.episodes) == 3
    assert truncated in ds.problems[0] and "record 2" in ds.problems[0] and "truncated" in ds.problems[0]

    with pytest.raises(ValueError, match="bad_data.tfrecord: record 1 at byte"):
        list(iter_tfrecords(bad_data))
    assert [(offset, len(d)) for offset, d in iter_tfrecords(intact)] == [(12, os.path.getsize(intact) - 16)]


def test_rlds_index_cache_is_reused_only_for_the_same_files_and_options(bridge, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache" / "bridge_train_index.pkl")
    first = BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON, index_cache=cache)
    assert os.path.isfile(cache)

    def no_scan(*args, **kwargs):
        raise AssertionError("the TFRecord files were scanned again")

    monkeypatch.setattr(bridge_module, "iter_tfrecords", no_scan)
    second = BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON, index_cache=cache)
    assert second.skipped == first.skipped and second.problems == first.problems and len(second) == len(first)
    for i in range(len(first)):
        assert_same_sample(first[i], second[i])
    with pytest.raises(AssertionError, match="scanned again"):  # other options
        BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON, cameras=(0, 1), index_cache=cache)
    shard = os.path.join(bridge["rlds"], "bridge_dataset-train.tfrecord-00000-of-00002")
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        with pytest.raises(AssertionError, match="scanned again"):  # a file changed
            BridgeRLDSDataset(bridge["rlds"], horizon=HORIZON, index_cache=cache)
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_broken_raw_trajectories_are_skipped_with_their_file_named(bridge, tmp_path):
    raw = str(tmp_path / "raw")
    shutil.copytree(bridge["raw"], raw)
    broken = os.path.join(raw, *bridge["trajs"]["a"].split(os.sep)[-7:])
    os.remove(os.path.join(broken, "policy_out.pkl"))
    ds = BridgeRawDataset(raw, horizon=HORIZON)
    assert ds.skipped == {"no language": 2, "missing file": 1} and len(ds) == 4 + 4
    assert any(os.path.join(broken, "policy_out.pkl") in p and "not found" in p for p in ds.problems)
    empty = tmp_path / "empty"
    os.makedirs(empty / "2023-01-01_00-00-00" / "raw")
    with pytest.raises(FileNotFoundError, match="no .../raw/traj_groupG/trajK"):
        BridgeRawDataset(str(empty))


def test_splits_autodetection(bridge, tmp_path):
    both = tmp_path / "1.0.0"
    os.makedirs(both)
    write_tfrecord(both / "bridge_dataset-train.tfrecord-00000-of-00001", [rlds_record(bridge["trajs"]["a"])])
    write_tfrecord(both / "bridge_dataset-val.tfrecord-00000-of-00001", [rlds_record(bridge["trajs"]["one_camera"])])
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'val'\]"):
        BridgeRLDSDataset(str(both))
    assert len(BridgeRLDSDataset(str(both), horizon=HORIZON, split="val")) == 4
    assert len(BridgeRLDSDataset(str(both / "*-train.tfrecord-*"), horizon=HORIZON)) == 6
    raw = BridgeRawDataset(bridge["raw"], horizon=HORIZON)
    assert_same_sample(raw[-1], raw[13])
    with pytest.raises(IndexError):
        raw[14]


def prepare(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "bridge.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_both_releases_convert_to_the_same_libero_files_and_sft_trains_on_them(bridge, tmp_path):
    for name, src in (("raw", bridge["raw"]), ("rlds", bridge["rlds"])):
        r = prepare(f"--src={src}", f"--out_dir={tmp_path / name}", "--demos_per_file=2", "--image_size=0")
        assert r.returncode == 0, r.stderr
        assert "3 trajectories in 2 files (2 written now)" in r.stdout
    raw = BridgeRawDataset(bridge["raw"], horizon=HORIZON)
    by_id = {ep["id"]: ep for ep in raw.episodes}
    converted = {name: LiberoDataset(str(tmp_path / name), horizon=HORIZON, no_noops=False) for name in ("raw", "rlds")}
    assert converted["raw"].cameras == ("agentview_rgb",)  # Bridge's main camera only
    for name, ds in converted.items():
        assert len(ds) == len(raw) == 14
        seen = set()
        for e, ep in enumerate(ds.episodes):  # every demo is one trajectory, its steps and instruction as the reader's
            with h5py.File(ep["file"], "r") as f:
                trajectory = f["data"][ep["demo"]].attrs["trajectory"]
            seen.add(trajectory)
            ref = by_id[trajectory]
            assert ep["instruction"] == ref["instruction"]
            np.testing.assert_array_equal(ep["actions"], ref["actions"])
            np.testing.assert_array_equal(ep["states"], ref["states"])
            i = ds.index.index((e, 2))
            np.testing.assert_array_equal(ds[i]["images"][0], raw.image(ref, 0, 2))
            np.testing.assert_array_equal(ds[i]["actions"], raw[raw.index_of(trajectory, 2)]["actions"])
        assert seen == set(by_id)
    # resumable: a rerun writes nothing; a missing file is written again, the others are kept
    first = tmp_path / "raw" / "bridge_00000.hdf5"
    mtime = os.path.getmtime(first)
    os.remove(tmp_path / "raw" / "bridge_00001.hdf5")
    r = prepare(f"--src={bridge['raw']}", f"--out_dir={tmp_path / 'raw'}", "--demos_per_file=2", "--image_size=0")
    assert "(1 written now)" in r.stdout and os.path.getmtime(first) == mtime
    # sft.py trains from the converted files (robot data only: no VQA / reasoning json here)
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), f"--robot_train={tmp_path / 'rlds'}", "--robot_val=",
                        "--vqa_train=", "--vqa_val=", "--reasoning_train=", "--reasoning_val=", "--vqa_weight=0.0",
                        "--reasoning_weight=0.0", "--think_action_weight=0.0", "--action_horizon=4", "--fast_vocab_size=16",
                        "--no_noops=False", "--max_iters=2", "--batch_size=4", "--eval_interval=0", "--n_layer=1",
                        "--n_embd=32", "--vision_embd=32", f"--out_dir={out}", f"--data_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "norm_stats.json")
    assert NormStats.load(str(out / "norm_stats.json")).state_dim == 7  # Bridge's xyz, rpy, gripper

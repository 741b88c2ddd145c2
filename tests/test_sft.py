# sft.py: the deterministic mixture (pure functions, by hand), then the script itself as a subprocess on a
# small synthetic dataset with a very small backbone: 2-process DDP == 1 process, kill + --resume == an
# uninterrupted run, --init_from=<saved HF checkpoint> (the from_pretrained path), and bad inputs that must
# fail before the first step.
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
from data import format_reward, prefix_match_reward
from prepare.synthetic import make_synthetic_dataset
from sft import COMPONENTS, mixture_batch, mixture_counts, think_action_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--vision_depth=1", "--vision_embd=32", "--fast_vocab_size=64"]
RUN = [*SIZES, "--max_iters=8", "--batch_size=4", "--gradient_accumulation_steps=2", "--save_interval=2",
       "--eval_interval=4", "--eval_iters=1", "--eval_action_samples=4", "--eval_reasoning_samples=4", "--log_interval=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # same threads everywhere: comparable numerics


# ---- pure functions -------------------------------------------------------------------------------------

def test_reward_functions_by_hand():
    """data.prefix_match_reward / format_reward: the definitions sft.py's eval and the RL reward share."""
    assert prefix_match_reward([5, 6, 9], [5, 6, 7, 8]) == 0.5  # 2 of 4 target tokens
    assert prefix_match_reward([4, 6, 7, 8], [5, 6, 7, 8]) == 0.0  # wrong first token
    assert prefix_match_reward([5, 6, 7, 8, 1, 2], [5, 6, 7, 8]) == 1.0  # tokens beyond the target add nothing
    assert prefix_match_reward([5], [5, 6, 7, 8]) == 0.25  # shorter answer: its matched prefix only
    assert prefix_match_reward(None, [5]) == 0.0 and prefix_match_reward([], [5]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        prefix_match_reward([1], [])
    ok = "<think>the red block is left</think><answer>move left</answer>"
    assert format_reward(ok) == 1.0 and format_reward(" <think> a </think>\n<answer> b </answer>\n") == 1.0
    for bad in ("move left", ok + " done", "<think>a</think>", "<think></think><answer>b</answer>",
                "<think>a</think><answer>b</answer><think>c</think><answer>d</answer>", "<answer>b</answer><think>a</think>"):
        assert format_reward(bad) == 0.0, bad
    act = "<think>go left</think><answer><ACTION_START><act_3><act_1><ACTION_END></answer>"
    assert format_reward(act, require_action=True) == 1.0 and format_reward(act) == 1.0
    assert format_reward(ok, require_action=True) == 0.0
    assert format_reward("<think>a</think><answer>x <ACTION_START><act_3><ACTION_END></answer>", require_action=True) == 0.0


def test_think_action_target_uses_the_per_step_reasoning():
    act = "<ACTION_START><act_1><ACTION_END>"
    with_reasoning = dict(instruction="open the drawer", reasoning="The drawer is left of the gripper.")
    assert think_action_text(with_reasoning, act) == \
        "<think>The drawer is left of the gripper.</think><answer><ACTION_START><act_1><ACTION_END></answer>"
    assert think_action_text(dict(instruction="open the drawer"), act) == \
        "<think>I need to open the drawer.</think><answer><ACTION_START><act_1><ACTION_END></answer>"
    assert format_reward(think_action_text(with_reasoning, act), require_action=True) == 1.0


def test_mixture_counts_by_hand():
    # 16 * (0.15, 0.25, 0.5, 0.1) = (2.4, 4, 8, 1.6): floors (2, 4, 8, 1), the one leftover to the largest remainder
    assert mixture_counts([0.15, 0.25, 0.5, 0.1], 16) == [2, 4, 8, 2]
    assert mixture_counts([1, 1, 1, 0], 8) == [3, 3, 2, 0]  # remainders tie: the first components get them
    assert mixture_counts([0, 0, 2, 0], 5) == [0, 0, 5, 0]
    with pytest.raises(ValueError, match="empty mixture"):
        mixture_counts([0, 0, 0, 0], 16)
    with pytest.raises(ValueError, match="think_action"):
        mixture_counts([1, 1, 1, 0.01], 8)  # a positive weight that gets no sample is an error, not silence


def test_mixture_batch_is_a_pure_function_with_epochs():
    sizes, counts = [5, 7, 30, 30], [2, 1, 3, 2]
    batches = [mixture_batch(step, sizes, counts, seed=3) for step in range(10)]
    assert batches[4] == mixture_batch(4, sizes, counts, seed=3)  # a resumed run sees the same batch
    assert batches[4] != mixture_batch(4, sizes, counts, seed=4)
    for b in batches:
        assert [sum(c == k for c, _ in b) for k in range(4)] == counts  # the same composition every step
    # component c's indices at a step are data.global_batch_indices(step, size, count, seed * 4 + c) (in a
    # shuffled order), so it walks seeded epochs: 10 steps x 2 of a 5-sample component = each sample 4 times
    for step, b in enumerate(batches):
        for c in range(4):
            expected = data.global_batch_indices(step, sizes[c], counts[c], seed=3 * len(COMPONENTS) + c)
            assert sorted(i for k, i in b if k == c) == sorted(expected)
    vqa = [i for b in batches for c, i in b if c == 0]
    assert np.bincount(vqa).tolist() == [4] * 5
    assert [c for c, _ in batches[0]] != sorted(c for c, _ in batches[0])  # shuffled: each rank's slice is a mix


def test_demonstrations_read_calvin_windows_once(tmp_path):
    """CALVIN keeps one file per frame: NormStats and the FAST fit read whole language windows, in a seeded
    order, until max_steps frames (here: frames 0-4 hold action i/10 and state i, frames 5-9 likewise)."""
    from test_data import write_calvin
    root = str(tmp_path / "training")
    write_calvin(root)
    ds = data.CalvinDataset(root, horizon=3)
    demos = ds.demonstrations(max_steps=100, seed=0)
    assert sorted(tuple(np.round(a[:, 0] * 10).astype(int)) for a, _ in demos) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert all((s[:, 0] == np.round(a[:, 0] * 10)).all() for a, s in demos)
    assert len(ds.demonstrations(max_steps=3, seed=0)) == 1  # the first window already has 5 >= 3 frames


# ---- the script, as a subprocess ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft") / "data")
    make_synthetic_dataset(path, seed=0, demos_per_task=2, val_demos_per_task=1, qa_per_demo=2)
    return path


def sft(*args, torchrun=0, check=True):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []),
           os.path.join(ROOT, "sft.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    losses = {m["step"]: m["loss"] for m in lines if "loss" in m}
    evals = {m["step"]: m for m in lines if "val_loss" in m}
    return losses, evals


@pytest.fixture(scope="module")
def baseline(synth, tmp_path_factory):
    """One uninterrupted single-process run: the reference for the DDP and the resume tests."""
    out = str(tmp_path_factory.mktemp("sft") / "single")
    sft(*RUN, f"--data_dir={synth}", f"--out_dir={out}")
    return out


def test_single_run_writes_the_checkpoint_and_metrics(baseline):
    for name in ("config.json", "model.safetensors", "roboalign_backbone.json", "fast_tokenizer.json",
                 "norm_stats.json", "run_config.json", "train_state.pt", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(baseline, name)), name
    losses, evals = metrics(baseline)
    assert sorted(losses) == list(range(1, 9)) and sorted(evals) == [0, 4, 8]
    assert losses[8] < losses[1]
    for key in ("val_loss", "action_exact", "action_prefix", "reasoning_format", "think_action_format"):
        assert key in evals[8]
    assert evals[8]["val_loss"] < evals[0]["val_loss"]
    with open(os.path.join(baseline, "run_config.json")) as f:
        assert json.load(f)["n_embd"] == 64


def test_ddp_two_processes_match_one_process(baseline, synth, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with the same global batch (4 x 2): each process takes half of every
    global batch, so the loss curve and the held-out loss must equal the single-process run's."""
    out = str(tmp_path / "ddp")
    sft(*RUN, f"--data_dir={synth}", f"--out_dir={out}", torchrun=2)
    (single, single_eval), (ddp, ddp_eval) = metrics(baseline), metrics(out)
    assert sorted(ddp) == sorted(single)
    np.testing.assert_allclose([ddp[s] for s in sorted(ddp)], [single[s] for s in sorted(single)], rtol=2e-4)
    np.testing.assert_allclose([ddp_eval[s]["val_loss"] for s in (0, 4, 8)], [single_eval[s]["val_loss"] for s in (0, 4, 8)], rtol=2e-4)


def test_kill_and_resume_matches_an_uninterrupted_run(baseline, synth, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), *RUN, f"--data_dir={synth}", f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(out, "train_state.pt")
    deadline = time.time() + 120
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # somewhere after the first checkpoint (step 2), maybe during a save
    proc.wait()
    losses_before, _ = metrics(out)
    assert max(losses_before) < 8, "the run finished before it could be killed"
    resumed = sft(*RUN, f"--data_dir={synth}", f"--out_dir={out}", "--resume")
    assert "resuming from" in resumed.stdout
    (reference, reference_eval), (losses, evals) = metrics(baseline), metrics(out)
    assert sorted(losses) == list(range(1, 9))  # steps logged after the checkpoint were dropped and redone
    np.testing.assert_allclose([losses[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=1e-5)
    assert evals[8]["val_loss"] == pytest.approx(reference_eval[8]["val_loss"], rel=1e-5)


def test_fsdp_two_processes_match_one_process_and_save_a_plain_hf_checkpoint(baseline, synth, tmp_path):
    """--fsdp=True on two processes (FSDP2 over gloo): the same losses and saved weights as one process, and the
    checkpoint is a plain HF directory whose logits equal the single-process checkpoint's."""
    out = str(tmp_path / "fsdp")
    sft(*RUN, f"--data_dir={synth}", f"--out_dir={out}", "--fsdp=True", torchrun=2)
    (single, single_eval), (fsdp, fsdp_eval) = metrics(baseline), metrics(out)
    assert sorted(fsdp) == sorted(single)
    np.testing.assert_allclose([fsdp[s] for s in sorted(fsdp)], [single[s] for s in sorted(single)], rtol=1e-5)
    np.testing.assert_allclose([fsdp_eval[s]["val_loss"] for s in (0, 4, 8)], [single_eval[s]["val_loss"] for s in (0, 4, 8)], rtol=1e-5)
    a, b = load_file(os.path.join(baseline, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(b[k].dtype == torch.float32 for k in b)  # fp32 master weights, gathered
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    from model import Backbone
    inputs = None
    logits = []
    for path in (baseline, out):
        backbone = Backbone.from_pretrained(path)
        if inputs is None:
            rng = np.random.default_rng(0)
            inputs = backbone.build_inputs([[rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)] * 2], ["pick up the red block"])
        with torch.no_grad():
            logits.append(backbone.model(**backbone._model_inputs(inputs)).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_fsdp_kill_and_resume_matches_an_uninterrupted_run(baseline, synth, tmp_path):
    """Two FSDP processes with activation checkpointing, killed after a checkpoint, then --resume (the optimizer
    state is saved gathered, by parameter name, and sharded again on load): the same losses as the uninterrupted
    single-process run without checkpointing (recomputing a layer in backward changes no number)."""
    out = str(tmp_path / "killed_fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "sft.py"),
           *RUN, f"--data_dir={synth}", f"--out_dir={out}", "--fsdp=True", "--gradient_checkpointing=True"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = os.path.join(out, "train_state.pt")
    deadline = time.time() + 240
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    losses_before, _ = metrics(out)
    assert max(losses_before) < 8, "the run finished before it could be killed"
    sft(*RUN, f"--data_dir={synth}", f"--out_dir={out}", "--fsdp=True", "--gradient_checkpointing=True", "--resume", torchrun=2)
    (reference, reference_eval), (losses, evals) = metrics(baseline), metrics(out)
    assert sorted(losses) == list(range(1, 9))
    np.testing.assert_allclose([losses[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=1e-5)
    assert evals[8]["val_loss"] == pytest.approx(reference_eval[8]["val_loss"], rel=1e-5)


def test_init_from_a_saved_hf_backbone(synth, tmp_path):
    """--init_from=<dir> (the issue's --backbone=<path>) goes through Backbone.from_pretrained, which adds the
    action tokens to a plain Qwen2.5-VL checkpoint; the FAST tokenizer is fitted and saved alongside."""
    from model import Backbone
    hf = str(tmp_path / "hf")
    Backbone.write_tiny_hf_checkpoint(hf, seed=1, hidden_size=64, num_layers=2, num_heads=2, vision_depth=1, vision_hidden_size=32)
    out = str(tmp_path / "out")
    sft(*SIZES, "--max_iters=2", "--batch_size=8", "--eval_interval=0", f"--init_from={hf}", f"--data_dir={synth}", f"--out_dir={out}")
    with open(os.path.join(out, "roboalign_backbone.json")) as f:
        assert json.load(f)["fast_vocab_size"] == 64
    before, after = load_file(os.path.join(hf, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    key = next(k for k in before if "layers.0.mlp" in k)
    assert before[key].shape == after[key].shape and not (before[key] == after[key]).all()  # trained from those weights
    assert os.path.isfile(os.path.join(out, "fast_tokenizer.json"))


@pytest.mark.parametrize("case", ["missing_path", "empty_mixture", "missing_image", "not_an_image", "rerun_without_resume"])
def test_bad_inputs_fail_before_training(case, synth, tmp_path):
    data_dir = synth
    args = []
    if case == "missing_path":
        args, expect = [f"--robot_train={tmp_path}/nowhere"], "nowhere"
    elif case == "empty_mixture":
        args, expect = ["--vqa_weight=0.0", "--reasoning_weight=0.0", "--action_weight=0.0", "--think_action_weight=0.0"], "empty mixture"
    elif case == "not_an_image":  # the 3rd record's image is a text file
        with open(os.path.join(synth, "reasoning_train.json")) as f:
            records = json.load(f)
        (tmp_path / "fake.png").write_text("not a png")
        records[2]["image"] = [str(tmp_path / "fake.png")]
        bad = str(tmp_path / "reasoning_train.json")
        with open(bad, "w") as f:
            json.dump(records, f)
        args, expect = [f"--reasoning_train={bad}", f"--image_root={synth}"], "record 2: " + str(tmp_path / "fake.png") + " is not an image"
    elif case == "rerun_without_resume":  # an out_dir holding a finished run is never overwritten by accident
        out = tmp_path / "out"
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        proc = sft(*SIZES, f"--data_dir={data_dir}", f"--out_dir={out}", check=False)
        assert proc.returncode != 0 and "--resume to continue it, --overwrite to start again" in proc.stderr
        assert os.listdir(out) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
        # --overwrite replaces the earlier log only once training starts: a run that fails first leaves it alone
        proc = sft(*SIZES, f"--data_dir={data_dir}", f"--out_dir={out}", "--overwrite", f"--robot_train={tmp_path}/nowhere", check=False)
        assert proc.returncode != 0 and (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
        return
    else:  # a copy of the reasoning json whose 3rd record names an image that does not exist
        with open(os.path.join(synth, "reasoning_train.json")) as f:
            records = json.load(f)
        records[2]["image"] = ["images/train/missing.png"]
        bad = str(tmp_path / "reasoning_train.json")
        with open(bad, "w") as f:
            json.dump(records, f)
        args, expect = [f"--reasoning_train={bad}", f"--image_root={synth}"], "record 2: image"
    out = str(tmp_path / "out")
    proc = sft(*SIZES, *args, f"--data_dir={data_dir}", f"--out_dir={out}", check=False)
    assert proc.returncode != 0 and expect in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # nothing was trained

"""align_rl.py: the GRPO loss and advantages against hand computations, the completion mask, and short runs
(one process and two, from a tiny stage-1 checkpoint built here)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from align_rl import completion_mask, group_advantages, grpo_loss
import data
from data import LiberoDataset, NormStats, chunk_at, make_synthetic_dataset
from model import Backbone, FastTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_by_hand():
    adv = group_advantages([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]], eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std sqrt((0.25 + 0.25 + 0 + 0) / 4) = sqrt(0.125)
    np.testing.assert_allclose(adv[0].numpy(), np.array([0.5, -0.5, 0.0, 0.0]) / math.sqrt(0.125), rtol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # zero variance: no signal, and no NaN
    mean_only = group_advantages([[1.0, 0.0, 0.5, 0.5]], scale=False)
    np.testing.assert_allclose(mean_only[0].numpy(), [0.5, -0.5, 0.0, 0.0])


def test_grpo_loss_by_hand_with_clipping():
    # two groups of two sequences, three token slots each; the last slot of sequence 1 is padding
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.2, 0.7], [0.3, 0.3, 0.3], [0.6, 0.1, 0.4]]))
    old = torch.log(torch.tensor([[0.5, 0.4, 0.5], [0.6, 0.2, 0.9], [0.3, 0.3, 0.3], [0.4, 0.1, 0.2]]))
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    ratio = [[1.0, 1.25, 1.0], [1.5, 1.0, 0.7 / 0.9], [1.0, 1.0, 1.0], [1.5, 1.0, 2.0]]
    per_token = []
    for i in range(4):
        row = []
        for j in range(3):
            r, a = ratio[i][j], adv[i].item()
            row.append(-min(r * a, min(max(r, 0.8), 1.2) * a))
        per_token.append(row)
    # by hand: row 0 token 1 clipped to 1.2 (positive advantage); row 1 token 0 unclipped (negative advantage
    # and ratio > 1 keeps the larger penalty); row 3 tokens 0 and 2 clipped to 1.2
    assert per_token[0][1] == pytest.approx(-1.2) and per_token[1][0] == pytest.approx(1.5) and per_token[3][2] == pytest.approx(-2.4)
    masked = [per_token[i][j] for i in range(4) for j in range(3) if mask[i, j]]
    loss, stats = grpo_loss(logp, old, adv, mask, 0.2, 0.2, "token")
    assert loss.item() == pytest.approx(sum(masked) / 11, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(3 / 11, abs=1e-6)  # row 0 t1, row 3 t0 and t2
    seq = sum(sum(per_token[i][j] for j in range(3) if mask[i, j]) / mask[i].sum().item() for i in range(4)) / 4
    assert grpo_loss(logp, old, adv, mask, 0.2, 0.2, "sequence")[0].item() == pytest.approx(seq, abs=1e-6)
    # global normalization: a shard of the batch divides by the global token count
    half, _ = grpo_loss(logp[:2], old[:2], adv[:2], mask[:2], 0.2, 0.2, "token", num_tokens=11)
    other, _ = grpo_loss(logp[2:], old[2:], adv[2:], mask[2:], 0.2, 0.2, "token", num_tokens=11)
    assert (half + other).item() == pytest.approx(loss.item(), abs=1e-6)
    # k3 KL: zero when the policy equals the reference, positive otherwise
    same = grpo_loss(logp, old, adv, mask, 0.2, 0.2, "token", ref_logp=logp, beta=0.5)[0]
    assert same.item() == pytest.approx(loss.item(), abs=1e-6)
    assert grpo_loss(logp, old, adv, mask, 0.2, 0.2, "token", ref_logp=old, beta=0.5)[0].item() > loss.item()
    with pytest.raises(ValueError, match="loss_norm"):
        grpo_loss(logp, old, adv, mask, loss_norm="nope")


def test_completion_mask_stops_after_the_first_eos():
    c = torch.tensor([[5, 6, 9, 0, 0], [9, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(completion_mask(c, 9).numpy(), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    data_dir = str(root / "data")
    make_synthetic_dataset(data_dir, seed=0, demos_per_task=1, val_demos_per_task=1, qa_per_demo=0, tasks=[("red", "blue")])
    ds = LiberoDataset(os.path.join(data_dir, "libero", "train"), horizon=4)
    stats = NormStats.compute(ds.all_actions(), ds.all_states())
    chunks = np.stack([chunk_at(ep["actions"], t, 4)[0] for ep in ds.episodes for t in range(len(ep["actions"]))])
    fast = FastTokenizer.fit(stats.normalize_actions(chunks), vocab_size=16, scale=1.0)
    sft = str(root / "sft")
    backbone = Backbone.tiny(fast_vocab_size=16, seed=0, hidden_size=32, num_layers=2, num_heads=2, vision_depth=1,
                             vision_hidden_size=32)
    # a few steps of think-then-act SFT so that sampled answers are sometimes well formed and partly right:
    # a random model's rewards are all 0 and GRPO would have nothing to update on
    torch.manual_seed(0)
    samples = [ds[i] for i in range(0, len(ds), max(1, len(ds) // 8))]
    inputs = backbone.build_inputs(
        [s["images"] for s in samples], [data.REASONING_ACTION_PROMPT.format(instruction=s["instruction"]) for s in samples],
        [f"<think>go</think><answer>{backbone.action_text(fast.encode(stats.normalize_actions(s['actions'])))}</answer>"
         for s in samples])
    optimizer = torch.optim.AdamW(backbone.model.parameters(), lr=1e-2)
    for _ in range(40):
        logits = backbone.model(**backbone._model_inputs(inputs), use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    backbone.save_pretrained(sft)
    fast.save(os.path.join(sft, "fast_tokenizer.json"))
    stats.save(os.path.join(sft, "norm_stats.json"))
    return root, data_dir, sft


def run(root, data_dir, sft, name, extra=(), nproc=1):
    argv = [f"--data_dir={data_dir}", f"--init_from={sft}", f"--out_dir={root / name}", "--max_iters=1", "--group_size=2",
            "--rollout_batch=4", "--update_batch=2", "--max_new_tokens=6", "--num_eval_prompts=2", "--num_prompts=8", *extra]
    cmd = [sys.executable, "align_rl.py", *argv] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "align_rl.py", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_runs_and_writes_a_stage_checkpoint(stage1):
    root, data_dir, sft = stage1
    r = run(root, data_dir, sft, "one")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(root / "one" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert "eval_reward_action" in lines[0] and lines[0]["step"] == 0
    for line in (lines[0], lines[-1]):  # a sampled held-out score at the start and the end (step 1)
        assert 0 <= line["eval_sampled_reward_action"] <= 1 and line["eval_sampled_reward_format"] in (0.0, 0.5, 1.0)
    assert lines[-1]["step"] == 1
    train = [m for m in lines if "reward" in m]
    assert len(train) == 1 and 0 <= train[0]["reward"] <= 1 and train[0]["zero_var_groups"] <= 4  # 4 groups of 2
    for name in ("config.json", "fast_tokenizer.json", "norm_stats.json", "run_config.json", "train_state.pt"):
        assert os.path.isfile(root / "one" / name), name
    Backbone.from_pretrained(str(root / "one"))  # the next stage's loading path


def test_two_processes_give_the_same_update_as_one(stage1):
    """Same global batch, same samples (seeded per prompt): the two-process run must take the same optimizer
    steps. lr is large so that a wrong split of prompts over updates or a wrong loss normalization would show."""
    root, data_dir, sft = stage1
    extra = ["--sample_per_prompt=True", "--lr=1e-3", "--max_new_tokens=32"]
    for name, nproc in (("one_seeded", 1), ("two_seeded", 2)):
        r = run(root, data_dir, sft, name, extra, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    logs = {}
    for name in ("one_seeded", "two_seeded"):
        with open(root / name / "metrics.jsonl") as f:
            logs[name] = [json.loads(line) for line in f if "reward" in line and "eval" not in line][0]
    one, two = logs["one_seeded"], logs["two_seeded"]
    assert one["zero_var_groups"] < 4, "every group had equal rewards: the update would be trivially zero"
    for key in ("reward", "reward_action", "reward_std", "response_len", "loss", "grad_norm", "approx_kl", "entropy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    a, b = load_file(str(root / "one_seeded" / "model.safetensors")), load_file(str(root / "two_seeded" / "model.safetensors"))
    start = load_file(os.path.join(sft, "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the update did something
    # freeze_vision (the tiny default): the vision blocks stay bit-identical, the merger (projector) trains
    vision_blocks = [k for k in a if "visual." in k and "merger." not in k]
    assert vision_blocks and all(torch.equal(a[k], start[k]) for k in vision_blocks)
    assert any(not torch.equal(a[k], start[k]) for k in a if "merger." in k)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * moved


def test_missing_sft_checkpoint_is_a_clear_error(stage1, tmp_path):
    root, data_dir, _ = stage1
    r = run(root, data_dir, str(tmp_path), "bad")
    assert r.returncode != 0 and "run `python sft.py` first" in r.stderr

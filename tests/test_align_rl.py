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

from align_rl import completion_mask, group_advantages, grpo_loss, kl_penalty, sequence_logprobs
import data
from data import LiberoDataset, NormStats, chunk_at
from prepare.synthetic import make_synthetic_dataset
from model import Backbone, FastTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_by_hand():
    adv = group_advantages([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]], eps=1e-12)
    # group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0 + 0) / 3) (EasyR1 and TRL use torch.std)
    np.testing.assert_allclose(adv[0].numpy(), np.array([0.5, -0.5, 0.0, 0.0]) / math.sqrt(0.5 / 3), rtol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # zero variance: no signal, and no NaN
    mean_only = group_advantages([[1.0, 0.0, 0.5, 0.5]], kind="mean_only")
    np.testing.assert_allclose(mean_only[0].numpy(), [0.5, -0.5, 0.0, 0.0])
    assert torch.equal(group_advantages([[0.7]]), torch.zeros(1, 1))  # G = 1: no group to compare with
    with pytest.raises(ValueError, match="advantage"):
        group_advantages([[1.0, 0.0]], kind="dr_grpo")


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
    assert stats["clipped_tokens"] == 3  # row 0 t1, row 3 t0 and t2
    seq = sum(sum(per_token[i][j] for j in range(3) if mask[i, j]) / mask[i].sum().item() for i in range(4)) / 4
    assert grpo_loss(logp, old, adv, mask, 0.2, 0.2, "sequence")[0].item() == pytest.approx(seq, abs=1e-6)
    # Dr. GRPO's constant normalizer: sequences x max_new_tokens, whatever the lengths
    assert grpo_loss(logp, old, adv, mask, 0.2, 0.2, "constant", max_new_tokens=5)[0].item() == pytest.approx(sum(masked) / 20, abs=1e-6)
    # global normalization: a shard of the batch divides by the global token count
    half, _ = grpo_loss(logp[:2], old[:2], adv[:2], mask[:2], 0.2, 0.2, "token", num_tokens=11)
    other, _ = grpo_loss(logp[2:], old[2:], adv[2:], mask[2:], 0.2, 0.2, "token", num_tokens=11)
    assert (half + other).item() == pytest.approx(loss.item(), abs=1e-6)
    # KL: zero when the policy equals the reference; k3 by hand otherwise
    same, stats = grpo_loss(logp, old, adv, mask, 0.2, 0.2, "token", ref_logp=logp, beta=0.5)
    assert same.item() == pytest.approx(loss.item(), abs=1e-6) and stats["kl"] == pytest.approx(0.0, abs=1e-7)
    d = (old - logp)[mask.bool()]
    k3 = (torch.exp(d) - d - 1).sum().item()
    with_kl, stats = grpo_loss(logp, old, adv, mask, 0.2, 0.2, "token", ref_logp=old, beta=0.5, kl_estimator="k3")
    assert with_kl.item() == pytest.approx(loss.item() + 0.5 * k3 / 11, abs=1e-6) and stats["kl"] == pytest.approx(k3, rel=1e-5)
    far = torch.full_like(logp, 20.0)  # k3 = e^(20 - logp) - ...: huge; low_var_kl clamps each token at 10
    assert kl_penalty(logp, far, "low_var_kl").max().item() == 10.0 and kl_penalty(logp, far, "k3").min().item() > 1e6
    with pytest.raises(ValueError, match="loss_norm"):
        grpo_loss(logp, old, adv, mask, loss_norm="nope")


def test_all_masked_batch_gives_zero_loss_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    for norm in ("token", "sequence", "constant"):
        loss, _ = grpo_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3), loss_norm=norm, num_tokens=0)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()


def test_completion_mask_stops_after_the_first_eos():
    c = torch.tensor([[5, 6, 9, 0, 0], [9, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(completion_mask(c, 9).numpy(), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    # mask_truncated_completions: the row that never ended gets no loss at all
    np.testing.assert_array_equal(completion_mask(c, 9, mask_truncated=True).numpy(), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0] * 5])


def tiny_backbone():
    torch.manual_seed(0)
    return Backbone.tiny(fast_vocab_size=16, seed=0, hidden_size=32, num_layers=2, num_heads=2, vision_depth=1, vision_hidden_size=32)


def chi_square_rejects(counts, probs, n, z=3.09):
    """Pearson's chi-square goodness of fit at p = 0.001 (z = 3.09; Wilson-Hilferty's approximation of the
    critical value): categories with expected count >= 5, the rest pooled into one."""
    expected = probs * n
    keep = expected >= 5
    obs, exp = np.append(counts[keep], counts[~keep].sum()), np.append(expected[keep], expected[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat > critical, stat, critical


def test_sampled_token_frequencies_match_the_log_probs_at_the_sampling_temperature():
    """Backbone.sample at T 0.7 draws from exp(sequence_logprobs(T 0.7)): the first token over 6000 samples, and
    the second token given the most frequent first one. The log-probs at T 1 (the off-policy bug) are rejected
    by the same test, so it can fail."""
    bb = tiny_backbone()
    bb.eval()
    with torch.no_grad():  # a random model is nearly uniform over its vocabulary; sharpen it so T matters
        bb.model.lm_head.weight.mul_(8)
    inputs = prompt_subset(bb, 0, 1)
    torch.manual_seed(0)
    G, T = 6000, 0.7
    completions = bb.sample(inputs, G, max_new_tokens=2, temperature=T)
    vocab = len(bb.tokenizer)
    allowed = torch.tensor([i for i in range(vocab) if i not in bb.image_token_ids])  # the sampler never emits image ids
    with torch.no_grad():
        probe = allowed[:, None]  # every possible first token, scored in one batch
        counts = np.bincount(completions[:, 0].numpy(), minlength=vocab)[allowed]
        assert counts.sum() == G
        for temperature, should_fit in ((T, True), (1.0, False)):
            logp, _ = sequence_logprobs(bb, inputs, probe, torch.ones_like(probe), temperature, group_size=len(allowed))
            probs = logp[:, 0].exp().numpy()
            assert probs.sum() == pytest.approx(1.0, abs=1e-4)  # no mass left on the suppressed image ids
            rejected, stat, critical = chi_square_rejects(counts, probs, G)
            assert rejected != should_fit, (temperature, stat, critical)
            print(f"T {temperature}: chi-square {stat:.1f}, critical {critical:.1f} (p = 0.001)")
        mode = int(np.bincount(completions[:, 0].numpy()).argmax())
        follow = completions[completions[:, 0] == mode]
        second = torch.cat([torch.full((len(allowed), 1), mode), allowed[:, None]], 1)
        logp, _ = sequence_logprobs(bb, inputs, second, torch.ones_like(second), T, group_size=len(allowed))
        counts = np.bincount(follow[:, 1].numpy(), minlength=vocab)[allowed]
        rejected, stat, critical = chi_square_rejects(counts, logp[:, 1].exp().numpy(), len(follow))
        assert len(follow) > 300 and not rejected, (len(follow), stat, critical)
        print(f"second token after the mode ({len(follow)} samples): chi-square {stat:.1f}, critical {critical:.1f}")


def test_on_policy_shortcut_and_micro_batches_give_the_gradient_of_the_full_path():
    """One optimizer step per rollout: old log-probs = the detached current ones (no forward) give the same
    gradient as a separate no-grad forward; and two micro-batches of whole groups, accumulated, give the
    gradient of one big batch (global normalizers)."""
    bb = tiny_backbone()
    P, G, T = 2, 3, 0.7
    inputs = prompt_subset(bb, 0, P)
    torch.manual_seed(1)
    completions = bb.sample(inputs, G, max_new_tokens=8, temperature=T)
    mask = completion_mask(completions, bb.eos_id)
    adv = group_advantages(torch.rand(P, G)).reshape(-1)
    params = [p for p in bb.parameters() if p.requires_grad]

    def grads(old_from_forward, parts):
        bb.zero_grad(set_to_none=True)
        for lo, hi in parts:  # prompts lo..hi and their rows, built on their own as align_rl does per micro-batch
            sub, rows = prompt_subset(bb, lo, hi), slice(lo * G, hi * G)
            logp, _ = sequence_logprobs(bb, sub, completions[rows], mask[rows], T, G)
            if old_from_forward:
                with torch.no_grad():
                    old = sequence_logprobs(bb, sub, completions[rows], mask[rows], T, G)[0]
            else:
                old = logp.detach()
            loss, _ = grpo_loss(logp, old, adv[rows], mask[rows], num_tokens=int(mask.sum()), num_sequences=P * G)
            loss.backward()
        return [p.grad.clone() for p in params if p.grad is not None]

    full = grads(True, [(0, P)])
    for got in (grads(False, [(0, P)]), grads(False, [(0, 1), (1, 2)])):
        assert len(got) == len(full)
        for a, b in zip(got, full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(g.abs().max().item() for g in full) > 1e-4  # the gradient is not trivially zero


def prompt_subset(bb, lo, hi):
    """RL prompts lo..hi of two (two 56x56 random images each), built on their own."""
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]
    texts = [data.REASONING_ACTION_PROMPT.format(instruction=f"put block {i} on the red one") for i in range(2)]
    return bb.build_inputs(images[lo:hi], texts[lo:hi])


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
    # a resumed run reads the FAST tokenizer and statistics it copied into its own out_dir, not init_from's
    r = run(root, data_dir, str(root / "moved_away"), "one", ["--resume", "--max_iters=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    # the finished run is not overwritten by accident: the same command without --resume / --overwrite refuses
    r = run(root, data_dir, sft, "one")
    assert r.returncode != 0 and "--resume to continue it, --overwrite to start again" in r.stderr


def test_ddp_and_fsdp_on_two_processes_give_the_same_update_as_one(stage1):
    """Same global batch, same samples (seeded per prompt): DDP and FSDP2 on two processes must take the same
    optimizer steps as one process. lr is large so that a wrong split of prompts over updates, a wrong loss
    normalization or a wrong gradient reduction would show; two optimizer steps per rollout (the second uses
    old log-probs from a forward), two micro-batches per step."""
    root, data_dir, sft = stage1
    extra = ["--sample_per_prompt=True", "--lr=1e-3", "--max_new_tokens=32", "--micro_batch_size=2", "--beta=0.01"]
    runs = (("one_seeded", 1, []), ("ddp_seeded", 2, []), ("fsdp_seeded", 2, ["--fsdp=True"]))
    for name, nproc, flags in runs:
        r = run(root, data_dir, sft, name, extra + flags, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    logs = {}
    for name, _, _ in runs:
        with open(root / name / "metrics.jsonl") as f:
            logs[name] = [json.loads(line) for line in f if "reward" in line and "eval" not in line][0]
    one = logs["one_seeded"]
    assert one["zero_var_groups"] < 4, "every group had equal rewards: the update would be trivially zero"
    start = load_file(os.path.join(sft, "model.safetensors"))
    a = load_file(str(root / "one_seeded" / "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # the update did something
    # freeze_vision (the tiny default): the vision blocks stay bit-identical, the merger (projector) trains
    vision_blocks = [k for k in a if "visual." in k and "merger." not in k]
    assert vision_blocks and all(torch.equal(a[k], start[k]) for k in vision_blocks)
    assert any(not torch.equal(a[k], start[k]) for k in a if "merger." in k)
    for name in ("ddp_seeded", "fsdp_seeded"):
        for key in ("reward", "reward_action", "reward_std", "response_len", "loss", "grad_norm", "approx_kl", "kl", "entropy"):
            assert logs[name][key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (name, key)
        b = load_file(str(root / name / "model.safetensors"))
        assert sorted(b) == sorted(a) and all(b[k].dtype == a[k].dtype == torch.float32 for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5 * moved, name


def test_missing_sft_checkpoint_is_a_clear_error(stage1, tmp_path):
    root, data_dir, _ = stage1
    r = run(root, data_dir, str(tmp_path), "bad")
    assert r.returncode != 0 and "run `python sft.py` first" in r.stderr

# Backbone: tiny Qwen2.5-VL built in code; save/reload through the real from_pretrained path; inputs, labels,
# generation (left padding, suppressed image ids), hidden states of a middle layer, action-token helpers.
import json
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import Backbone

torch.set_num_threads(2)
V = 64  # FAST vocab for the tests


@pytest.fixture(scope="module")
def bb():
    return Backbone.tiny(fast_vocab_size=V, seed=0)


def images(n_samples, n_images=2, seed=0, size=56):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_images)] for _ in range(n_samples)]


def test_forward_and_generate_are_fast(bb):
    inputs = bb.build_inputs(images(1), ["pick up the red block"], [bb.action_text([1, 2, 3])])
    # 56x56 -> 4x4 patches of 14 -> 4 visual tokens per image after the 2x2 merge
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert (inputs["input_ids"] == bb.image_token_id).sum() == 8
    assert inputs["pixel_values"].shape == (32, 3 * 2 * 14 * 14)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = bb.model(**inputs)
    t_forward = time.perf_counter() - t0
    assert out.logits.shape == (*inputs["input_ids"].shape, len(bb.tokenizer)) and torch.isfinite(out.loss)
    gen_inputs = bb.build_inputs(images(1), ["pick up the red block"])
    t0 = time.perf_counter()
    completion = bb.generate(gen_inputs, max_new_tokens=16)
    t_generate = time.perf_counter() - t0
    assert completion.shape[0] == 1 and completion.shape[1] <= 16
    print(f"\ntiny backbone: forward {t_forward * 1e3:.0f} ms, generate 16 tokens {t_generate * 1e3:.0f} ms")
    if t_forward + t_generate > 5.0:  # soft: the machine is shared by several agents
        warnings.warn(f"tiny forward + generate took {t_forward + t_generate:.1f} s (> 5 s)")


def test_sizes_and_default_layer(bb):
    assert (bb.hidden_size, bb.num_layers, bb.default_layer) == (128, 4, 2)
    assert Backbone.tiny(fast_vocab_size=8, num_layers=28).default_layer == 18  # the paper's 18 of 28


def test_action_tokens_round_trip(bb):
    fast_ids = [3, 17, 0, V - 1, 5, 5]
    text = bb.action_text(fast_ids)
    assert text == "<ACTION_START><act_3><act_17><act_0><act_63><act_5><act_5><ACTION_END>"
    token_ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert token_ids == [bb.action_start_id] + bb.fast_to_token_ids(fast_ids) + [bb.action_end_id]  # one id each
    assert bb.parse_action_tokens(token_ids) == fast_ids
    # embedded in text: the first ACTION_START up to the next ACTION_END
    words = bb.tokenizer("<think>left</think><answer>", add_special_tokens=False)["input_ids"]
    assert bb.parse_action_tokens(words + token_ids + token_ids) == fast_ids
    assert bb.parse_action_tokens(torch.tensor(token_ids)) == fast_ids
    assert bb.parse_action_tokens(token_ids[:-1]) is None  # no end
    assert bb.parse_action_tokens(token_ids[1:]) is None  # no start
    assert bb.parse_action_tokens(token_ids[:2] + words + token_ids[2:]) is None  # text inside
    assert bb.parse_action_tokens([bb.action_start_id, bb.action_end_id]) == []
    assert [bb.tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<answer>", "</answer>")] \
        == [bb.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("<think>", "</think>", "<answer>", "</answer>")]
    with pytest.raises(ValueError, match="FAST ids"):
        bb.fast_to_token_ids([V])


def test_new_rows_are_mean_initialized(bb):
    for emb in (bb.model.get_input_embeddings().weight, bb.model.get_output_embeddings().weight):
        old = emb[:bb.action_start_id]
        assert torch.allclose(emb[bb.action_start_id:], old.mean(0).expand(V + 2, -1))


def test_labels_mask_everything_but_the_response(bb):
    prompts, responses = ["pick up the red block", "open the drawer and then close it please"], \
        [bb.action_text([4, 9, 2]), "move left"]
    inputs = bb.build_inputs(images(2), prompts, responses)
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    for i, response in enumerate(responses):
        expect = bb.tokenizer(response, add_special_tokens=False)["input_ids"] + [bb.eos_id]
        n = int(mask[i].sum())
        assert (mask[i, :n] == 1).all() and (mask[i, n:] == 0).all()  # right padding
        assert (ids[i, n:] == bb.pad_id).all()
        assert labels[i, n - len(expect):n].tolist() == expect and ids[i, n - len(expect):n].tolist() == expect
        assert (labels[i, :n - len(expect)] == -100).all() and (labels[i, n:] == -100).all()
    assert (labels[ids == bb.image_token_id] == -100).all()
    # the HF loss is the mean next-token cross entropy over the response tokens only
    with torch.no_grad():
        out = bb.model(**inputs)
    logp = F.log_softmax(out.logits.float(), -1)
    nll = [-logp[i, t - 1, ids[i, t]] for i in range(2) for t in range(ids.shape[1]) if labels[i, t] != -100]
    assert torch.allclose(out.loss, torch.stack(nll).mean(), atol=1e-5)


def test_forward_log_probs_match_the_full_logits_in_chunks(bb):
    """Backbone.forward: the LM head only at scored positions, chunked and recomputed in backward, gives the
    log-softmax of the full logits at temperature T, its entropy, and the same gradient."""
    inputs = bb.build_inputs(images(3), ["pick up", "the red block is", "go left"], [bb.action_text([1, 2]), "left", "up up"])
    targets = torch.full_like(inputs["labels"], -100)
    targets[:, :-1] = inputs["labels"][:, 1:]
    logp, entropy = bb(inputs, targets, temperature=0.7, with_entropy=True, chunk_tokens=3)  # several chunks
    logp.sum().backward()
    chunked = bb.model.lm_head.weight.grad.clone()
    bb.model.zero_grad(set_to_none=True)
    full = F.log_softmax(bb.model(**bb._model_inputs(inputs)).logits.float() / 0.7, -1)
    scored = targets != -100
    ref = full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach() * scored, atol=1e-5, rtol=0)
    assert (logp[~scored] == 0).all()
    ref.sum().backward()
    torch.testing.assert_close(chunked, bb.model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    bb.model.zero_grad(set_to_none=True)


def test_sample_matches_generate_and_shares_the_prompt(bb):
    """Backbone.sample draws from generate's distribution (same seed, one row per prompt: the same tokens, with
    top-p too), and with G rows per prompt (prompt encoded once, KV cache repeated) at a near-zero temperature
    every row is the greedy answer; image_repeat scores G rows against once-encoded images like full rows."""
    inputs = bb.build_inputs(images(2, seed=5), ["pick up the red block", "go"])
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.8)):
        torch.manual_seed(3)
        a = bb.generate(inputs, max_new_tokens=10, do_sample=True, temperature=temperature, top_p=top_p)
        torch.manual_seed(3)
        b = bb.sample(inputs, 1, max_new_tokens=10, temperature=temperature, top_p=top_p)
        assert torch.equal(a, b[:, :a.shape[1]]) and (b[:, a.shape[1]:] == bb.pad_id).all()
    text_only = bb.build_inputs([[], []], ["pick up the red block", "go"])  # left-padded, no image
    torch.manual_seed(4)
    a = bb.generate(text_only, max_new_tokens=10, do_sample=True, temperature=0.7)
    torch.manual_seed(4)
    assert torch.equal(a, bb.sample(text_only, 1, max_new_tokens=10, temperature=0.7)[:, :a.shape[1]])
    greedy = bb.generate(inputs, max_new_tokens=10)
    rows = bb.sample(inputs, 3, max_new_tokens=10, temperature=1e-4)
    assert torch.equal(rows[:, :greedy.shape[1]], greedy.repeat_interleave(3, 0))
    expanded = bb.build_inputs([im for im in images(2, seed=5) for _ in range(3)], ["pick up the red block"] * 3 + ["go"] * 3)
    targets = torch.randint(0, 100, expanded["input_ids"].shape)
    shared = {k: v.repeat_interleave(3, 0) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(bb(shared, targets, image_repeat=3)[0], bb(expanded, targets)[0], atol=1e-5, rtol=0)


def test_left_padded_generation_matches_single(bb):
    short, long = "push the green block", "what color is the block near the gripper on top of the table?"
    imgs = images(2, seed=3)
    alone = bb.generate(bb.build_inputs(imgs[:1], [short]), max_new_tokens=12)
    batch_inputs = bb.build_inputs([imgs[0], imgs[1]], [short, long])
    assert batch_inputs["attention_mask"][0, 0] == 0 and batch_inputs["attention_mask"][:, -1].all()  # left padded
    batch = bb.generate(batch_inputs, max_new_tokens=12)
    assert torch.equal(batch[0, :alone.shape[1]], alone[0])
    # a prompt ending in an open assistant turn
    assert bb.tokenizer.decode(batch_inputs["input_ids"][1]).endswith("<|im_start|>assistant\n")


def test_completion_is_padded_after_eos(bb):
    lm_head = bb.model.get_output_embeddings()
    step = {"n": 0}

    def eos_at_third_step(module, args, out):  # force <|im_end|> on the third new token
        step["n"] += 1
        if step["n"] == 3:
            out[..., bb.eos_id] += 1e4
        return out
    handle = lm_head.register_forward_hook(eos_at_third_step)
    try:
        completion = bb.generate(bb.build_inputs(images(2), ["a", "b c"]), max_new_tokens=8)
    finally:
        handle.remove()
    assert (completion[:, 2] == bb.eos_id).all() and (completion[:, 3:] == bb.pad_id).all()


def test_image_placeholder_ids_are_suppressed(bb):
    lm_head = bb.model.get_output_embeddings()
    bias = torch.zeros(len(bb.tokenizer))
    bias[bb.image_token_ids] = 1e4  # push generation toward the image / vision placeholders

    handle = lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        inputs = bb.build_inputs(images(2), ["pick up the red block", "open the drawer"])
        raw = bb.model.generate(**bb._model_inputs(inputs), max_new_tokens=4, do_sample=False, pad_token_id=bb.pad_id)
        assert torch.isin(raw[:, inputs["input_ids"].shape[1]:], torch.tensor(bb.image_token_ids)).all()  # the bias works
        for do_sample in (False, True):
            completion = bb.generate(inputs, max_new_tokens=8, do_sample=do_sample, temperature=1.0)
            assert not torch.isin(completion, torch.tensor(bb.image_token_ids)).any()
    finally:
        handle.remove()


def test_hidden_states_match_full_model(bb):
    inputs = bb.build_inputs(images(2), ["pick up the red block", "open"], ["move left", bb.action_text([1])])
    with torch.no_grad():
        full = bb.model.model(**bb._model_inputs(inputs), output_hidden_states=True).hidden_states
        norm = bb.model.model.language_model.norm
        for layer in (1, bb.default_layer):
            feats, mask = bb.hidden_states(inputs, layer)
            assert feats.shape == (2, inputs["input_ids"].shape[1], bb.hidden_size)
            assert mask.dtype == torch.bool and torch.equal(mask, inputs["attention_mask"].bool())
            torch.testing.assert_close(feats, full[layer], atol=1e-5, rtol=0)
            # final_norm: the model's final RMSNorm on the same residual stream (GR00T N1.5 reads this)
            torch.testing.assert_close(bb.hidden_states(inputs, layer, final_norm=True)[0], norm(full[layer]), atol=1e-5, rtol=0)
        # HF's last entry is after the final norm
        torch.testing.assert_close(bb.hidden_states(inputs, bb.num_layers, final_norm=True)[0], full[-1], atol=1e-5, rtol=0)
        assert not torch.allclose(bb.hidden_states(inputs, bb.num_layers)[0], full[-1], atol=1e-3)
    assert len(bb.model.model.language_model.layers) == bb.num_layers  # the cut is undone
    # layers past `layer` do not run
    calls = []
    hooks = [lyr.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, lyr in enumerate(bb.model.model.language_model.layers)]
    try:
        bb.hidden_states(inputs, 2)
    finally:
        [h.remove() for h in hooks]
    assert calls == [0, 1]
    for bad in (0, bb.num_layers + 1):
        with pytest.raises(ValueError, match="layer must be in"):
            bb.hidden_states(inputs, bad)


def test_save_and_reload_identical(bb, tmp_path):
    bb.save_pretrained(tmp_path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "roboalign_backbone.json"):
        assert (tmp_path / f).exists(), f
    re = Backbone.from_pretrained(str(tmp_path))
    assert (re.fast_vocab_size, re.act_first_id, re.action_start_id, re.action_end_id) == \
        (bb.fast_vocab_size, bb.act_first_id, bb.action_start_id, bb.action_end_id)
    assert re.fast_to_token_ids(range(V)) == bb.fast_to_token_ids(range(V))
    assert re.tokenizer.get_vocab() == bb.tokenizer.get_vocab()
    inputs = bb.build_inputs([[Image.fromarray(im) for im in images(1)[0]], images(1, seed=1)[0]],
                             ["pick up", "the red block"], [bb.action_text([1, 2]), "left"])
    inputs_re = re.build_inputs([[Image.fromarray(im) for im in images(1)[0]], images(1, seed=1)[0]],
                                ["pick up", "the red block"], [bb.action_text([1, 2]), "left"])
    for k in inputs:
        assert torch.equal(inputs[k], inputs_re[k]), k
    with torch.no_grad():
        torch.testing.assert_close(re.model(**inputs).logits, bb.model(**inputs).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fast_vocab_size"):
        Backbone.from_pretrained(str(tmp_path), fast_vocab_size=V + 1)
    assert Backbone.from_pretrained(str(tmp_path), fast_vocab_size=V).fast_vocab_size == V
    # a mapping that disagrees with the tokenizer is caught
    meta = json.loads((tmp_path / "roboalign_backbone.json").read_text())
    (tmp_path / "roboalign_backbone.json").write_text(json.dumps({**meta, "act_first_id": meta["act_first_id"] + 1}))
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        Backbone.from_pretrained(str(tmp_path))


def test_plain_checkpoint_gets_action_tokens(tmp_path):
    """The path a downloaded Qwen2.5-VL takes: no action tokens yet -> added, embeddings resized, mean rows."""
    Backbone.write_tiny_hf_checkpoint(str(tmp_path), seed=1, num_layers=2)
    assert not (tmp_path / "roboalign_backbone.json").exists()
    with pytest.raises(ValueError, match="fast_vocab_size"):
        Backbone.from_pretrained(str(tmp_path))
    bb = Backbone.from_pretrained(str(tmp_path), fast_vocab_size=16)
    n_text = bb.action_start_id
    assert bb.act_first_id == n_text + 2 and len(bb.tokenizer) == n_text + 2 + 16
    emb = bb.model.get_input_embeddings().weight
    assert emb.shape[0] == len(bb.tokenizer) and bb.model.get_output_embeddings().weight.shape[0] == len(bb.tokenizer)
    assert torch.allclose(emb[n_text:], emb[:n_text].mean(0).expand(18, -1))
    ids = bb.tokenizer(bb.action_text([15, 0]), add_special_tokens=False)["input_ids"]
    assert bb.parse_action_tokens(ids) == [15, 0]


def test_bad_inputs(bb, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "vocab_size": 100}))
    with pytest.raises(ValueError, match="llama") as err:
        Backbone.from_pretrained(str(tmp_path))
    assert "qwen2_5_vl" in str(err.value)
    with pytest.raises(TypeError, match="uint8"):
        bb.build_inputs([[torch.rand(56, 56, 3)]], ["x"])
    with pytest.raises(TypeError, match="uint8"):
        bb.build_inputs([["/tmp/image.png"]], ["x"])
    with pytest.raises(TypeError, match="uint8"):
        bb.build_inputs([[np.zeros((56, 56, 3), np.float32)]], ["x"])
    with pytest.raises(ValueError, match="one image list per prompt"):
        bb.build_inputs(images(2), ["only one prompt"])
    with pytest.raises(AssertionError, match="left-padded"):
        bb.generate(bb.build_inputs(images(2), ["a", "b c d e"], ["x", "y"]), max_new_tokens=2)


def test_tiny_is_deterministic():
    a, b = Backbone.tiny(fast_vocab_size=8, seed=0, num_layers=1), Backbone.tiny(fast_vocab_size=8, seed=0, num_layers=1)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_completion_text_stops_at_im_end_and_keeps_action_tokens():
    b = Backbone.tiny(fast_vocab_size=8)
    ids = [b.action_start_id, *b.fast_to_token_ids([3, 0]), b.action_end_id, b.eos_id, b.pad_id, b.action_start_id]
    assert b.completion_text(torch.tensor(ids)) == "<ACTION_START><act_3><act_0><ACTION_END>"


def test_fp32_master_weights_keep_lr_1e_6_updates_that_bf16_storage_loses():
    """The stages' mixed precision: fp32 master weights and AdamW state, bf16 compute (model.compute_context).
    Ten AdamW steps at the paper's stage-2 lr (1e-6) move the weights as fp32 training does (the total
    movement within 5%, direction cosine > 0.95); the same steps on bf16-stored weights are mostly rounded away
    (bf16's step near a weight of 0.02 is ~1e-4 >> 1e-6)."""
    from model import compute_context
    torch.manual_seed(0)
    base = Backbone.tiny(fast_vocab_size=V, seed=0, hidden_size=64, num_layers=2, num_heads=2, vision_depth=1, vision_hidden_size=32)
    inputs = base.build_inputs(images(4), ["pick up", "the red block is", "go left", "open"],
                               [bb_response for bb_response in ("left", "up up", "down", "the blue block")])
    targets = torch.full_like(inputs["labels"], -100)
    targets[:, :-1] = inputs["labels"][:, 1:]
    start = {k: v.clone() for k, v in base.model.state_dict().items()}

    def train(storage, compute):
        bb = Backbone.tiny(fast_vocab_size=V, seed=0, hidden_size=64, num_layers=2, num_heads=2, vision_depth=1, vision_hidden_size=32)
        bb.model.load_state_dict(start)
        bb.to(storage)
        name = "model.language_model.layers.0.mlp.up_proj.weight"
        first = bb.model.state_dict()[name].float().clone()
        params = [p for p in bb.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        for _ in range(10):
            with compute_context(torch.device("cpu"), compute):
                logp, _ = bb(inputs, targets)
            (-logp.sum() / (targets != -100).sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return (bb.model.state_dict()[name].float() - first).flatten()

    fp32 = train(torch.float32, torch.float32)
    mixed = train(torch.float32, torch.bfloat16)
    bf16 = train(torch.bfloat16, torch.bfloat16)
    assert fp32.norm() > 1e-5  # ten steps of ~1e-6 each on 8192 weights
    assert abs(mixed.norm() / fp32.norm() - 1) < 0.05 and F.cosine_similarity(mixed, fp32, dim=0) > 0.95
    print(f"movement: fp32 {fp32.norm():.3e}, fp32 master + bf16 compute {mixed.norm():.3e} (cosine "
          f"{F.cosine_similarity(mixed, fp32, dim=0):.3f}), bf16 storage {bf16.norm():.3e} (cosine {F.cosine_similarity(bf16, fp32, dim=0):.3f}, "
          f"{(bf16 == 0).float().mean():.0%} of the weights never moved)")
    assert bf16.norm() < 0.5 * fp32.norm() and (bf16 == 0).float().mean() > 0.5, (bf16.norm(), fp32.norm())

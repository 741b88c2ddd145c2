"""RoboAlign model code, by hand: the FAST action tokenizer, the MLLM backbone wrapper, the flow-matching
DiT action head and the VLA that joins them. Read top to bottom; each section starts with what it is for.

    FastTokenizer   action chunk [H, D] <-> FAST ids (DCT + BPE)             arXiv 2603.21341 stage 0
    Backbone        Qwen2.5-VL / Qwen3-VL + <ACTION_START> <act_i> <ACTION_END>  arXiv 2603.21341 stages 0-2
    token_logprobs  log-probs of chosen tokens, LM head in chunks (never [B, L, vocab])
    fsdp_shard      FSDP2 (torch's fully_shard) for a Backbone, plus full state dicts for saving / resuming
    ActionHead      GR00T N1.5 style flow-matching DiT                        arXiv 2603.21341 stage 3
    VLA             frozen backbone layer features -> ActionHead              arXiv 2603.21341 stage 3
"""

import hashlib
import json
import math
import os
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.cache_utils import Cache, DynamicLayer


# -----------------------------------------------------------------------------
# FAST action tokenizer (Pertsch et al. 2025): DCT-II along time -> scale and round -> flatten
# frequency-major -> byte-pair encoding of the integer sequence. Pure numpy (physical-intelligence/fast processing_action_tokenizer.py).


FAST_FORMAT_VERSION = 1
_DCT_MATRICES = {}


def dct_matrix(T: int) -> np.ndarray:
    """Orthonormal DCT-II matrix M [T, T] (float64): coeff = M @ x along time, equal to
    scipy.fft.dct(x, type=2, norm="ortho", axis=0) (processing_action_tokenizer.py). M is orthogonal, so its inverse,
    the orthonormal DCT-III (scipy idct norm="ortho"), is M.T. Cached per T, read-only."""
    if T not in _DCT_MATRICES:
        n, k = np.arange(T)[None, :], np.arange(T)[:, None]
        M = np.sqrt(2.0 / T) * np.cos(np.pi * (2 * n + 1) * k / (2 * T))
        M[0] /= np.sqrt(2.0)  # c_0 = 1/sqrt(2) makes the DC row unit-norm
        M.setflags(write=False)
        _DCT_MATRICES[T] = M
    return _DCT_MATRICES[T]


def _merge_pair(seq: np.ndarray, a: int, b: int, new_id: int):
    """Replace every (a, b) in the 1-D int array by new_id, left to right without overlaps
    ("0 0 0" with a=b=0 -> "new 0"). Returns (merged, keep mask over the old positions)."""
    hits = np.flatnonzero((seq[:-1] == a) & (seq[1:] == b))
    if a == b and len(hits) > 1:  # in a run of consecutive hits only every other one can merge
        i = np.arange(len(hits))
        run_start = np.maximum.accumulate(np.where(np.r_[True, np.diff(hits) != 1], i, 0))
        hits = hits[(i - run_start) % 2 == 0]
    merged = seq.copy()
    merged[hits] = new_id
    keep = np.ones(len(seq), dtype=bool)
    keep[hits + 1] = False
    return merged[keep], keep


def _learn_bpe(sequences: np.ndarray, alphabet_size: int, vocab_size: int) -> list:
    """Integer BPE (the algorithm HF's BpeTrainer runs in the reference, processing_action_tokenizer.py, minus its byte-level
    pre-tokenizer): repeatedly merge the most frequent adjacent pair, counting overlapping occurrences,
    ties -> smallest (a, b); stop at vocab_size ids or when no pair occurs twice (min_frequency=2).
    Speed: identical sequences are counted once with a weight, and all of them live in one flat array
    (-1 separators) so each merge is a few vectorized passes (10k [8,7] chunks at vocab 256: ~1 s)."""
    uniq, counts = np.unique(sequences, axis=0, return_counts=True)
    flat = np.concatenate([uniq, np.full((len(uniq), 1), -1)], axis=1).ravel().astype(np.int64)
    weight = np.repeat(counts, uniq.shape[1] + 1).astype(np.float64)  # occurrences of each symbol's sequence
    merges = []
    for new_id in range(alphabet_size, vocab_size):
        left, right = flat[:-1], flat[1:]
        in_seq = (left >= 0) & (right >= 0)  # no pair spans a separator
        pair_counts = np.bincount(left[in_seq] * vocab_size + right[in_seq], weights=weight[:-1][in_seq])
        if len(pair_counts) == 0:
            break
        best = int(pair_counts.argmax())  # argmax takes the first maximum: the smallest pair id wins ties
        if pair_counts[best] < 2:
            break
        a, b = divmod(best, vocab_size)
        flat, keep = _merge_pair(flat, a, b, new_id)
        weight = weight[keep]
        merges.append((a, b))
    return merges


class FastTokenizer:
    """FAST tokenizer for normalized [T, D] action chunks. Ids 0..alphabet_size-1 are the shifted rounded
    DCT coefficients (coefficient = id + min_token), id alphabet_size + r is merge r. vocab_size is the
    requested size: if fit stopped early (no pair occurs twice), the ids past the last merge are never
    produced by encode; decode maps them to no coefficients and flags the sequence invalid."""

    def __init__(self, horizon, action_dim, scale, min_token, alphabet_size, merges, vocab_size):
        self.horizon, self.action_dim, self.scale = int(horizon), int(action_dim), float(scale)
        self.min_token, self.alphabet_size, self.vocab_size = int(min_token), int(alphabet_size), int(vocab_size)
        self.merges = [(int(a), int(b)) for a, b in merges]
        if self.alphabet_size < 1 or self.alphabet_size + len(self.merges) > self.vocab_size:
            raise ValueError(f"FAST: alphabet_size {self.alphabet_size} + {len(self.merges)} merges must be in [1, vocab_size={self.vocab_size}]")
        self._rank = {pair: r for r, pair in enumerate(self.merges)}
        self._expansion = [(i,) for i in range(self.alphabet_size)]  # id -> the base symbols it stands for
        for r, (a, b) in enumerate(self.merges):
            if not (0 <= a < self.alphabet_size + r and 0 <= b < self.alphabet_size + r):
                raise ValueError(f"FAST: merge {r} = ({a}, {b}) uses an id not defined before it")
            self._expansion.append(self._expansion[a] + self._expansion[b])
        self._expansion += [()] * (self.vocab_size - len(self._expansion))

    @classmethod
    def fit(cls, chunks, vocab_size=256, scale=10.0):
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or chunks.shape[0] == 0 or not np.isfinite(chunks).all():
            raise ValueError(f"FastTokenizer.fit: expected finite chunks [N, T, D] with N >= 1, got shape {chunks.shape}")
        _, T, D = chunks.shape
        coeffs = cls._coefficients(chunks, scale)
        min_token, max_token = int(coeffs.min()), int(coeffs.max())
        alphabet_size = max_token - min_token + 1
        if alphabet_size > vocab_size:
            raise ValueError(f"FAST: rounded DCT coefficients span [{min_token}, {max_token}] at scale {scale}, so the base "
                             f"alphabet alone needs {alphabet_size} ids > vocab_size={vocab_size}; use a larger vocab_size or smaller scale")
        merges = _learn_bpe(coeffs - min_token, alphabet_size, vocab_size)
        return cls(T, D, scale, min_token, alphabet_size, merges, vocab_size)

    @staticmethod
    def _coefficients(chunks, scale):
        """[N, T, D] -> int64 [N, T*D]: DCT-II ortho along time, round(coeff * scale) (np.rint, half to even like
        the reference's np.around), flatten each [T, D] in C order = frequency-major (processing_action_tokenizer.py)."""
        coeff = np.einsum("kt,ntd->nkd", dct_matrix(chunks.shape[1]), chunks)
        return np.rint(coeff * scale).astype(np.int64).reshape(len(chunks), -1)

    def _bpe_encode(self, symbols):
        """Standard BPE encode: merge the lowest-rank adjacent pair everywhere (left to right), repeat."""
        while len(symbols) > 1:
            rank = min(self._rank.get(p, len(self.merges)) for p in zip(symbols, symbols[1:]))
            if rank == len(self.merges):
                break
            (a, b), new_id, out, i = self.merges[rank], self.alphabet_size + rank, [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def encode_batch(self, chunks) -> list:
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or chunks.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"FastTokenizer: expected chunks [N, T, D] = [N, {self.horizon}, {self.action_dim}], got shape {chunks.shape}")
        if not np.isfinite(chunks).all():
            raise ValueError("FastTokenizer: action chunk contains NaN or inf")
        # Coefficients outside the fitted [min, max] are clipped into range (the reference clamps only below,
        # processing_action_tokenizer.py; an id above the alphabet would collide with a merge id). This bounds the error for
        # out-of-distribution chunks instead of failing.
        symbols = np.clip(self._coefficients(chunks, self.scale) - self.min_token, 0, self.alphabet_size - 1)
        return [self._bpe_encode(row) for row in symbols.tolist()]

    def encode(self, chunk) -> list:
        chunk = np.asarray(chunk)
        if chunk.shape != (self.horizon, self.action_dim):
            raise ValueError(f"FastTokenizer.encode: expected chunk [T, D] = [{self.horizon}, {self.action_dim}], got shape {chunk.shape}")
        return self.encode_batch(chunk[None])[0]

    def decode(self, ids, return_valid=False):
        """FAST ids -> np.float32 [T, D] (normalized units). Never raises on ints in [0, vocab_size): a sequence
        that expands to != T*D coefficients is truncated / zero-padded on the right (lerobot relaxed decoding,
        processing_action_tokenizer.py) and reported valid=False, as is one holding an id that encode never produces."""
        ids = np.asarray(ids)
        if ids.size == 0:
            ids = np.zeros(0, dtype=np.int64)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"FastTokenizer.decode: expected a 1-D sequence of ints, got shape {ids.shape} dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"FastTokenizer.decode: FAST id {int(bad[0])} out of range, valid ids are [0, {self.vocab_size})")
        symbols = [s for i in ids.tolist() for s in self._expansion[i]]
        n = self.horizon * self.action_dim
        valid = len(symbols) == n and all(i < len(self.merges) + self.alphabet_size for i in ids.tolist())
        coeff = np.zeros(n, dtype=np.float64)  # zero-pad in coefficient space (after adding min_token)
        coeff[:min(n, len(symbols))] = np.asarray(symbols[:n], dtype=np.float64) + self.min_token
        chunk = dct_matrix(self.horizon).T @ (coeff.reshape(self.horizon, self.action_dim) / self.scale)
        chunk = chunk.astype(np.float32)
        return (chunk, valid) if return_valid else chunk

    def save(self, path):
        state = {"format": "roboalign-fast", "version": FAST_FORMAT_VERSION, "horizon": self.horizon,
                 "action_dim": self.action_dim, "scale": self.scale, "min_token": self.min_token,
                 "alphabet_size": self.alphabet_size, "vocab_size": self.vocab_size, "merges": self.merges}
        with open(path, "w") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            state = json.load(f)
        for key in ("version", "horizon", "action_dim", "scale", "min_token", "alphabet_size", "vocab_size", "merges"):
            if key not in state:
                raise KeyError(f"FAST tokenizer file {path}: missing key {key!r}")
        if state["version"] != FAST_FORMAT_VERSION:
            raise ValueError(f"FAST tokenizer file {path}: format version {state['version']}, expected {FAST_FORMAT_VERSION}")
        return cls(state["horizon"], state["action_dim"], state["scale"], state["min_token"],
                   state["alphabet_size"], state["merges"], state["vocab_size"])

    def __repr__(self):
        return (f"FastTokenizer(horizon={self.horizon}, action_dim={self.action_dim}, scale={self.scale}, "
                f"vocab_size={self.vocab_size}, alphabet_size={self.alphabet_size}, merges={len(self.merges)})")


# -----------------------------------------------------------------------------
# Backbone: a thin wrapper around an HF Qwen-VL model + its processor (arXiv 2603.21341 stage 0).
# Adds <ACTION_START>, <ACTION_END> and one token <act_i> per FAST id, builds (images, prompt, response)
# training inputs with labels on the response only, generates completions, and reads the hidden states
# of one middle decoder layer for the VLA's action head (arXiv 2603.21341 stage 3: layer 18 of 28).


BACKBONE_JSON = "roboalign_backbone.json"  # our FAST id <-> vocabulary id mapping, saved next to the HF files
ACTION_START, ACTION_END = "<ACTION_START>", "<ACTION_END>"


def _supported_families():
    """model_type -> (model class, processor class), for the families the installed transformers has."""
    families = {"qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)}
    try:
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        families["qwen3_vl"] = (Qwen3VLForConditionalGeneration, Qwen3VLProcessor)
    except ImportError:
        pass
    return families


def _image_only_processor(processor_cls, image_processor, tokenizer, chat_template):
    """The Qwen-VL processor without its video processor: robot data has no video, the video processor
    needs torchvision (absent on CPU boxes), and ProcessorMixin type-checks even a None video slot.
    The subclass keeps the parent's name, so the files it writes stay plain HF files."""
    def check(self, name, arg):
        return None if (name == "video_processor" and arg is None) else processor_cls.check_argument_for_proper_class(self, name, arg)
    cls = type(processor_cls.__name__, (processor_cls,), {"check_argument_for_proper_class": check})
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template)


# Qwen2.5-VL's chat template (structured content: images then text), used by the tiny tokenizer.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # single non-special tokens (Qwen3 style)
TINY_CORPUS = """You are a helpful assistant. Describe the image. What should the robot do next?
pick up the red block and put it on the blue block. push the green block to the left. open the drawer.
the red block is left of and behind the gripper, so move left and back, then close the gripper.
the blue block is in front of and right of the gripper, so move right and forward, then open.
Think step by step about where the objects are, then answer with the action tokens.
yes no left right up down forward back above below near far on top of under next to the table.
what color is the block? how many blocks are there? where is the gripper? there are three blocks.
What action should the robot take to put the yellow block on the green block? What colour is the block closest to the gripper?
Reason about the scene inside <think></think>, then give the action tokens inside <answer></answer>.
The gripper is open. The gripper is closed and holding the red block. The green block is right under the gripper.
So the robot should move down onto the yellow block. lift the block up, open the gripper, close the gripper.
move up away from the blocks, turn to line up with the blue block, hold still. It is in front of the gripper."""


def _tiny_tokenizer(vocab_size=600):
    """Byte-level BPE trained on TINY_CORPUS (deterministic) with Qwen's special tokens, in code."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS.splitlines() * 4, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def resize_with_pad(image, size):
    """The one image preprocessing of every stage and both evaluations (openpi `image_tools.resize_with_pad`):
    scale a uint8 [H, W, 3] image to fit size x size keeping its aspect ratio (PIL bilinear), then pad with
    black to size x size, centred. A 128 x 128 training frame and a 256 x 256 simulator render thus reach the
    processor at one size, so the backbone sees the same number of visual tokens in training and evaluation.
    size = 0 leaves the image as it is (the processor's own resize alone decides)."""
    image = _as_pil(image)
    if not size or image.size == (size, size):
        return image
    width, height = image.size
    ratio = max(width / size, height / size)
    resized = image.resize((max(1, int(width / ratio)), max(1, int(height / ratio))), resample=Image.BILINEAR)
    if resized.size == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, ((size - resized.size[0]) // 2, (size - resized.size[1]) // 2))
    return canvas


def _as_pil(image):
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    desc = f"{type(image).__name__}" + (f" dtype={image.dtype} shape={tuple(image.shape)}" if hasattr(image, "shape") else "")
    raise TypeError(f"images must be uint8 numpy arrays [H, W, 3] or PIL images, got {desc}")


def _chat_template(name_or_path, tokenizer):
    """The checkpoint's template: the tokenizer's, else the processor's chat_template.json, else Qwen2.5-VL's."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    from transformers.utils import cached_file
    path = cached_file(name_or_path, "chat_template.json", _raise_exceptions_for_missing_entries=False)
    if path is not None:
        with open(path) as f:
            return json.load(f)["chat_template"]
    return QWEN_CHAT_TEMPLATE


def _save_hf(model, processor, out_dir, state_dict=None):
    """config.json, generation_config.json, model.safetensors, tokenizer files (with the chat template) and
    preprocessor_config.json: what AutoConfig / AutoTokenizer / AutoImageProcessor read back."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer for Backbone.sample: the prompt's keys / values repeated G times (each row's group shares
    its prompt) in a buffer sized for the whole generation, so a new token is written in place; HF's DynamicLayer
    concatenates the whole cache at every token."""

    def __init__(self, keys, values, repeat, capacity):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.length = keys.shape[-2]
        self.buffers = []
        for x in (keys, values):
            buffer = x.new_empty(x.shape[0] * repeat, x.shape[1], capacity, x.shape[3])
            buffer[:, :, :self.length] = x.repeat_interleave(repeat, 0)
            self.buffers.append(buffer)
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        for buffer, x in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length:self.length + n] = x
        self.length += n
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)
        return self.keys, self.values


class Backbone(nn.Module):
    def __init__(self, model, processor, fast_vocab_size, act_first_id, image_size=0):
        super().__init__()
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.image_size = int(image_size)  # every image goes through resize_with_pad(image, image_size) first
        self.fast_vocab_size, self.act_first_id = int(fast_vocab_size), int(act_first_id)
        self.action_start_id = self.tokenizer.convert_tokens_to_ids(ACTION_START)
        self.action_end_id = self.tokenizer.convert_tokens_to_ids(ACTION_END)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        # placeholder ids a completion must never contain (HF raises "Image features and image tokens do not match" otherwise)
        self.image_token_ids = sorted({cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id})
        self._check_action_tokens()

    # ---- construction ----
    @staticmethod
    def _tiny_hf(seed=0, hidden_size=128, num_layers=4, num_heads=4, vision_depth=2, vision_hidden_size=64,
                 image_size=56, text_vocab_size=600, tokenizer=None, image_processor=None):
        """A small Qwen2.5-VL (model, processor) built in code, without action tokens. tokenizer / image_processor:
        use these instead of the tiny ones (a test builds a hub-like processor from Qwen's own tokenizer files)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        tokenizer = tokenizer or _tiny_tokenizer(text_vocab_size)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        head_dim = hidden_size // num_heads
        section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # t, h, w rope sections, sum = head_dim/2
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                             max_position_embeddings=4096, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section),
                             bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
            vision_config=dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                               num_heads=max(1, vision_hidden_size // 32), out_hidden_size=hidden_size, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        pixels = image_size * image_size  # min = max pixels: an image_size^2 input is never resized
        image_processor = image_processor or Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
        return model, _image_only_processor(Qwen2_5_VLProcessor, image_processor, tokenizer, QWEN_CHAT_TEMPLATE)

    @classmethod
    def tiny(cls, fast_vocab_size=256, seed=0, **sizes):
        """Same Qwen2.5-VL architecture, small, built in code (nothing downloaded). sizes: hidden_size=128,
        num_layers=4, num_heads=4, vision_depth=2, vision_hidden_size=64, image_size=56, text_vocab_size=600.
        image_size^2 inputs stay that size -> (image_size/14)^2 patches -> 1/4 as many visual tokens (2x2 merge)."""
        model, processor = cls._tiny_hf(seed, **sizes)
        act_first_id = cls._add_action_tokens(model, processor.tokenizer, fast_vocab_size)
        return cls(model, processor, fast_vocab_size, act_first_id, image_size=sizes.get("image_size", 56))

    @classmethod
    def write_tiny_hf_checkpoint(cls, out_dir, seed=0, **sizes):
        """A plain tiny Qwen2.5-VL checkpoint without action tokens, as a downloaded one would be: lets tests
        drive the from_pretrained path that adds the action tokens."""
        model, processor = cls._tiny_hf(seed, **sizes)
        _save_hf(model, processor, out_dir)

    @classmethod
    def from_pretrained(cls, name_or_path, fast_vocab_size=None, dtype=None, attn_implementation=None, min_pixels=0,
                        max_pixels=0):
        """An HF Qwen-VL checkpoint (local directory or hub id). min_pixels / max_pixels (0 = the checkpoint's) bound
        the pixels of each image after Qwen's resize, i.e. its visual tokens (pixels / 28^2); the setting is saved
        with the processor, so later stages and evaluation see the same image sizes."""
        looks_local = name_or_path.startswith(("/", ".", "~", "out/")) or name_or_path.count("/") != 1
        if looks_local and not os.path.isdir(name_or_path):  # not a hub id "org/name": fail now, not after a hub look-up
            raise FileNotFoundError(f"{name_or_path!r}: no such checkpoint directory (a hub id has the form 'org/name')")
        from data import CHECKPOINT_TMP
        if os.path.exists(os.path.join(name_or_path, CHECKPOINT_TMP, ".complete")):  # data.save_checkpoint's commit marker
            raise RuntimeError(f"{name_or_path}: a checkpoint was being moved into place when its run stopped, so the files "
                               "are of two steps: start that run again with --resume (it finishes the move), then load it")
        config = AutoConfig.from_pretrained(name_or_path)
        families = _supported_families()
        if config.model_type not in families:
            raise ValueError(f"{name_or_path}: model_type '{config.model_type}' is not supported; "
                             f"supported Qwen-VL families: {sorted(families)}")
        model_cls, processor_cls = families[config.model_type]
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = model_cls.from_pretrained(name_or_path, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, **pixels)
        processor = _image_only_processor(processor_cls, image_processor, tokenizer, _chat_template(name_or_path, tokenizer))
        saved = None
        if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, BACKBONE_JSON)):
            with open(os.path.join(name_or_path, BACKBONE_JSON)) as f:
                saved = json.load(f)
        if saved is not None:  # the checkpoint already has the action tokens: use its mapping
            if fast_vocab_size is not None and fast_vocab_size != saved["fast_vocab_size"]:
                raise ValueError(f"{name_or_path}/{BACKBONE_JSON}: fast_vocab_size={saved['fast_vocab_size']} "
                                 f"but fast_vocab_size={fast_vocab_size} was asked for")
            return cls(model, processor, saved["fast_vocab_size"], saved["act_first_id"], saved.get("image_size", 0))
        if ACTION_START in tokenizer.get_vocab():
            raise ValueError(f"{name_or_path}: tokenizer has {ACTION_START} but no {BACKBONE_JSON} with the FAST id mapping")
        if fast_vocab_size is None:
            raise ValueError(f"{name_or_path} has no action tokens yet ({BACKBONE_JSON} missing): pass fast_vocab_size")
        act_first_id = cls._add_action_tokens(model, tokenizer, fast_vocab_size)
        return cls(model, processor, fast_vocab_size, act_first_id)

    @staticmethod
    def _add_action_tokens(model, tokenizer, fast_vocab_size):
        """Add <ACTION_START>, <ACTION_END>, <act_0>..<act_{V-1}> as special tokens (one id each, the act tokens
        a contiguous block), resize the embeddings (and the untied lm_head), and set the new rows to the mean
        of the existing token rows (rows past len(tokenizer) in Qwen's padded vocab were never trained)."""
        n_old = len(tokenizer)
        act_tokens = [f"<act_{i}>" for i in range(fast_vocab_size)]
        tokenizer.add_tokens([ACTION_START, ACTION_END] + act_tokens, special_tokens=True)
        new_ids = tokenizer.convert_tokens_to_ids([ACTION_START, ACTION_END] + act_tokens)
        if new_ids != list(range(n_old, n_old + 2 + fast_vocab_size)):
            raise ValueError("action tokens did not get a contiguous id block (some already in the vocabulary?)")
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
                emb.weight[n_old:len(tokenizer)] = emb.weight[:n_old].float().mean(0).to(emb.weight.dtype)
        return n_old + 2

    def set_image_size(self, image_size, source=None):
        """The resize_with_pad size of this run. A checkpoint that recorded another size (BACKBONE_JSON) was trained
        on other images, so continuing it at this size is an error, not a silent change of its inputs."""
        image_size = int(image_size)
        if image_size < 0:
            raise ValueError(f"image_size={image_size} must be >= 0 (0 = images go to the processor as they are)")
        if source is not None and self.image_size and self.image_size != image_size:
            raise ValueError(f"{source}/{BACKBONE_JSON}: this backbone was trained on {self.image_size} x {self.image_size} "
                             f"images, the run asks for image_size={image_size}: pass --image_size={self.image_size}")
        self.image_size = image_size

    def _check_action_tokens(self):
        expect = list(range(self.act_first_id, self.act_first_id + self.fast_vocab_size))
        got = self.tokenizer.convert_tokens_to_ids([f"<act_{i}>" for i in range(self.fast_vocab_size)])
        if got != expect or self.action_start_id in (None, self.tokenizer.unk_token_id) or self.action_end_id is None:
            raise ValueError(f"action token mapping (first id {self.act_first_id}, V={self.fast_vocab_size}) "
                             "does not match the tokenizer")

    def save_pretrained(self, out_dir, state_dict=None):
        """A plain HF checkpoint (+ our action-token mapping). Under FSDP pass state_dict=full_state_dict(...)."""
        _save_hf(self.model, self.processor, out_dir, state_dict)
        with open(os.path.join(out_dir, BACKBONE_JSON), "w") as f:
            json.dump({"fast_vocab_size": self.fast_vocab_size, "act_first_id": self.act_first_id,
                       "action_start_id": self.action_start_id, "action_end_id": self.action_end_id,
                       "image_size": self.image_size}, f, indent=1)

    def freeze_vision_blocks(self):
        """requires_grad off for the vision tower except its merger (Qwen-VL's projector into the LLM, which
        trains): arXiv 2603.21341 stage 1 keeps the vision encoder frozen."""
        for name, p in self.model.model.visual.named_parameters():
            p.requires_grad_(name.startswith("merger."))

    # ---- properties and token helpers ----
    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self):
        return self.text_config.hidden_size

    @property
    def num_layers(self):
        return self.text_config.num_hidden_layers

    @property
    def default_layer(self):
        return (2 * self.num_layers) // 3  # floor(2/3 depth): 18 of the 7B's 28, as the paper reads (round would give 19)

    @property
    def device(self):
        return self.model.device

    def fast_to_token_ids(self, fast_ids):
        fast_ids = [int(i) for i in fast_ids]
        if any(not 0 <= i < self.fast_vocab_size for i in fast_ids):
            raise ValueError(f"FAST ids must be in [0, {self.fast_vocab_size}), got {fast_ids}")
        return [self.act_first_id + i for i in fast_ids]

    def action_text(self, fast_ids):
        return ACTION_START + "".join(f"<act_{int(i)}>" for i in fast_ids) + ACTION_END

    def parse_action_tokens(self, token_ids):
        """FAST ids between the first <ACTION_START> and the next <ACTION_END>; None if absent or if anything
        other than act tokens sits in between."""
        ids = token_ids.tolist() if torch.is_tensor(token_ids) else list(token_ids)
        if self.action_start_id not in ids:
            return None
        start = ids.index(self.action_start_id) + 1
        if self.action_end_id not in ids[start:]:
            return None
        body = ids[start:ids.index(self.action_end_id, start)]
        fast = [i - self.act_first_id for i in body]
        return fast if all(0 <= f < self.fast_vocab_size for f in fast) else None

    def completion_text(self, ids):
        """Generated ids (cut at <|im_end|>) -> text, keeping <ACTION_START>, <act_i>, <think> etc. as written."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---- inputs ----
    def build_inputs(self, images, prompts, responses=None, padding_side="right", system_prompt=None, max_length=0):
        """images: per sample a list of uint8 [H, W, 3] arrays or PIL images; prompt/response strings.
        Returns input_ids, attention_mask, labels (-100 except the response and its closing <|im_end|>),
        pixel_values, image_grid_thw and mm_token_type_ids (1 on image tokens; Qwen's 3D rope needs it).
        Every image first goes through resize_with_pad(image, self.image_size).
        A multi-turn conversation: prompts[i] and responses[i] are lists of the user and assistant turns (images
        with the first user turn); one sequence in the chat format with labels on every assistant turn.
        responses=None -> generation inputs: the assistant prompt is opened, left padding.
        max_length > 0: a longer sample keeps its first prompt (images included) and the tokens after it up to
        max_length; a prompt alone longer than that is an error (lower image_size / max_pixels instead)."""
        if isinstance(prompts, str) or len(images) != len(prompts):
            raise ValueError(f"need one image list per prompt: got {len(images)} image lists and "
                             f"{1 if isinstance(prompts, str) else len(prompts)} prompts")
        if responses is not None and len(responses) != len(prompts):
            raise ValueError(f"got {len(responses)} responses for {len(prompts)} prompts")
        if responses is None:
            padding_side = "left"
        flat_images, texts, follow_ups = [], [], []
        for i, (sample_images, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(sample_images, (list, tuple)):
                raise TypeError(f"images must be a list of lists of images, got an element of type {type(sample_images).__name__}")
            turns = [prompt] if isinstance(prompt, str) else list(prompt)
            answers = None if responses is None else [responses[i]] if isinstance(responses[i], str) else list(responses[i])
            if not turns or (answers is not None and len(answers) != len(turns)) or (answers is None and len(turns) > 1):
                raise ValueError(f"sample {i}: {len(turns)} user turns and "
                                 f"{'no' if answers is None else len(answers)} assistant turns (expected one each)")
            flat_images += [resize_with_pad(im, self.image_size) for im in sample_images]
            messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            messages.append({"role": "user", "content": [{"type": "image"}] * len(sample_images) + [{"type": "text", "text": turns[0]}]})
            texts.append(self.tokenizer.apply_chat_template(messages, chat_template=self.processor.chat_template,
                                                            tokenize=False, add_generation_prompt=True))
            # later turns in Qwen's ChatML: the template writes an assistant turn as its text + <|im_end|> + "\n"
            follow_ups.append([(None, answers[0])] if answers else [])
            for question, answer in zip(turns[1:], (answers or [])[1:]):
                follow_ups[-1].append((f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", answer))
        # the processor expands each <|image_pad|> to the image's number of merged patches
        enc = self.processor(text=texts, images=flat_images or None, padding=False)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
        rows, label_rows = [], []
        for i, prompt_ids in enumerate(enc["input_ids"]):
            row, labels = list(prompt_ids), [-100] * len(prompt_ids)
            for question, answer in follow_ups[i]:
                if question is not None:
                    ids = encode(question)
                    row, labels = row + ids, labels + [-100] * len(ids)
                ids = encode(answer) + [self.eos_id]
                row, labels = row + ids, labels + ids
            if max_length and len(row) > max_length:
                if len(prompt_ids) >= max_length:
                    raise ValueError(f"sample {i}: its prompt has {len(prompt_ids)} tokens ({int((np.asarray(prompt_ids) == self.image_token_id).sum())} "
                                     f"of them image tokens), max_length={max_length}: lower image_size / max_pixels or raise max_seq_len")
                row, labels = row[:max_length], labels[:max_length]
            rows.append(row)
            label_rows.append(labels)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, label_rows)):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[i, span], labels[i, span], attention_mask[i, span] = torch.tensor(row), torch.tensor(lab), 1
        out = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                   mm_token_type_ids=(input_ids == self.image_token_id).long())
        if flat_images:
            out["pixel_values"] = torch.as_tensor(np.asarray(enc["pixel_values"]), dtype=torch.float32)
            out["image_grid_thw"] = torch.as_tensor(np.asarray(enc["image_grid_thw"]), dtype=torch.long)
        return out

    def _model_inputs(self, inputs, image_repeat=1):
        """The HF model's keyword arguments. image_repeat=G: the text rows are prompts x G (each prompt's rows
        consecutive) while the images are given once per prompt; each image is encoded once and its features
        repeated for the prompt's G rows (a GRPO group shares its prompt)."""
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        out = {k: inputs[k].to(self.device) for k in keys if inputs.get(k) is not None}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        if image_repeat > 1 and "pixel_values" in out:
            per_prompt = (out["input_ids"][::image_repeat] == self.model.config.vision_start_token_id).sum(1).tolist()
            assert len(per_prompt) * image_repeat == len(out["input_ids"]) and sum(per_prompt) == len(out["image_grid_thw"])
            features = self.model.model.get_image_features(out.pop("pixel_values"), out["image_grid_thw"], return_dict=True)
            starts = np.cumsum([0] + per_prompt)
            repeat = lambda per_image: tuple(x for a, b in zip(starts[:-1], starts[1:]) for _ in range(image_repeat)
                                             for x in per_image[a:b])
            features.pooler_output = repeat(features.pooler_output)
            if getattr(features, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per image
                features.deepstack_features = [repeat(layer) for layer in features.deepstack_features]
            out["mm_encoder_outputs"] = {"image": features}
            grid = out["image_grid_thw"]
            out["image_grid_thw"] = torch.cat([grid[a:b] for a, b in zip(starts[:-1], starts[1:]) for _ in range(image_repeat)])
        return out

    @staticmethod
    def _text_positions(model_inputs):
        """Text-only inputs: positions counted from each row's first real token, as generate() does (Qwen-VL's forward
        would count from the left edge, padding included), so sampling and scoring see the same positions."""
        if "image_grid_thw" not in model_inputs:
            positions = (model_inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            model_inputs["position_ids"] = positions[None].expand(3, -1, -1)
        return model_inputs

    # ---- model calls ----
    def forward(self, inputs, targets, temperature=1.0, suppress_image_tokens=False, with_entropy=False, chunk_tokens=1024,
                image_repeat=1):
        """Log-probs of `targets` [B, L] (the token each input position predicts; -100 = not scored) under
        softmax(logits / temperature): float32 [B, L], 0 where not scored; with_entropy also the per-position
        entropy [B, L] (detached), else None. The LM head runs only at scored positions, in chunks
        (token_logprobs). suppress_image_tokens scores the distribution generate() samples from, which never
        emits image / vision ids. image_repeat: see _model_inputs. This is the module's forward so that DDP's and
        FSDP's hooks run around it."""
        model_inputs = self._text_positions(self._model_inputs(inputs, image_repeat))
        hidden = self.model.model(**model_inputs, use_cache=False).last_hidden_state
        targets = targets.to(hidden.device)
        scored = targets != -100
        logp, entropy = token_logprobs(hidden[scored], self.model.lm_head, targets[scored], temperature,
                                       self.image_token_ids if suppress_image_tokens else (), chunk_tokens, with_entropy)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device).masked_scatter(scored, logp)
        if with_entropy:
            entropy = torch.zeros_like(out).masked_scatter(scored, entropy)
        return out, entropy

    @contextmanager
    def gathered(self):
        """Under FSDP, every parameter unsharded once for the whole block (e.g. a rollout's generate calls, or
        feature extraction) instead of an all-gather per layer per decoded token; a no-op otherwise. Reentrant."""
        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        if not units or getattr(self, "_gathered", False):
            yield
            return
        self._gathered = True
        for m in units:
            if m is not self:  # the root is never resharded after forward (FSDP2's own rule); the layers, not now
                m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                if m is not self:
                    m.set_reshard_after_forward(True, recurse=False)
            self._gathered = False

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens=64, do_sample=False, temperature=1.0, top_p=1.0):
        """Completion ids only [B, new], right-padded with pad_id after <|im_end|>. All sampling settings are
        explicit (top_k off, no repetition penalty) so a checkpoint's generation_config cannot change them;
        image / video / vision-start / vision-end ids are suppressed (a generated image id breaks the next forward). Generation stops when
        every sequence has emitted <|im_end|>."""
        with self.gathered():
            model_inputs = self._model_inputs(inputs)
            assert (model_inputs["attention_mask"][:, -1] == 1).all(), "generate takes left-padded inputs (responses=None)"
            sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}  # top_k=0: off
            out = self.model.generate(**model_inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      repetition_penalty=1.0, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                      suppress_tokens=self.image_token_ids, use_cache=True, **sampling)
        completion = out[:, model_inputs["input_ids"].shape[1]:]
        after_eos = (completion == self.eos_id).long().cumsum(1) - (completion == self.eos_id).long() > 0
        return completion.masked_fill(after_eos, self.pad_id)

    @torch.no_grad()
    def sample(self, inputs, group_size=1, max_new_tokens=64, temperature=1.0, top_p=1.0):
        """group_size sampled completions per (left-padded) prompt: [P * G, new] ids, each prompt's G rows
        consecutive, right-padded with pad_id after <|im_end|>; the same distribution as generate(do_sample=True)
        (temperature, then top-p, image ids suppressed). Each prompt and its images are encoded once and the
        prompt's KV cache is repeated G times (the prefix sharing of vLLM / SGLang, which EasyR1 samples with);
        decoding stops when every row has emitted <|im_end|>."""
        with self.gathered():
            model_inputs = self._text_positions(self._model_inputs(inputs))
            assert (model_inputs["attention_mask"][:, -1] == 1).all(), "sample takes left-padded inputs (responses=None)"
            inner = self.model.model
            inner.rope_deltas = None  # set by the prompt's forward below (Qwen-VL's 3D rope offsets)
            out = self.model(**model_inputs, use_cache=True, logits_to_keep=1)
            capacity = model_inputs["input_ids"].shape[1] + max_new_tokens
            cache = Cache(layers=[_PreallocatedLayer(layer.keys, layer.values, group_size, capacity) for layer in out.cache.layers])
            logits = out.logits[:, -1].float().repeat_interleave(group_size, 0)
            del out
            rope_deltas = 0 if inner.rope_deltas is None else inner.rope_deltas.repeat_interleave(group_size, 0)
            mask = model_inputs["attention_mask"].repeat_interleave(group_size, 0)
            suppress = torch.tensor(self.image_token_ids, device=logits.device)
            tokens, done = [], torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
            for _ in range(max_new_tokens):
                probs = torch.softmax(logits.index_fill(1, suppress, float("-inf")) / temperature, -1)
                if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p (HF's rule)
                    sorted_probs, order = probs.sort(-1, descending=True)
                    sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                nxt = torch.multinomial(probs, 1)[:, 0].masked_fill(done, self.pad_id)
                tokens.append(nxt)
                done |= nxt == self.eos_id
                if done.all() or len(tokens) == max_new_tokens:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                position = (mask.sum(1, keepdim=True) - 1 + rope_deltas)[None].expand(3, -1, -1)
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
                logits = out.logits[:, -1].float()
        return torch.stack(tokens, 1)

    def hidden_states(self, inputs, layer, final_norm=False):
        """Output of decoder layer `layer` (1-based count of layers applied) and the attention mask as bool.
        final_norm=False: HF's output_hidden_states[layer], the raw residual stream. final_norm=True: the model's
        final RMSNorm applied to it, which is what GR00T N1.5 feeds its head (Isaac-GR00T
        gr00t/model/backbone/eagle_backbone.py drops the layers above select_layer and reads the last hidden
        state, which HF returns after the final norm). For Qwen3-VL it includes the deepstack visual features
        added after the first layers, i.e. what layer `layer`+1 sees. Only the first `layer` layers run (the 7B
        reads layer 18 of 28, arXiv 2603.21341 section 4): the layer list is cut for this call."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in [1, {self.num_layers}] (1-based count of decoder layers), got {layer}")
        language_model = self.model.model.language_model
        all_layers, norm = language_model.layers, language_model.norm
        with self.gathered():
            model_inputs = self._model_inputs(inputs)
            language_model.layers = all_layers[:layer]
            if not final_norm:
                language_model.norm = nn.Identity()
            try:
                feats = self.model.model(**model_inputs, use_cache=False).last_hidden_state
            finally:
                language_model.layers, language_model.norm = all_layers, norm
        return feats, model_inputs["attention_mask"].bool()


def token_logprobs(hidden, lm_head, targets, temperature=1.0, suppress_ids=(), chunk_tokens=1024, with_entropy=False):
    """log softmax(lm_head(hidden) / temperature)[targets] for hidden [M, d] and targets [M]: float32 [M], and
    the entropy [M] (detached) or None. Computed as the target logit minus the logsumexp, chunk_tokens rows at
    a time; with grad each chunk is recomputed in backward (torch.utils.checkpoint), so the memory peak is one
    chunk's [chunk, vocab] fp32 logits, never [M, vocab] (a 7B's 152k vocabulary x 2k tokens would be 1.2 GB a row)."""
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], (tuple(hidden.shape), tuple(targets.shape))
    suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=hidden.device)

    def chunk(h, t):
        logits = lm_head(h).float() / temperature
        if len(suppress):
            logits = logits.index_fill(1, suppress, float("-inf"))
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(1, t[:, None])[:, 0] - lse
        if not with_entropy:
            return logp, None
        with torch.no_grad():  # H = lse - sum p * logits (suppressed ids have p = 0)
            entropy = lse - (torch.softmax(logits, -1) * logits.nan_to_num(neginf=0.0)).sum(-1)
        return logp, entropy

    outs = []
    for k in range(0, max(len(targets), 1), chunk_tokens):
        h, t = hidden[k:k + chunk_tokens], targets[k:k + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(torch.utils.checkpoint.checkpoint(chunk, h, t, use_reentrant=False))
        else:
            outs.append(chunk(h, t))
    logp = torch.cat([o[0] for o in outs])
    return logp, (torch.cat([o[1] for o in outs]) if with_entropy else None)


# -----------------------------------------------------------------------------
# Distributed training in one place: FSDP2 (torch.distributed.fsdp.fully_shard) as torchtitan applies it
# (torchtitan/models/llama3/infra/parallelize.py: each block, then the root), and state dicts that do not
# depend on how the model is distributed. DDP (torch.nn.parallel) stays the default for models that fit.


def fsdp_shard(backbone, compute_dtype=torch.bfloat16):
    """Shard a Backbone over the default process group: each vision block and each LM decoder layer is one FSDP
    unit, the root (embeddings, lm_head, norms, the merger) another. Parameters keep their dtype (fp32 master
    weights, or a frozen bf16 model) and are all-gathered in compute_dtype; gradients are reduce-scattered in
    fp32. Call Backbone.forward through the returned module for training; generate / hidden_states gather all
    parameters once per call (Backbone.gathered)."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    inner = backbone.model.model
    for block in inner.visual.blocks:
        fully_shard(block, mp_policy=policy)
    for layer in inner.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(backbone, mp_policy=policy)
    # FSDP2 takes the first module to run forward as its root; generate() runs the layers outside
    # Backbone.forward, so fix the root now
    backbone._get_fsdp_state()._lazy_init()
    return backbone


def full_state_dict(module):
    """The module's state dict with every sharded tensor gathered, on CPU: on rank 0 under FSDP (a collective:
    every rank must call it; other ranks get {}), the plain state dict otherwise."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if rank == 0:
            out[name] = tensor.detach().cpu()
    return out


def weights_fingerprint(state_dict):
    """A content hash of a module's weights: every tensor's name, shape, dtype and a strided sample of its
    values (cheap even for a 7B on GPU, and any fine-tuning changes the sampled values)."""
    h = hashlib.sha256()
    for name, p in sorted(state_dict.items()):
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].float().cpu().numpy()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def optimizer_state_dict(model, optimizer):
    """The optimizer state keyed by parameter name, gathered on rank 0 under FSDP (a collective): the same file
    whatever the world size or DDP / FSDP, so a run can resume on another number of GPUs."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model, optimizer, state):
    """Inverse of optimizer_state_dict, on every rank (each holds the full state; FSDP keeps its shard)."""
    options = StateDictOptions(full_state_dict=True) if dist.is_initialized() else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, state, options=options)


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_ (max_norm <= 0: no clipping), returning the total norm as a float, also when the
    gradients are FSDP-sharded DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def compute_context(device, dtype, fsdp=False):
    """Mixed precision without FSDP: fp32 master weights, matmuls in `dtype` under autocast (FSDP's
    MixedPrecisionPolicy casts the gathered parameters itself)."""
    if dtype == torch.float32 or fsdp:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -----------------------------------------------------------------------------
# Stage 3: the VLA = frozen MLLM middle-layer features + a flow-matching DiT action head
# (GR00T N1.5 style; arXiv 2603.21341 stage 3, Isaac-GR00T gr00t/model/action_head/flow_matching_action_head.py).


NUM_TIMESTEP_BUCKETS = 1000  # GR00T feeds int(t * 1000) to its time encoders (flow_matching_action_head.py)
TIME_EMBED_FREQ_DIM = 256  # diffusers Timesteps(256, ...) in GR00T's TimestepEncoder (cross_attention_dit.py)


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding [N, dim] of (discrete) timesteps [N] (float32).

    flip_sin_to_cos=True, downscale_freq_shift=1 is diffusers' `Timesteps` as GR00T's DiT time encoder
    uses it; the defaults are GR00T's `SinusoidalPositionalEncoding` in the action encoder.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sample_flow_time(batch_size, device=None, generator=None, alpha=1.5, noise_s=0.999):
    """GR00T's flow time: s ~ Beta(1.5, 1), t = 0.999 * (1 - s); t=0 is noise, t=1 is data (flow_matching_action_head.py).

    Beta(a, 1) has CDF s^a, so s = u^(1/a) with u ~ U(0, 1) samples it exactly and honours `generator`.
    E[s] = a / (a + 1) = 0.6, so E[t] = 0.999 * 0.4 = 0.3996: most mass near the noisy end.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=gen_device).to(device)
    s = u.pow(1.0 / alpha)
    return noise_s * (1.0 - s)


class Attention(nn.Module):
    """Multi-head attention via scaled_dot_product_attention; `context` given = cross-attention.

    key_mask [B, Lk] bool, True = this key may be attended (a key padding mask).
    """

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"ActionHead: width={width} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, context=None, key_mask=None):
        context = x if context is None else context
        B, T, C = x.shape
        split = lambda y: y.view(B, y.shape[1], self.heads, C // self.heads).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.out(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, width, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.dropout = dropout

    def forward(self, x):
        x = F.gelu(self.fc(x), approximate="tanh")  # GR00T: activation "gelu-approximate"
        x = F.dropout(x, self.dropout, self.training)
        return F.dropout(self.proj(x), self.dropout, self.training)  # GR00T: final_dropout=True


class AdaLayerNorm(nn.Module):
    """LN(x) * (1 + scale) + shift, (scale, shift) = Linear(SiLU(temb)) (GR00T AdaLayerNorm, cross_attention_dit.py)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.linear = nn.Linear(width, 2 * width)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class VLSelfAttentionBlock(nn.Module):
    """Pre-LN transformer block for the VL feature stack (GR00T N1.5 `vl_self_attention`)."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), Attention(width, heads, dropout)
        self.ln_2, self.ff = nn.LayerNorm(width), FeedForward(width, dropout)

    def forward(self, x, key_mask):
        x = x + self.attn(self.ln_1(x), key_mask=key_mask)
        return x + self.ff(self.ln_2(x))


class DiTBlock(nn.Module):
    """adaLN(x, temb) -> attention -> residual; LN -> FF -> residual (GR00T BasicTransformerBlock, ada_norm).

    cross=True: queries from the action-side tokens, keys/values from the VL features.
    """

    def __init__(self, width, heads, dropout, cross):
        super().__init__()
        self.cross = cross
        self.norm_1, self.attn = AdaLayerNorm(width), Attention(width, heads, dropout)
        self.norm_2, self.ff = nn.LayerNorm(width, elementwise_affine=False), FeedForward(width, dropout)

    def forward(self, x, temb, vl, vl_mask, token_mask):
        h = self.norm_1(x, temb)
        if self.cross:
            x = x + self.attn(h, context=vl, key_mask=vl_mask)
        else:
            x = x + self.attn(h, key_mask=token_mask)
        return x + self.ff(self.norm_2(x))


class ActionHead(nn.Module):
    """Flow-matching diffusion-transformer action head (GR00T N1.5, Isaac-GR00T gr00t/model/action_head/), single embodiment.

    Inputs and outputs are in normalized units. Tokens into the DiT: [state (1) | future (K) | actions (H)];
    even blocks cross-attend to the (normed, self-attended) VL features, odd blocks self-attend; all blocks
    are conditioned on the flow time through adaptive LayerNorm. Prediction = velocity at the last H tokens.

    self_attention=False (a deviation from GR00T, for tiny heads): every block cross-attends to the VL features,
    the tokens are the H action tokens alone and the state embedding is added to each of them. At width 64 x
    depth 2 and train_vla's budget this flow head ends at 0.25 of the mean-chunk floor on the embedded default,
    0.39 with GR00T's blocks (README, "The VLA against the floor"). The price: the steps of a sampled chunk are
    independent given the context, so a chunk with two distinct futures (grasp now or a step later) is not
    drawn as a whole.
    """

    def __init__(self, feature_dim, action_dim=7, state_dim=8, horizon=8, width=128, depth=4, heads=4,
                 num_future_tokens=8, num_vl_self_attn_layers=1, dropout=0.0, self_attention=True):
        super().__init__()
        self.config = dict(feature_dim=feature_dim, action_dim=action_dim, state_dim=state_dim, horizon=horizon,
                           width=width, depth=depth, heads=heads, num_future_tokens=num_future_tokens,
                           num_vl_self_attn_layers=num_vl_self_attn_layers, dropout=dropout,
                           self_attention=bool(self_attention))
        for key in ("feature_dim", "action_dim", "state_dim", "horizon", "width", "depth", "heads"):
            if int(self.config[key]) < 1:
                raise ValueError(f"ActionHead: {key}={self.config[key]} must be >= 1")
        if not self_attention and num_future_tokens:
            raise ValueError(f"ActionHead: num_future_tokens={num_future_tokens} needs self_attention=True (only "
                             "self-attention reads the future tokens); set num_future_tokens=0")
        self.feature_dim, self.action_dim, self.state_dim, self.horizon = feature_dim, action_dim, state_dim, horizon
        self.width, self.num_future_tokens, self.self_attention = width, num_future_tokens, bool(self_attention)
        # VL features: LayerNorm (GR00T `vlln`) -> project to the DiT width -> small self-attention stack.
        # (GR00T keeps the 2048-d features and projects inside cross-attention; one Linear here is equivalent.)
        self.vl_norm = nn.LayerNorm(feature_dim)
        self.vl_proj = nn.Linear(feature_dim, width) if feature_dim != width else nn.Identity()
        self.vl_blocks = nn.ModuleList(VLSelfAttentionBlock(width, heads, dropout) for _ in range(num_vl_self_attn_layers))
        # flow time -> temb (GR00T TimestepEncoder: Timesteps(256) + TimestepEmbedding)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_EMBED_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # state -> one token (CategorySpecificMLP: Linear -> ReLU -> Linear)
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, width), nn.ReLU(), nn.Linear(width, width))
        # noisy actions -> tokens (MultiEmbodimentActionEncoder): W1(a) ++ sin(t) -> W2 -> swish -> W3, + position
        self.action_w1 = nn.Linear(action_dim, width)
        self.action_w2 = nn.Linear(2 * width, width)
        self.action_w3 = nn.Linear(width, width)
        self.action_pos = nn.Embedding(horizon, width)
        if self_attention:
            self.future_tokens = nn.Parameter(0.02 * torch.randn(num_future_tokens, width))  # GR00T: std 0.02
        self.blocks = nn.ModuleList(DiTBlock(width, heads, dropout, cross=(i % 2 == 0 or not self_attention))
                                    for i in range(depth))
        self.gradient_checkpointing = False  # train_vla's gradient_checkpointing; not part of the saved config
        # output: adaLN without affine, scale/shift from temb (proj_out_1), then proj_out_2, then decoder MLP
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.proj_out_2 = nn.Linear(width, width)
        self.action_decoder = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, action_dim))

    # --- input checks -------------------------------------------------------------------------------
    def _check(self, features, feature_mask, state, actions=None, action_mask=None):
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"ActionHead: features must be [B, L, feature_dim={self.feature_dim}], got {tuple(features.shape)}")
        B, L = features.shape[:2]
        if feature_mask is not None and tuple(feature_mask.shape) != (B, L):
            raise ValueError(f"ActionHead: feature_mask must be [B, L] = {(B, L)}, got {tuple(feature_mask.shape)}")
        if feature_mask is not None and not bool(feature_mask.bool().any(dim=1).all()):
            raise ValueError("ActionHead: feature_mask has a row with no valid feature (nothing to attend to)")
        if state.dim() != 2 or state.shape[0] != B:
            raise ValueError(f"ActionHead: state must be [B={B}, state_dim={self.state_dim}], got {tuple(state.shape)}")
        if state.shape[1] != self.state_dim:
            raise ValueError(f"ActionHead: state has {state.shape[1]} dims, the head expects state_dim={self.state_dim}")
        if actions is not None and tuple(actions.shape) != (B, self.horizon, self.action_dim):
            raise ValueError(f"ActionHead: actions must be [B, horizon, action_dim] = {(B, self.horizon, self.action_dim)}, "
                             f"got {tuple(actions.shape)}")
        if action_mask is not None and tuple(action_mask.shape) != (B, self.horizon):
            raise ValueError(f"ActionHead: action_mask must be [B, horizon] = {(B, self.horizon)}, got {tuple(action_mask.shape)}")

    # --- network --------------------------------------------------------------------------------------
    def encode_context(self, features, feature_mask, state):
        """What does not change along the flow: VL tokens [B, L, W], their mask, the state token [B, 1, W]."""
        self._check(features, feature_mask, state)
        dtype = self.vl_norm.weight.dtype  # follow the head's dtype; bf16 autocast still applies on top
        vl_mask = None if feature_mask is None else feature_mask.bool()
        vl = self.vl_proj(self.vl_norm(features.to(dtype)))
        for block in self.vl_blocks:
            vl = block(vl, key_mask=vl_mask)
        state_token = self.state_encoder(state.to(dtype))[:, None]
        return vl, vl_mask, state_token

    def velocity(self, context, noisy_actions, t, action_mask=None):
        """Predicted flow velocity [B, H, D] at time t [B] (in [0, 1]) for noisy actions [B, H, D]."""
        vl, vl_mask, state_token = context
        B, H, _ = noisy_actions.shape
        dtype = self.vl_norm.weight.dtype
        t_bucket = (t * NUM_TIMESTEP_BUCKETS).long().clamp(0, NUM_TIMESTEP_BUCKETS - 1)  # int(t * 1000)
        temb = self.time_mlp(timestep_embedding(t_bucket, TIME_EMBED_FREQ_DIM, flip_sin_to_cos=True,
                                                downscale_freq_shift=1).to(dtype))
        t_enc = timestep_embedding(t_bucket, self.width).to(dtype)[:, None].expand(B, H, self.width)
        a = self.action_w1(noisy_actions.to(dtype))
        a = self.action_w3(F.silu(self.action_w2(torch.cat([a, t_enc], dim=-1))))
        a = a + self.action_pos(torch.arange(H, device=a.device))
        if not self.self_attention:  # no token sees another: each action token gets the state directly
            x, token_mask = a + state_token.to(a.dtype), None
        else:
            future = self.future_tokens.to(a.dtype)[None].expand(B, -1, -1)
            x = torch.cat([state_token.to(a.dtype), future, a], dim=1)
            # padded action steps are hidden from the self-attention (key mask), so neither their value nor
            # their noise can leak into the loss of the valid steps (GR00T only masks the loss)
            token_mask = None if action_mask is None else torch.cat(
                [torch.ones(B, x.shape[1] - H, dtype=torch.bool, device=x.device), action_mask.bool()], dim=1)
        for block in self.blocks:
            # unlike GR00T (which leaves encoder_attention_mask out), padded VL tokens are masked here
            if self.gradient_checkpointing and torch.is_grad_enabled():  # recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(block, x, temb, vl, vl_mask, token_mask, use_reentrant=False)
            else:
                x = block(x, temb, vl, vl_mask, token_mask)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.action_decoder(self.proj_out_2(x))[:, -H:]

    def forward(self, features, feature_mask, state, noisy_actions, t, action_mask=None):
        return self.velocity(self.encode_context(features, feature_mask, state), noisy_actions, t, action_mask)

    # --- flow matching (GR00T convention: t=0 noise, t=1 data; flow_matching_action_head.py) -------------------------
    def loss(self, features, feature_mask, state, actions, action_mask=None, noise=None, t=None, generator=None):
        """Velocity MSE over valid steps and all dims, / number of valid elements. noise/t: fixed for tests."""
        self._check(features, feature_mask, state, actions, action_mask)
        B = actions.shape[0]
        actions = actions.float()
        if noise is None:
            gen_device = generator.device if generator is not None else actions.device
            noise = torch.randn(actions.shape, generator=generator, device=gen_device).to(actions.device)
        if t is None:
            t = sample_flow_time(B, actions.device, generator)
        t = t.to(actions.device, torch.float32)
        x_t = t[:, None, None] * actions + (1 - t[:, None, None]) * noise
        target = actions - noise
        pred = self(features, feature_mask, state, x_t, t, action_mask)
        mask = torch.ones(B, self.horizon, device=actions.device) if action_mask is None else action_mask.float()
        err = (pred.float() - target).pow(2) * mask[:, :, None]
        return err.sum() / (mask.sum() * self.action_dim).clamp(min=1.0)

    @torch.no_grad()
    def sample(self, features, feature_mask, state, num_steps=4, generator=None, noise=None):
        """Euler from noise (t=0) to data (t=1), t_k = k / num_steps, dt = 1 / num_steps (N1.5: 4 steps).
        noise: the starting point [B, H, D] (default: drawn from `generator`); eval_libero.py passes each
        episode's own noise so an episode's actions do not depend on which episodes share its batch."""
        if num_steps < 1:
            raise ValueError(f"ActionHead.sample: num_steps={num_steps} must be >= 1")
        context = self.encode_context(features, feature_mask, state)
        B, device = features.shape[0], features.device
        gen_device = generator.device if generator is not None else device
        shape = (B, self.horizon, self.action_dim)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"ActionHead.sample: noise must be [B, horizon, action_dim] = {shape}, got {tuple(noise.shape)}")
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=gen_device)
        x = x.to(device, torch.float32)
        dt = 1.0 / num_steps
        for k in range(num_steps):
            t = torch.full((B,), k * dt, device=device)
            x = x + dt * self.velocity(context, x, t).float()
        return x


def _check_images(images_list, where):
    """images_list: list (batch) of lists (cameras) of uint8 [H, W, 3] arrays (PIL images are converted)."""
    if not isinstance(images_list, (list, tuple)):
        raise ValueError(f"{where}: images must be a list (batch) of lists (cameras) of uint8 [H, W, 3] arrays, "
                         f"got {type(images_list).__name__}")
    out = []
    for b, images in enumerate(images_list):
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError(f"{where}: images[{b}] must be a non-empty list of uint8 [H, W, 3] arrays (one per camera), "
                             f"got {type(images).__name__}")
        row = []
        for c, image in enumerate(images):
            if not isinstance(image, np.ndarray) and hasattr(image, "convert"):  # a PIL image
                image = np.asarray(image.convert("RGB"))
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                desc = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                        else type(image).__name__)
                raise ValueError(f"{where}: images[{b}][{c}] must be a uint8 [H, W, 3] array, got {desc}")
            row.append(image)
        out.append(row)
    return out


class VLA(nn.Module):
    """Frozen MLLM middle-layer features + flow-matching action head (arXiv 2603.21341 stage 3, GR00T N1.5).

    The backbone is referenced, not copied: vla.json stores the path of the stage checkpoint it came from.
    norm_stats (data.NormStats) maps robot units <-> the head's normalized units.
    """

    def __init__(self, backbone, head, layer, norm_stats, freeze_backbone=True,
                 prompt_template="What action should the robot take to {instruction}?", backbone_path=None,
                 final_norm=False, clip_actions=False):
        super().__init__()
        if "{instruction}" not in prompt_template:
            raise ValueError(f"VLA: prompt_template must contain '{{instruction}}', got {prompt_template!r}")
        hidden_size = getattr(backbone, "hidden_size", None)
        if hidden_size is not None and hidden_size != head.feature_dim:
            raise ValueError(f"VLA: the backbone's hidden_size={hidden_size} differs from the head's "
                             f"feature_dim={head.feature_dim}")
        self.backbone, self.head, self.layer, self.norm_stats = backbone, head, int(layer), norm_stats
        self.freeze_backbone, self.prompt_template = freeze_backbone, prompt_template
        # final_norm: read the layer through the backbone's final norm (Backbone.hidden_states); clip_actions: the
        # training actions were clipped to [-1, 1], so an evaluation clips the policy's actions the same way
        self.final_norm, self.clip_actions = bool(final_norm), bool(clip_actions)
        # where the backbone checkpoint lives (written to vla.json); HF sets name_or_path in from_pretrained
        hf_model = getattr(backbone, "model", None)
        self.backbone_path = backbone_path or getattr(backbone, "name_or_path", None) or getattr(hf_model, "name_or_path", None)
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()
        self.action_dim, self.state_dim, self.horizon = head.action_dim, head.state_dim, head.horizon

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone stays in eval mode (no dropout noise in its features)
        return self

    @property
    def device(self):
        return next(self.head.parameters()).device

    def features(self, images_list, instructions):
        """Backbone hidden states of `self.layer` for image(s) + prompted instruction: (feats [B, L, d], mask [B, L])."""
        images_list = _check_images(images_list, "VLA.features")
        if isinstance(instructions, str) or len(instructions) != len(images_list):
            raise ValueError(f"VLA.features: instructions must be a list of {len(images_list)} strings (one per sample)")
        prompts = [self.prompt_template.format(instruction=instruction) for instruction in instructions]
        inputs = self.backbone.build_inputs(images_list, prompts)
        backbone_device = next(self.backbone.parameters()).device
        inputs = {k: v.to(backbone_device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats, mask = self.backbone.hidden_states(inputs, self.layer, self.final_norm)
        return feats, mask

    def loss(self, batch):
        """Flow-matching loss on a batch: dict(images | features + feature_mask, instructions, state [B, S],
        actions [B, H, D], action_mask [B, H]); state and actions already normalized."""
        device = self.device
        if "features" in batch:
            feats, mask = batch["features"], batch.get("feature_mask")
        else:
            feats, mask = self.features(batch["images"], batch["instructions"])
        to = lambda x, dtype=None: torch.as_tensor(x).to(device=device, dtype=dtype)
        action_mask = batch.get("action_mask")
        return self.head.loss(to(feats), None if mask is None else to(mask, torch.bool),
                              to(batch["state"], torch.float32), to(batch["actions"], torch.float32),
                              None if action_mask is None else to(action_mask, torch.bool))

    @torch.no_grad()
    def predict_action_batch(self, images_list, instructions, states, num_steps=4, generator=None, noise=None):
        """Action chunks np.float32 [B, H, D] in robot units from raw (robot-unit) states [B, S]."""
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2 or states.shape[0] != len(images_list):
            raise ValueError(f"VLA.predict_action_batch: states must be [B={len(images_list)}, {self.state_dim}], "
                             f"got shape {states.shape}")
        if states.shape[1] != self.state_dim:
            raise ValueError(f"VLA: state has {states.shape[1]} dims, the head expects state_dim={self.state_dim}")
        feats, mask = self.features(images_list, list(instructions))
        state = torch.as_tensor(np.asarray(self.norm_stats.normalize_state(states), dtype=np.float32), device=self.device)
        actions = self.head.sample(feats.to(self.device), mask.to(self.device), state, num_steps=num_steps,
                                   generator=generator, noise=noise)
        return np.asarray(self.norm_stats.unnormalize_actions(actions.float().cpu().numpy()), dtype=np.float32)

    def predict_action(self, images, instruction, state, num_steps=4, generator=None):
        """One action chunk np.float32 [H, D] in robot units: images = list of uint8 [H, W, 3] (one per camera)."""
        if not isinstance(instruction, str):
            raise ValueError(f"VLA.predict_action: instruction must be a str, got {type(instruction).__name__}")
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"VLA.predict_action: images must be a list of uint8 [H, W, 3] arrays (one per camera), "
                             f"got {type(images).__name__}")
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise ValueError(f"VLA.predict_action: state must be a vector [{self.state_dim}], got shape {state.shape}")
        return self.predict_action_batch([images], [instruction], state[None], num_steps, generator)[0]

    # --- checkpoint: vla.json + action_head.safetensors + norm_stats.json -----------------------------
    def save(self, out_dir, final_dir=None):
        """final_dir: where out_dir's files end up (data.save_checkpoint writes into a temporary directory first);
        vla.json's backbone paths are written as seen from there."""
        from safetensors.torch import save_file
        if not self.backbone_path and self.freeze_backbone:
            raise ValueError("VLA.save: the backbone's checkpoint path is unknown; save the backbone with "
                             "save_pretrained(dir) and pass VLA(..., backbone_path=dir)")
        os.makedirs(out_dir, exist_ok=True)
        backbone_path = self.backbone_path
        if not self.freeze_backbone:  # a trained backbone is part of this checkpoint, so it is written here
            backbone_path = os.path.join(out_dir, "backbone")
            self.backbone.save_pretrained(backbone_path)
        is_local = os.path.isdir(backbone_path)
        final_dir = os.path.abspath(final_dir or out_dir)
        final_backbone = os.path.abspath(backbone_path)
        inside = os.path.relpath(final_backbone, os.path.abspath(out_dir))
        if not inside.startswith(os.pardir):  # written into this checkpoint: it moves with it
            final_backbone = os.path.normpath(os.path.join(final_dir, inside))
        meta = {
            "backbone": final_backbone if is_local else backbone_path,
            # relative to this directory too, so a moved or renamed out/ tree still works
            "backbone_relative": os.path.relpath(final_backbone, final_dir) if is_local else None,
            "backbone_is_local": is_local,
            "layer": self.layer,
            "final_norm": self.final_norm,
            "image_size": self.backbone.image_size,  # resize_with_pad size of every image, training and evaluation
            "clip_actions": self.clip_actions,
            "head": self.head.config,
            "prompt_template": self.prompt_template,
            "freeze_backbone": self.freeze_backbone,
        }
        with open(os.path.join(out_dir, "vla.json"), "w") as f:
            json.dump(meta, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, os.path.join(out_dir, "action_head.safetensors"))
        self.norm_stats.save(os.path.join(out_dir, "norm_stats.json"))

    @classmethod
    def load(cls, vla_dir, device="cpu", backbone_path=None, dtype=None):
        from safetensors.torch import load_file
        from data import NormStats
        meta_path = os.path.join(vla_dir, "vla.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {vla_dir!r} is not a VLA directory "
                                    "(VLA.save writes vla.json, action_head.safetensors, norm_stats.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        for key in ("backbone", "layer", "head"):
            if key not in meta:
                raise KeyError(f"{meta_path}: missing key {key!r}")
        if backbone_path is None:
            backbone_path = meta["backbone"]
            if meta.get("backbone_is_local"):
                candidates = [os.path.join(vla_dir, meta["backbone_relative"])] if meta.get("backbone_relative") else []
                candidates.append(meta["backbone"])
                found = [p for p in candidates if os.path.isdir(p)]
                if not found:
                    raise FileNotFoundError(f"{meta_path}: backbone checkpoint not found (tried {candidates}); "
                                            "pass VLA.load(..., backbone_path=...)")
                if len(found) == 2 and not os.path.samefile(*found):  # a copied out/ tree: never guess which one
                    raise ValueError(f"{meta_path}: backbone_relative {meta['backbone_relative']!r} gives {found[0]!r} and "
                                     f"backbone gives {found[1]!r}, two different directories; pass the one this head "
                                     "was trained on: VLA.load(..., backbone_path=...), eval_*.py --backbone=...")
                backbone_path = os.path.normpath(found[0])
        elif not os.path.isdir(backbone_path):
            raise FileNotFoundError(f"VLA.load: backbone_path {backbone_path!r} does not exist")
        try:
            backbone = Backbone.from_pretrained(backbone_path, dtype=dtype)
        except OSError as e:  # a hub name that cannot be resolved (or a path that vanished)
            raise FileNotFoundError(f"{meta_path}: cannot load the backbone {backbone_path!r}: {e}") from e
        head = ActionHead(**meta["head"])
        head_path = os.path.join(vla_dir, "action_head.safetensors")
        if not os.path.isfile(head_path):
            raise FileNotFoundError(f"{head_path} not found (written by VLA.save)")
        head.load_state_dict(load_file(head_path))
        stats_path = os.path.join(vla_dir, "norm_stats.json")
        if not os.path.isfile(stats_path):
            raise FileNotFoundError(f"{stats_path} not found (written by VLA.save)")
        backbone.image_size = int(meta.get("image_size", backbone.image_size))
        vla = cls(backbone, head, meta["layer"], NormStats.load(stats_path),
                  freeze_backbone=meta.get("freeze_backbone", True),
                  prompt_template=meta.get("prompt_template", "What action should the robot take to {instruction}?"),
                  backbone_path=backbone_path, final_norm=meta.get("final_norm", False),
                  clip_actions=meta.get("clip_actions", False))
        return vla.to(device).eval()  # inference: no head dropout

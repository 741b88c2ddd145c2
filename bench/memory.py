"""Predicted peak GPU memory per stage (SFT, GRPO, VLA) for the paper's backbones on 8 x 80 GB, split into
parameters, gradients, optimizer state, activations, logits and other (FSDP gathers, autocast weight cache, KV
cache, reference model, EMA), under DDP / DDP+ckpt / FSDP / FSDP+ckpt. GB = 2^30 bytes; a stage fits if its
peak is <= 80 GB minus a 10% reserve (CUDA context, NCCL buffers, allocator fragmentation): 72 GB.

    python bench/memory.py [--micro_batch_size=N] [--rollout_micro_batch=N] [--max_new_tokens=N] [--no_check]   # 3-6 min on 2 cores

Where the numbers come from:
- parameters: Qwen2.5-VL-3B/7B and Qwen3-VL-8B built on the meta device from the hub config.json values written
  below (the counts match the hub's 3.75B / 8.29B / 8.77B), vocabulary grown by the 2 + 2048 action tokens
  (Backbone._add_action_tokens); the VLA head is model.ActionHead;
- activations: the bytes autograd saves for backward (saved_tensors_hooks, deduplicated by storage, parameters and
  autocast's weight copies left out) per token per decoder layer, per patch per vision block and for the rest,
  measured on CPU on the same HF classes with the real head counts at widths / 8, / 16 (LM) and / 2, / 4 (vision;
  Qwen3-VL / 2, / 3) and two sequence lengths, fitted as A / scale + B + C * seq (C: sdpa's padding mask) and
  evaluated at full width; in bf16 for FSDP rows, fp32 weights under bf16 autocast for DDP rows. With
  checkpointing a layer keeps only its input (bf16; fp32 residual stream under autocast), plus one layer recomputed
  and its input / output grads. LM head (model.token_logprobs, `logprob_chunk` rows at a time): chunk x vocab x the
  bytes per element measured for its forward + backward;
- batch sizes from config/*.py (sft_qwen2_5_vl_7b_libero, align_rl_qwen2_5_vl_7b, vla_qwen2_5_vl_7b_libero, used for
  every backbone), with max_seq_len, micro_batch_size, generation_batch, max_new_tokens and beta (options override them): SFT rows padded to max_seq_len, GRPO
  rows of prompt + max_new_tokens, 2 images of 256 x 256 per sample (Qwen processor: sides rounded to 28 / 32);
- honesty check: two small Qwen2.5-VL configs run two accumulated micro-batches + AdamW in fp32 on CPU in a fresh
  process (glibc told to mmap allocations >= 128 KB so RSS follows live tensors); measured = peak anonymous RSS of
  the second step minus that before the model was built; predicted by the same functions (an fp32 fit).
FSDP (model.fsdp_shard): fp32 master weights, grads and AdamW sharded / 8; bf16 gathers of two layers and the root
(FSDP2 keeps a root gathered after forward), one all-gather buffer, the root's bf16 grads, a layer's bf16 grad and
its fp32 reduce-scatter copy. DDP: 16 B per trained parameter (gradient_as_bucket_view), autocast's bf16 cache of
every trained weight. Peak = the sum (gradient accumulation keeps the grads next to a micro-batch's activations;
AdamW's step temporaries are assumed below the activations: fused, or foreach on a shard). GRPO reports the larger
of the rollout phase (the bf16 model gathered once, KV cache, prefill) and the update phase; VLA the larger of
feature-cache building (FSDP: the bf16 backbone gathered) and head training.
Last line: the Qwen2.5-VL-7B's (the paper's backbone) FSDP+ckpt count, `fits_80GB: <stages that fit>/<stages>`.
Writes out/bench/memory.json.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GB = 2 ** 30
FAST_VOCAB = 2048  # config/sft_*.py fast_vocab_size; the Backbone adds <ACTION_START>, <ACTION_END> and 2048 <act_i>
# hub config.json of Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, Qwen/Qwen3-VL-8B-Instruct (tok_len = len(tokenizer))
QWEN25_VISION = dict(v_depth=32, v_hidden=1280, v_inter=3420, v_heads=16, patch=14, fullatt=[7, 15, 23, 31])
MODELS = {
    "qwen2.5-vl-3b": dict(family="qwen2_5_vl", hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, inter=11008,
                          vocab=151936, tie=True, rope_theta=1e6, mrope=[16, 24, 24], tok_len=151665, hub=3.75e9,
                          scales=((8, 16), (2, 4)), **QWEN25_VISION),
    "qwen2.5-vl-7b": dict(family="qwen2_5_vl", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, inter=18944,
                          vocab=152064, tie=False, rope_theta=1e6, mrope=[16, 24, 24], tok_len=151665, hub=8.29e9,
                          scales=((8, 16), (2, 4)), **QWEN25_VISION),
    "qwen3-vl-8b": dict(family="qwen3_vl", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, inter=12288,
                        vocab=151936, tie=False, rope_theta=5e6, mrope=[24, 20, 20], tok_len=151669, hub=8.77e9,
                        v_depth=27, v_hidden=1152, v_inter=4304, v_heads=16, patch=16, deepstack=[8, 16, 24],
                        scales=((8, 16), (2, 3))),  # vision head_dim 72: /4 breaks its rope
}
# honesty-check configs (same Qwen2.5-VL classes): batch B x T tokens, R scored tokens per row, 2 images of `image`
CHECKS = {
    "qwen2.5-vl-17m": dict(family="qwen2_5_vl", hidden=384, layers=6, heads=6, kv_heads=2, head_dim=64, inter=1024,
                           vocab=8192, tie=False, rope_theta=1e6, mrope=None, v_depth=2, v_hidden=128, v_inter=256, v_heads=2, patch=14,
                           fullatt=[1], scales=((4, 8), (2, 4)), B=2, T=512, R=256, image=112, freeze_vision=True, chunk=256),
    "qwen2.5-vl-104m": dict(family="qwen2_5_vl", hidden=768, layers=8, heads=12, kv_heads=2, head_dim=64, inter=2048,
                            vocab=32768, tie=False, rope_theta=1e6, mrope=None, v_depth=4, v_hidden=256, v_inter=512,
                            v_heads=4, patch=14, fullatt=[3], scales=((4, 8), (2, 4)), B=2, T=384, R=256, image=112,
                            freeze_vision=False, chunk=256),
}


def hf_model(d, device="cpu"):
    """The HF Qwen-VL model for dims d (real classes, random init or meta)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    half = d["head_dim"] // 2
    rope = dict(rope_type="default", rope_theta=d["rope_theta"], mrope_section=d["mrope"] or [half - 2 * (half // 3), half // 3, half // 3])
    text = dict(vocab_size=d["vocab"], hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                num_key_value_heads=d["kv_heads"], intermediate_size=d["inter"], rope_parameters=rope, tie_word_embeddings=d["tie"],
                max_position_embeddings=32768)
    vision = dict(depth=d["v_depth"], hidden_size=d["v_hidden"], intermediate_size=d["v_inter"], num_heads=d["v_heads"],
                  out_hidden_size=d["hidden"], patch_size=d["patch"], spatial_merge_size=2, temporal_patch_size=2)
    v = d["vocab"]  # image / video / vision start / end ids: the hub's, or the last 4 ids of a small vocabulary
    ids = {} if v > 151656 else dict(image_token_id=v - 4, video_token_id=v - 3, vision_start_token_id=v - 2, vision_end_token_id=v - 1)
    if ids:
        text.update(bos_token_id=0, eos_token_id=1)  # inside the small vocabulary
    if d["family"] == "qwen2_5_vl":
        vision.update(window_size=112, fullatt_block_indexes=d["fullatt"], hidden_act="silu")
        config, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=d["tie"], **ids), Qwen2_5_VLForConditionalGeneration
    else:
        text["head_dim"] = d["head_dim"]
        rope["mrope_interleaved"] = True
        vision.update(num_position_embeddings=2304, deepstack_visual_indexes=d["deepstack"], hidden_act="gelu_pytorch_tanh")
        config, cls = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=d["tie"], **ids), Qwen3VLForConditionalGeneration
    with torch.device(device):
        return cls(config)


def param_counts(d):
    """Parameter counts of the real architecture (meta device), with the action tokens added."""
    n = lambda m: sum(p.numel() for p in m.parameters())
    hub = n(hf_model(d, "meta"))
    m = hf_model(dict(d, vocab=max(d["vocab"], d["tok_len"] + 2 + FAST_VOCAB)), "meta")  # Backbone._add_action_tokens
    visual, layers, blocks = m.model.visual, m.model.language_model.layers, m.model.visual.blocks
    total = n(m)
    return dict(hub=hub, total=total, vocab=m.config.get_text_config().vocab_size, layer=n(layers[0]), vblock=n(blocks[0]),
                vision_frozen=n(visual) - n(visual.merger), root=total - n(layers) - n(blocks),
                kv_per_token=2 * d["layers"] * d["kv_heads"] * d["head_dim"] * 2)  # K and V, bf16


def image_tokens(d, side=256):
    """Qwen processor (smart_resize): sides rounded to multiples of patch x merge -> patches, merged tokens."""
    f = d["patch"] * 2
    patches = (round(side / f) * f // d["patch"]) ** 2
    return patches, patches // 4


def make_inputs(d, B, T, image, n_img=2, pad=16, dtype=torch.float32):
    """B rows of T tokens: 2 images then text, row 0 right-padded by `pad` (a padding mask as in real batches)."""
    v, g = d["vocab"], image // d["patch"]
    img, vs, ve = (v - 4, v - 2, v - 1) if v <= 151656 else (151655, 151652, 151653)
    row = ([vs] + [img] * (g * g // 4) + [ve]) * n_img
    ids = torch.tensor([row + [10 + i % 50 for i in range(T - len(row))]] * B)
    mask = torch.ones_like(ids)
    mask[0, T - pad:] = 0
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == img).long(),
                pixel_values=torch.randn(B * n_img * g * g, 3 * 2 * d["patch"] ** 2, dtype=dtype),
                image_grid_thw=torch.tensor([[1, g, g]] * (B * n_img)))


def saved_bytes(d, dtype, B=2, T=384):
    """Bytes saved for backward by one forward (dims d, 3 LM layers, 3 vision blocks), per token for the middle decoder
    layer and for the rest of the LM, per patch for a vision block and the rest of the vision tower. dtype "autocast":
    fp32 weights under bf16 autocast (DDP), the bf16 weight copies left out (they are the autocast cache, 2 B/param)."""
    d = dict(d, layers=3, v_depth=3, vocab=1024, fullatt=[2], deepstack=[0, 1, 2])
    torch.manual_seed(0)
    autocast = dtype == "autocast"
    dtype = torch.float32 if autocast else dtype
    model = hf_model(d).to(dtype).train()
    inp = make_inputs(d, B, T, image=16 * d["patch"], dtype=dtype)
    units = {m: f"L{i}" for i, m in enumerate(model.model.language_model.layers)}
    units.update({m: f"V{i}" for i, m in enumerate(model.model.visual.blocks)})
    units[model.model.visual] = "vrest"
    stack, seen, out = ["lmrest"], {p.untyped_storage().data_ptr() for p in model.parameters()}, {}
    for m, name in units.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name))
        m.register_forward_hook(lambda mod, args, res: stack.pop() and None)

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen and not weight_copy(t.grad_fn):
            seen.add(s.data_ptr())
            out[stack[-1]] = out.get(stack[-1], 0) + s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model.model(**inp, use_cache=False)  # the stages run the LM head themselves (token_logprobs)
    tokens, patches = B * T, len(inp["pixel_values"])
    vb = [out[f"V{i}"] for i in (1, 2)]
    return dict(layer=out["L1"] / tokens, lmrest=(out["lmrest"] + out["L0"] - out["L1"]) / tokens,
                vblock=sum(vb) / 2 / patches, vrest=(out["vrest"] + out["V0"] - sum(vb) / 2) / patches)


def weight_copy(fn):
    """Does this autograd node produce a cast / view of a parameter (autocast's bf16 weight copies)?"""
    while fn is not None and fn.name() in ("ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0",
                                           "PermuteBackward0", "ExpandBackward0", "UnsafeViewBackward0"):
        fn = fn.next_functions[0][0]
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf that requires grad
            return True
    return False


def scaled(d, sl, sv):
    """Widths / sl (LM) and / sv (vision), head counts kept."""
    hd, vhd = d["head_dim"] // sl, d["v_hidden"] // d["v_heads"] // sv
    return dict(d, hidden=d["heads"] * hd, head_dim=hd, inter=d["inter"] // sl, mrope=None, v_hidden=d["v_heads"] * vhd,
                v_inter=d["v_inter"] // sv)


def fit_activations(d, dtype):
    """Per-unit saved bytes as a_l / sl + a_v / sv + b + c * T (widths divided by sl, sv; T tokens per row) from 4
    reduced-width measurements, evaluated at full width (sl = sv = 1); a 5th (both scales and T changed) checks it."""
    (l1, l2), (v1, v2) = d["scales"]
    T1, T2 = 384, 768
    pts = [(l1, v1, T1), (l2, v1, T1), (l1, v2, T1), (l1, v1, T2), (l2, v2, T2)]
    m = [saved_bytes(scaled(d, sl, sv), dtype, T=T) for sl, sv, T in pts]
    fit, err = {}, 0.0
    for u in m[0]:
        al, av, c = (m[0][u] - m[1][u]) / (1 / l1 - 1 / l2), (m[0][u] - m[2][u]) / (1 / v1 - 1 / v2), (m[3][u] - m[0][u]) / (T2 - T1)
        b = m[0][u] - al / l1 - av / v1 - c * T1
        err = max(err, abs((al / l2 + av / v2 + b + c * T2) / m[4][u] - 1))
        fit[u] = (al + av + b, c)  # bytes per token (patch) at full width: fit[u][0] + fit[u][1] * T
    fit["fit_err"] = err
    return fit


def activations(d, fit, B, T, patches, ckpt, vision_trains, dsize):
    """Saved activation bytes of one micro-batch (B rows of T tokens, `patches` vision patches per row)."""
    tok, pat, h, vh = B * T, B * patches, d["hidden"], d["v_hidden"]
    layer = fit["layer"][0] + fit["layer"][1] * T
    lm = tok * (fit["lmrest"][0] + fit["lmrest"][1] * T)
    # checkpointing: each layer keeps its input; one layer recomputed + its grad in / grad out during backward
    lm += d["layers"] * tok * dsize * h + tok * (layer + 2 * dsize * h) if ckpt else d["layers"] * tok * layer
    vis = pat * fit["vrest"][0]  # upper bound when only the merger trains
    if vision_trains:
        vb = fit["vblock"][0]
        vis += d["v_depth"] * pat * dsize * vh + pat * (vb + 2 * dsize * vh) if ckpt else d["v_depth"] * pat * vb
    return lm + vis


def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_peak():
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the new high-water mark starts at live memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current RSS


def worker(spec):
    """Run in a fresh process: measured peak bytes of a step (see the docstring), printed as json."""
    torch.set_num_threads(1)
    from model import token_logprobs
    if spec["kind"] == "logits":  # bytes per [chunk, vocab] element of token_logprobs forward + backward
        dt, V, C = getattr(torch, spec["dtype"]), 8192, 1024
        h, head = torch.randn(2 * C, 64, dtype=dt, requires_grad=True), torch.nn.Linear(64, V, bias=False).to(dt)
        t = torch.randint(0, V, (2 * C,))
        for _ in range(2):  # the first pass allocates the grads
            token_logprobs(h, head, t, temperature=1.0, suppress_ids=range(4), chunk_tokens=C)[0].sum().backward()
            if _ == 0:
                reset_peak()
                base = rss("VmRSS")
        return print(json.dumps(dict(per_element=(rss("VmHWM") - base) / (C * V))))
    d = CHECKS[spec["name"]]
    inp = make_inputs(d, d["B"], d["T"], d["image"])
    targets = torch.full((d["B"], d["T"]), -100)
    targets[:, d["T"] - 16 - d["R"]:d["T"] - 16] = 7  # R scored tokens per row, before row 0's padding

    def setup():
        torch.manual_seed(0)
        model = hf_model(d).train()
        if d["freeze_vision"]:
            for n, p in model.model.visual.named_parameters():
                p.requires_grad_(n.startswith("merger."))
        if spec["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(model, opt, micro_batches=2):  # accumulated micro-batches, then AdamW
        for _ in range(micro_batches):
            hidden = model.model(**inp, use_cache=False).last_hidden_state
            scored = targets != -100
            logp = token_logprobs(hidden[scored], model.lm_head, targets[scored], chunk_tokens=d["chunk"])[0]
            (-logp.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    reset_peak()
    base = rss("VmRSS") - rss("RssFile")
    model, opt = setup()
    step(model, opt, 1)  # creates AdamW's state
    reset_peak()
    step(model, opt)
    # library code paged in during the steps is file-backed: not tensor memory (it is still mapped at the end)
    print(json.dumps(dict(measured=rss("VmHWM") - rss("RssFile") - base)))


def run_worker(spec):
    # glibc mmaps every allocation >= 128 KB (no heap caching), so RSS follows the live tensor bytes
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_config(name):
    ns = {}
    with open(os.path.join(ROOT, "config", name)) as f:
        exec(f.read(), {}, ns)
    return ns


def phases(stage, d, pc, fits, head, k, a, cfg, fsdp, ckpt, mb=None):
    """{phase: {component: bytes per GPU}} of one stage in one mode."""
    from data import split_global_batch
    P, V, s = pc["total"], pc["vocab"], a.world_size if fsdp else 1  # s divides what FSDP shards
    patches, img_tok = image_tokens(d)
    # FSDP computes in bf16 throughout; DDP's autocast keeps an fp32 residual stream (the checkpointed layer inputs)
    fit, dsize = (fits["bf16"], 2) if fsdp else (fits["autocast"], 4)
    # FSDP: bf16 gathers of 2 layers + the root (+ one all-gather buffer), the root's bf16 grads, a layer's bf16 grad
    # + its fp32 reduce-scatter copy
    unit = 2 * max(pc["layer"], pc["root"])
    gathers = 2 * (2 * pc["layer"] + pc["root"]) + unit + 2 * pc["root"] + 6 * pc["layer"]
    no_grad = lambda tokens: tokens * (3 * d["inter"] + 6 * d["hidden"]) * 2  # one layer's working set, bf16
    if stage == "sft":  # vision blocks frozen (config freeze_vision), rows padded to max_seq_len
        B, _ = split_global_batch(cfg["batch_size"], cfg["gradient_accumulation_steps"], a.world_size)
        Pt = P - pc["vision_frozen"] if cfg.get("freeze_vision", True) else P
        return {f"update {B}x{a.max_seq_len}": dict(
            params=4 * P / s, grads=4 * Pt / s, optim=8 * Pt / s, act=activations(d, fit, B, a.max_seq_len, 2 * patches, ckpt, False, dsize),
            logits=k * min(a.logprob_chunk, B * a.max_seq_len) * V, other=gathers if fsdp else 2 * Pt)}  # DDP: autocast cache
    if stage == "align_rl":  # all parameters train (the paper); a bf16 reference model when beta > 0
        mb, n = mb or a.micro_batch_size, a.rollout_micro_batch
        prompt = 2 * (img_tok + 2) + a.prompt_text_tokens
        # the bf16 reference model, sharded (align_rl.py reshards its root after the no-grad forwards: FSDP2 keeps a
        # root gathered after forward)
        T, ref = prompt + a.max_new_tokens, 2 * P / s if a.beta > 0 else 0
        return {f"update {mb}x{T}": dict(
                    params=4 * P / s, grads=4 * P / s, optim=8 * P / s, act=activations(d, fit, mb, T, 2 * patches, ckpt, True, dsize),
                    logits=k * min(a.logprob_chunk, mb * a.max_new_tokens) * V, other=ref + (gathers if fsdp else 2 * P)),
                f"rollout {n}x{T}": dict(  # FSDP: the bf16 model gathered once; DDP: the autocast cache
                    params=4 * P / s, grads=0, optim=8 * P / s, act=no_grad(n * prompt), logits=3 * 4 * n * V,
                    other=ref + 2 * P + (unit if fsdp else 0) + n * T * pc["kv_per_token"])}
    # vla: frozen bf16 backbone (FSDP: sharded, gathered once to build the feature cache), fp32 head + AdamW + EMA
    B, _ = split_global_batch(cfg["batch_size"], cfg["gradient_accumulation_steps"], a.world_size)
    Tv, nb, Ph = 2 * (img_tok + 2) + 64, cfg.get("cache_batch_size", 32), head["params"]
    train = dict(params=2 * P / s + 4 * Ph, grads=4 * Ph, optim=8 * Ph, act=B * head["act_per_sample"], logits=0, other=4 * Ph)
    return {f"head B={B}": train, f"cache {nb}x{Tv}": dict(train, grads=0, act=no_grad(nb * Tv), other=4 * Ph + (2 * P + unit if fsdp else 0))}


def stage_rows(name, d, pc, fits, head, k, a, cfgs):
    """One row per (mode, stage): the phase with the largest peak, GB per GPU by component."""
    rows, budget = [], (1 - a.reserve) * a.gpu_gb * GB
    for fsdp in (False, True):
        for ckpt in (False, True):
            for stage in ("sft", "align_rl", "vla"):
                ph = {p: dict(c, total=sum(c.values())) for p, c in phases(stage, d, pc, fits, head, k, a, cfgs[stage], fsdp, ckpt).items()}
                peak = max(ph, key=lambda p: ph[p]["total"])
                others = ", ".join(f"{p.split()[0]} {c['total'] / GB:.1f}" for p, c in ph.items() if p != peak)
                rows.append(dict(model=name, stage=stage, mode=("FSDP" if fsdp else "DDP") + ("+ckpt" if ckpt else ""),
                                 phase=peak + (f" (else {others})" if others else ""), **ph[peak], fits=ph[peak]["total"] <= budget))
    # the largest GRPO micro-batch (a divisor of the sequences per GPU per optimizer step) that fits in FSDP+ckpt
    rl = cfgs["align_rl"]
    per_gpu = rl["update_batch"] * rl["group_size"] // a.world_size
    fit_mb = [m for m in range(1, per_gpu + 1) if per_gpu % m == 0 and all(
        sum(c.values()) <= budget for c in phases("align_rl", d, pc, fits, head, k, a, rl, True, True, m).values())]
    return rows, dict(per_gpu=per_gpu, max_micro_batch=max(fit_mb, default=0))


def head_stats(d, cfg):
    """ActionHead (model.py): parameter count and bytes saved per sample by its flow-matching loss (fp32, measured)."""
    from model import ActionHead
    kw = dict(action_dim=7, state_dim=8, horizon=cfg["action_horizon"], width=cfg["head_width"], depth=cfg["head_depth"],
              heads=cfg["head_heads"], num_future_tokens=cfg["num_future_tokens"],
              num_vl_self_attn_layers=cfg["num_vl_self_attn_layers"], self_attention=cfg["head_self_attention"])
    with torch.device("meta"):
        params = sum(p.numel() for p in ActionHead(d["hidden"], **kw).parameters())
    head, L = ActionHead(d["hidden"], **kw), 2 * (image_tokens(d)[1] + 2) + 64
    seen, total = {p.untyped_storage().data_ptr() for p in head.parameters()}, [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head.loss(torch.randn(1, L, d["hidden"]), torch.ones(1, L, dtype=torch.bool), torch.randn(1, 8), torch.randn(1, kw["horizon"], 7))
    return dict(params=params, act_per_sample=total[0])


def check_prediction(d, fit, k32, ckpt):
    """Predicted peak of the CPU check step: fp32 weights, grads and AdamW of one process, activations, LM-head chunk."""
    m = hf_model(d, "meta")
    n = lambda mod: sum(q.numel() for q in mod.parameters())
    P = n(m)
    Pt = P - (n(m.model.visual) - n(m.model.visual.merger) if d["freeze_vision"] else 0)
    g = d["image"] // d["patch"]
    act = activations(d, fit, d["B"], d["T"], 2 * g * g, ckpt, not d["freeze_vision"], 4)
    return dict(params=P, predicted=4 * P + 12 * Pt + act + k32 * min(d["chunk"], d["B"] * d["R"]) * d["vocab"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--world_size", type=int, default=8)
    p.add_argument("--gpu_gb", type=float, default=80)
    p.add_argument("--reserve", type=float, default=0.10, help="fraction kept free for the CUDA context and fragmentation")
    # None: the value in config/sft_qwen2_5_vl_7b_libero.py / config/align_rl_qwen2_5_vl_7b.py
    p.add_argument("--max_seq_len", type=int, default=None, help="SFT rows padded to this (worst case)")
    p.add_argument("--logprob_chunk", type=int, default=1024, help="LM-head rows per chunk (model.token_logprobs)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="GRPO sequences per forward/backward")
    p.add_argument("--rollout_micro_batch", type=int, default=None, help="GRPO sequences per sampling call "
                   "(generation_batch x group_size)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="GRPO response length")
    p.add_argument("--prompt_text_tokens", type=int, default=100, help="GRPO prompt text besides the 2 images")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient: > 0 keeps a bf16 reference model")
    p.add_argument("--no_check", action="store_true", help="skip the CPU honesty check")
    p.add_argument("--out", default="out/bench/memory.json")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    torch.set_num_threads(1)
    t0 = time.time()
    cfgs = {"sft": load_config("sft_qwen2_5_vl_7b_libero.py"), "align_rl": load_config("align_rl_qwen2_5_vl_7b.py"),
            "vla": load_config("vla_qwen2_5_vl_7b_libero.py")}
    rl = cfgs["align_rl"]
    defaults = dict(max_seq_len=cfgs["sft"]["max_seq_len"], micro_batch_size=rl["micro_batch_size"], beta=rl["beta"],
                    rollout_micro_batch=rl["generation_batch"] * rl["group_size"], max_new_tokens=rl["max_new_tokens"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    k_bf16 = run_worker(dict(kind="logits", dtype="bfloat16"))["per_element"]
    result = dict(args=vars(args), logits_bytes_per_element=k_bf16, models={}, checks={}, rows=[])
    print(f"LM head chunk: {k_bf16:.1f} B per [chunk, vocab] element (token_logprobs fwd+bwd, measured); "
          f"{args.world_size} GPUs x {args.gpu_gb:.0f} GB, fit if <= {(1 - args.reserve) * args.gpu_gb:.0f} GB")
    if not args.no_check:
        k32 = run_worker(dict(kind="logits", dtype="float32"))["per_element"]
        for name, d in CHECKS.items():
            fit = fit_activations(d, torch.float32)
            for ckpt in (False, True):
                key, c = f"{name}{'+ckpt' if ckpt else ''}", check_prediction(d, fit, k32, ckpt)
                c["measured"] = run_worker(dict(kind="step", name=name, ckpt=ckpt))["measured"]
                c["ratio"] = c["predicted"] / c["measured"]
                result["checks"][key] = c
                print(f"check {key:<21} {c['params'] / 1e6:6.1f}M params  predicted {c['predicted'] / 2**20:6.0f} MB  measured "
                      f"{c['measured'] / 2**20:6.0f} MB  ratio {c['ratio']:.2f}  (fp32 CPU; fit err {fit['fit_err']:.1%})")
        ok = all(abs(c["ratio"] - 1) <= 0.25 for c in result["checks"].values())
        print(f"honesty check (predicted within 25% of measured): {'yes' if ok else 'NO'}")
    for name in args.models.split(","):
        d = MODELS[name]
        pc, fits = param_counts(d), {"bf16": fit_activations(d, torch.bfloat16), "autocast": fit_activations(d, "autocast")}
        fit, head = fits["bf16"], head_stats(d, cfgs["vla"])
        result["models"][name] = dict(params=pc, fits=fits, head=head)
        print(f"{name}: {pc['hub'] / 1e9:.3f}B params (hub {d['hub'] / 1e9:.2f}B), {pc['total'] / 1e9:.3f}B with "
              f"{pc['vocab']} tokens; layer {pc['layer'] / 1e6:.0f}M, root {pc['root'] / 1e6:.0f}M; bf16 act/token/layer "
              f"{fit['layer'][0] / 1024:.0f} KB + {fit['layer'][1]:.1f} B x seq, vision block {fit['vblock'][0] / 1024:.0f} KB/patch "
              f"(fit err {max(f['fit_err'] for f in fits.values()):.1%}); KV {pc['kv_per_token'] / 1024:.0f} KB/token; VLA head {head['params'] / 1e6:.0f}M")
        rows, rl = stage_rows(name, d, pc, fits, head, k_bf16, args, cfgs)
        result["rows"] += rows
        result["models"][name]["align_rl"] = rl
    cols = ("params", "grads", "optim", "act", "logits", "other", "total")
    print(f"\n{'model':<14}{'stage':<9}{'mode':<11}" + "".join(f"{c:>8}" for c in cols) + f"{'fits':>6}  peak phase (GB per GPU)")
    for r in result["rows"]:
        print(f"{r['model']:<14}{r['stage']:<9}{r['mode']:<11}" + "".join(f"{r[c] / GB:8.1f}" for c in cols)
              + f"{'yes' if r['fits'] else 'NO':>6}  {r['phase']}")
    lines = {}
    for name in result["models"]:
        rec = [r for r in result["rows"] if r["model"] == name and r["mode"] == "FSDP+ckpt"]
        lines[name] = f"fits_80GB: {sum(r['fits'] for r in rec)}/{len(rec)}"
        rl = result["models"][name]["align_rl"]
        print(f"{name} FSDP+ckpt: GRPO micro_batch_size {args.micro_batch_size} of {rl['per_gpu']} sequences per GPU per "
              f"optimizer step (largest that fits: {rl['max_micro_batch']}); {lines[name]}")
    result["fits_80GB"] = lines
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"({time.time() - t0:.0f} s; {args.out})")
    print(lines.get("qwen2.5-vl-7b", next(iter(lines.values()))))


if __name__ == "__main__":
    main()

"""Stage 1 of RoboAlign: supervised fine-tuning of the MLLM on a mixture of VQA, zero-shot reasoning and
FAST action-token prediction (arXiv 2603.21341 stage 1).

    python sft.py                                          # the embedded default: tiny model, CPU
    python sft.py --max_iters=100 --lr=1e-3                # any module-level key can be overridden
    torchrun --nproc_per_node=2 sft.py --max_iters=20      # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 sft.py config/sft_qwen2_5_vl_7b_libero.py   # the paper's recipe

init_from picks the backbone: "tiny" builds Backbone.tiny from the n_layer / n_embd / ... keys (nothing is
downloaded); anything else is a local checkpoint directory or a hub name loaded with Backbone.from_pretrained,
e.g. --init_from=path/of/a/saved/backbone (the issue's `--backbone=<path>`). A directory that already holds
fast_tokenizer.json + norm_stats.json (an earlier out/sft) keeps its FAST tokenizer, whose ids its embedding
rows were trained on.

Writes out_dir (README, checkpoints): the backbone in HF format, fast_tokenizer.json, norm_stats.json,
run_config.json, train_state.pt (for --resume) and metrics.jsonl (step/loss/lr every step; eval lines
with val_loss, action_exact, action_prefix, reasoning_format, think_action_format, think_action_prefix).
"""

import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from data import (check_out_dir, check_step, check_compatible, ConversationDataset, MetricsLogger, NormStats, chunk_at, configure, cosine_lr, check_data_dir,
                  fast_target, format_reward, global_batch_indices, open_robot_dataset, prefix_match_reward,
                  recover_checkpoint, rng_state, save_checkpoint, set_rng_state, setup_distributed, split_global_batch)
from model import (Backbone, FastTokenizer, clip_grad_norm, compute_context, fsdp_shard, full_state_dict,
                   load_optimizer_state_dict, optimizer_state_dict)

# -----------------------------------------------------------------------------
# config: these defaults ARE the embedded tiny CPU recipe (config/sft_qwen2_5_vl_7b_libero.py: the paper's)
out_dir = "out/sft"
init_from = "tiny"  # "tiny" | a local checkpoint dir | a hub name (Backbone.from_pretrained)
dtype = "float32"  # compute dtype ("bfloat16" on GPUs); master weights and AdamW state stay in master_dtype
master_dtype = "float32"
attn_implementation = "sdpa"  # or "flash_attention_2" where installed
fsdp = False  # FSDP2 over all processes (model.fsdp_shard); False = DDP (the model fits on every GPU)
min_pixels = 0  # per image, after Qwen's resize (0 = the checkpoint's); visual tokens = pixels / 28^2
max_pixels = 0  # (the tiny backbone fixes image_size^2); the setting is saved with the checkpoint's processor
max_seq_len = 0  # > 0: longer samples keep the prompt and the response's first tokens (Backbone.build_inputs)
logprob_chunk = 1024  # tokens per LM-head chunk: the head runs only at supervised positions (model.token_logprobs)
seed = 0
# tiny backbone sizes (init_from="tiny" only)
n_layer = 4
n_head = 4
n_embd = 192
vision_depth = 2
vision_embd = 256  # frozen random features: wider keeps more of the image (0.20 -> 0.31 held-out prefix here)
# every image (training frames, VQA images) is resized and padded to image_size x image_size before Qwen's
# processor (model.resize_with_pad, openpi's rule); saved with the checkpoint, the later stages and the evaluations
# use the same size whatever the simulator renders. The real recipe: 224 (openpi); 0 = images as they are
image_size = 56
# data: paths are format strings over data_dir; "" turns a validation set off
data_dir = "out/data"  # the default is generated here (data.make_synthetic_dataset, seed 0) if missing
vqa_train = "{data_dir}/vqa_train.json"  # LLaVA-style json / jsonl
vqa_val = "{data_dir}/vqa_val.json"
reasoning_train = "{data_dir}/reasoning_train.json"  # answers are <think>...</think><answer>...</answer>
reasoning_val = "{data_dir}/reasoning_val.json"
image_root = ""  # json image paths are relative to this ("" = each json's own directory)
robot_data = "libero"  # "libero" (hdf5 files / dirs / globs, comma-separated) | "calvin" (a split dir)
robot_train = "{data_dir}/libero/train"
robot_val = "{data_dir}/libero/val"
flip_images = False  # rotate robot images by 180 degrees (official LIBERO files, see data.LiberoDataset)
no_noops = True  # LIBERO: drop no-op steps as openvla / openpi train (data.LiberoDataset)
# mixture weights (arXiv 2603.21341 stage 1: (a) VQA, (b) reasoning, (c) FAST action prediction). (d) think_action:
# the RL prompt answered with a thought (the data's per-step scene reasoning if it has any) and the action
# tokens. Stage 2 (align_rl.py) prompts with REASONING_ACTION_PROMPT and rewards
# <think>..</think><answer><ACTION_START>..<ACTION_END></answer>, a format a 2M-parameter model never
# produces by chance; this small component gives it a non-zero start.
# A 7B model follows the instruction zero-shot, so the paper's config sets it to 0.
vqa_weight = 0.15
reasoning_weight = 0.25
action_weight = 0.5
think_action_weight = 0.1
action_prompt = data.ACTION_PROMPT
think_action_prompt = data.REASONING_ACTION_PROMPT
think_action_response = "<think>{thought}</think><answer>{action}</answer>"
think_action_thought = "I need to {instruction}."  # the thought for robot data without per-step reasoning
# FAST action tokens (arXiv 2603.21341 stage 0)
action_horizon = 8  # chunk length H of the FAST targets
fast_vocab_size = 16  # 2048 in the paper; see fast_scale
fast_scale = 1.0  # 10 in FAST; coarse here so the exact-token metric is reachable on CPU (see below)
fast_tokenizer_path = ""  # "" = fit on the training demonstrations' normalized chunks
norm_stats_path = ""  # "" = q01/q99 of the training demonstrations
fast_fit_max_chunks = 200_000  # fit FAST on a seeded subsample of at most this many chunks
# optimization
batch_size = 16  # micro-batch per process (split further when processes outnumber accumulation steps)
gradient_accumulation_steps = 1  # over all processes (nanoGPT): global batch = batch_size * this
max_iters = 1000
lr = 2e-3
min_lr = 2e-4
warmup_frac = 0.03  # arXiv 2603.21341: warm-up 3%, cosine
weight_decay = 0.0  # (open) not stated in the paper; never applied to 1-D params (norms, biases)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
freeze_vision = True  # arXiv 2603.21341: vision encoder frozen (the merger / projector still trains)
vision_lr_scale = 1.0  # lr multiplier of the vision blocks when freeze_vision=False
gradient_checkpointing = False
# evaluation and logging
eval_interval = 1000  # also at step 0 and at the end; 0 = no evaluation
eval_iters = 4  # validation-loss batches of the global batch size
eval_action_samples = 128  # held-out robot frames decoded greedily (action_exact / action_prefix)
eval_reasoning_samples = 48  # held-out reasoning prompts decoded greedily (reasoning_format)
eval_extra_tokens = 16  # generation budget beyond the reference answer's length
save_interval = 1000  # and at the end
log_interval = 50
resume = False  # continue the run in out_dir
overwrite = False  # start again over a run in out_dir (its log and checkpoint are replaced)
# -----------------------------------------------------------------------------

COMPONENTS = ("vqa", "reasoning", "action", "think_action")


def think_action_text(sample, action):
    """The think_action target (think_action_response): the dataset's per-step reasoning as the thought (the
    embedded default has it), else think_action_thought; then the action tokens."""
    thought = sample.get("reasoning") or think_action_thought.format(instruction=sample["instruction"])
    return think_action_response.format(thought=thought, action=action)


def mixture_counts(weights, global_batch):
    """How many of the global batch's samples each component gets: largest-remainder rounding of
    weight / sum * global_batch, so every batch has the same composition (lower-variance steps than
    drawing a component per sample) and the counts are a pure function of the config."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"empty mixture: weights {dict(zip(COMPONENTS, weights))} must be >= 0 with a positive sum")
    exact = w / w.sum() * global_batch
    counts = np.floor(exact).astype(int)
    leftover = np.argsort(-(exact - counts), kind="stable")[:global_batch - counts.sum()]
    counts[leftover] += 1
    starved = [name for name, wi, c in zip(COMPONENTS, w, counts) if wi > 0 and c == 0]
    if starved:
        raise ValueError(f"mixture components {starved} get no sample of a global batch of {global_batch}: "
                         "raise their weight or batch_size * gradient_accumulation_steps")
    return counts.tolist()


def mixture_batch(step, sizes, counts, seed):
    """The global batch at `step` as (component, index) pairs: a pure function of (step, seed), so any world
    size and a resumed run see the same data. Component c walks its own seeded epochs
    (data.global_batch_indices), then the batch is shuffled so each rank's contiguous slice is a mix."""
    batch = []
    for c, (size, count) in enumerate(zip(sizes, counts)):
        if count:
            batch += [(c, i) for i in global_batch_indices(step, size, count, seed=seed * len(COMPONENTS) + c)]
    order = np.random.default_rng([seed, step]).permutation(len(batch))
    return [batch[i] for i in order]


def check_images_exist(dataset):
    """A json naming a missing image, or a file that is not an image, fails here, before training, not at the step
    that samples it (PIL reads only the header here; data cut short after it fails when decoded, naming the file)."""
    for s in dataset.samples:
        for p in s["image_paths"]:
            full = p if os.path.isabs(p) else os.path.join(dataset.image_root, p)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{dataset.path}: record {s['record']}: image {full} not found")
            try:
                Image.open(full).close()
            except OSError as e:
                raise OSError(f"{dataset.path}: record {s['record']}: {full} is not an image ({e})") from e


def main():
    config = configure(globals())
    check_out_dir(out_dir, resume, overwrite)  # before anything is read or written
    rank, local_rank, world_size, device = setup_distributed()
    ddp, master = world_size > 1, rank == 0
    torch.manual_seed(seed)
    micro_batch, accum_per_rank = split_global_batch(batch_size, gradient_accumulation_steps, world_size)
    global_batch = batch_size * gradient_accumulation_steps
    weights = [vqa_weight, reasoning_weight, action_weight, think_action_weight]
    counts = mixture_counts(weights, global_batch)  # an empty mixture fails here, before anything is loaded
    compute_dtype = getattr(torch, dtype)
    autocast = compute_context(device, compute_dtype, fsdp)

    # ---- data (every error about paths, files or images is raised here, before training) ----
    check_data_dir(data_dir)
    path = lambda p: p.format(data_dir=data_dir)
    root = path(image_root) or None

    def conversations(p, key):
        if not p:
            return None
        if not os.path.isfile(path(p)):
            raise FileNotFoundError(f"{key}: {path(p)} not found (LLaVA-style json / jsonl expected)")
        dataset = ConversationDataset(path(p), image_root=root)
        if len(dataset) == 0:
            raise ValueError(f"{key}: {path(p)} holds no conversation")
        check_images_exist(dataset)
        return dataset

    train_sets = dict(vqa=conversations(vqa_train, "vqa_train") if vqa_weight > 0 else None,
                      reasoning=conversations(reasoning_train, "reasoning_train") if reasoning_weight > 0 else None)
    val_sets = dict(vqa=conversations(vqa_val, "vqa_val") if vqa_weight > 0 else None,
                    reasoning=conversations(reasoning_val, "reasoning_val") if reasoning_weight > 0 else None)
    robot_kwargs = dict(flip_images=flip_images, no_noops=no_noops) if robot_data == "libero" else {}
    robot = open_robot_dataset(robot_data, path(robot_train), action_horizon, **robot_kwargs)
    robot_val_set = open_robot_dataset(robot_data, path(robot_val), action_horizon, **robot_kwargs) if robot_val else None
    train_sets.update(action=robot, think_action=robot)
    val_sets.update(action=robot_val_set, think_action=robot_val_set)

    # ---- backbone, FAST tokenizer and normalization (arXiv 2603.21341 stage 0) ----
    if master:
        recover_checkpoint(out_dir)
    if ddp:
        dist.barrier()
    state_path = os.path.join(out_dir, "train_state.pt")
    if resume and not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume: {state_path} not found")
    source = out_dir if resume else init_from
    if source == "tiny":
        backbone = Backbone.tiny(fast_vocab_size=fast_vocab_size, seed=seed, hidden_size=n_embd, num_layers=n_layer,
                                 num_heads=n_head, vision_depth=vision_depth, vision_hidden_size=vision_embd, image_size=image_size)
    else:
        backbone = Backbone.from_pretrained(source, fast_vocab_size=fast_vocab_size, dtype=getattr(torch, master_dtype),
                                            attn_implementation=attn_implementation, min_pixels=min_pixels, max_pixels=max_pixels)
        backbone.set_image_size(image_size, source)
    own_fast = os.path.isdir(source) and os.path.isfile(os.path.join(source, "fast_tokenizer.json"))
    fast_path = fast_tokenizer_path or (os.path.join(source, "fast_tokenizer.json") if own_fast else "")
    stats_path = norm_stats_path or (os.path.join(source, "norm_stats.json") if own_fast else "")
    demos = robot.demonstrations(fast_fit_max_chunks, seed) if not (stats_path and fast_path) else None
    if stats_path:
        norm_stats = NormStats.load(stats_path)
        check_compatible(robot[0], path(robot_train), norm_stats, stats_path)  # before the FAST fit uses them
    else:
        norm_stats = NormStats.compute(np.concatenate([a for a, _ in demos]), np.concatenate([s for _, s in demos]))
    if fast_path:
        fast = FastTokenizer.load(fast_path)
    else:  # every start t of every demonstration (padded at the end like the samples), normalized
        chunks = np.stack([chunk_at(actions, t, action_horizon)[0] for actions, _ in demos for t in range(len(actions))])
        if len(chunks) > fast_fit_max_chunks:
            chunks = chunks[np.sort(np.random.default_rng(seed).choice(len(chunks), fast_fit_max_chunks, replace=False))]
        fast = FastTokenizer.fit(norm_stats.normalize_actions(chunks), vocab_size=fast_vocab_size, scale=fast_scale)
        if master:
            print(f"fitted {fast} on {len(chunks)} chunks")
    check_compatible(robot[0], path(robot_train), norm_stats, stats_path or "(the computed statistics)", fast,
                     fast_path or "(the fitted tokenizer)")
    if (fast.horizon, fast.vocab_size) != (action_horizon, backbone.fast_vocab_size):
        raise ValueError(f"FAST tokenizer {fast_path or '(fitted)'}: horizon {fast.horizon}, vocab {fast.vocab_size}, but "
                         f"action_horizon={action_horizon} and the backbone has {backbone.fast_vocab_size} action tokens")

    def example(component, sample):
        """One (images, prompt, response) training example from a dataset sample."""
        if component in ("vqa", "reasoning"):
            return sample
        action = backbone.action_text(fast_target(sample, fast, norm_stats))
        if component == "action":
            return dict(images=sample["images"], prompt=action_prompt.format(instruction=sample["instruction"]), response=action)
        return dict(images=sample["images"], prompt=think_action_prompt.format(instruction=sample["instruction"]),
                    response=think_action_text(sample, action))

    def build(pairs, sets):
        examples = [example(COMPONENTS[c], sets[COMPONENTS[c]][i]) for c, i in pairs]
        return backbone.build_inputs([e["images"] for e in examples], [e["prompt"] for e in examples],
                                     [e["response"] for e in examples], max_length=max_seq_len)

    # ---- model, optimizer (arXiv 2603.21341 stage 1: vision encoder frozen, everything else trained) ----
    if freeze_vision:
        backbone.freeze_vision_blocks()
    if gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.to(device).train()
    model = backbone
    if fsdp:
        model = fsdp_shard(backbone, compute_dtype)
    elif ddp:  # no buffers to sync; gradients live in the all-reduce buckets (no second copy: matters for a 7B)
        model = DDP(backbone, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False,
                    gradient_as_bucket_view=True)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    vision = {id(p) for name, p in backbone.model.model.visual.named_parameters() if not name.startswith("merger.")}
    groups = [dict(params=[p for p in params if (p.dim() >= 2) == decay and (id(p) in vision) == is_vision],
                   weight_decay=weight_decay if decay else 0.0, lr_scale=vision_lr_scale if is_vision else 1.0)
              for decay in (True, False) for is_vision in (False, True)]
    groups = [g for g in groups if g["params"]]  # the vision groups are empty while the blocks are frozen
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=device.type == "cuda")
    warmup_iters = math.ceil(warmup_frac * max_iters)
    step = 0
    if resume:
        train_state = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
        load_optimizer_state_dict(backbone, optimizer, train_state["optimizer"])
        set_rng_state(train_state["rng"])
        step = train_state["step"]
        changed = {k: (train_state["config"].get(k), v) for k, v in config.items() if train_state["config"].get(k) != v and k != "resume"}
        if master:
            print(f"resuming from {state_path} at step {step}" + (f"; changed keys (old, new): {changed}" if changed else ""))
    logger = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=master, resume_step=step if resume else None)
    sizes = [len(train_sets[k]) if train_sets[k] is not None else 0 for k in COMPONENTS]
    if master:
        print(f"backbone {source}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trained; {world_size} process(es) on {device}")
        print(f"global batch {global_batch}: " + ", ".join(f"{c} {name} (of {n})" for name, n, c in zip(COMPONENTS, sizes, counts) if c))

    def all_sum(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    def loss_sum(inputs, module):
        """Summed next-token cross-entropy over the response tokens (labels != -100) and their count; the LM
        head runs only at those positions (Backbone.forward)."""
        targets = torch.full_like(inputs["labels"], -100)
        targets[:, :-1] = inputs["labels"][:, 1:]  # position t predicts token t + 1
        with autocast:
            logp, _ = module(inputs, targets, chunk_tokens=logprob_chunk)
        return -logp.sum(), (targets != -100).sum().item()

    # ---- evaluation on held-out data ----
    val_sizes = [len(val_sets[k]) if val_sets[k] is not None else 0 for k in COMPONENTS]
    val_counts = mixture_counts([w if n else 0.0 for w, n in zip(weights, val_sizes)], global_batch) if any(
        w and n for w, n in zip(weights, val_sizes)) else None
    probe = np.random.default_rng(seed + 1)  # fixed held-out subsets, the same at every evaluation
    action_probe = np.sort(probe.permutation(len(robot_val_set))[:eval_action_samples]).tolist() if robot_val_set else []
    reasoning_probe = (np.sort(probe.permutation(len(val_sets["reasoning"]))[:eval_reasoning_samples]).tolist()
                       if val_sets["reasoning"] is not None else [])

    @torch.no_grad()
    def greedy(examples):
        """Greedy completions of the examples' prompts, with room for the reference response + eval_extra_tokens."""
        first = lambda text: text if isinstance(text, str) else text[0]  # a multi-turn conversation: its first turn
        inputs = backbone.build_inputs([e["images"] for e in examples], [first(e["prompt"]) for e in examples])
        longest = max(len(backbone.tokenizer(first(e["response"]), add_special_tokens=False)["input_ids"]) for e in examples)
        with autocast:
            return backbone.generate(inputs, max_new_tokens=longest + eval_extra_tokens)

    @torch.no_grad()
    def evaluate():
        """val_loss (token mean over eval_iters fixed mixture batches), and greedy decoding of held-out prompts:
        action_exact / action_prefix (data.prefix_match_reward, the RL reward's action term) on action_prompt,
        think_action_format / think_action_prefix on the RL prompt, reasoning_format on reasoning prompts.
        Each process decodes its share of the prompts; the sums are all-reduced."""
        backbone.eval()
        out = {}
        if val_counts is not None:
            total, tokens = 0.0, 0
            for i in range(eval_iters):
                pairs = mixture_batch(i, val_sizes, val_counts, seed + 1)[rank::world_size]
                for k in range(0, len(pairs), batch_size):
                    loss, n = loss_sum(build(pairs[k:k + batch_size], val_sets), model)
                    total, tokens = total + loss.item(), tokens + n
            total, tokens = all_sum(total, tokens)
            out["val_loss"] = total / tokens
        sums = dict.fromkeys(("action_exact", "action_prefix", "think_action_format", "think_action_prefix", "n_action",
                              "reasoning_format", "n_reasoning"), 0.0)
        mine = action_probe[rank::world_size]
        for k in range(0, len(mine), batch_size):
            samples = [robot_val_set[i] for i in mine[k:k + batch_size]]
            targets = [fast_target(s, fast, norm_stats) for s in samples]
            direct = greedy([example("action", s) for s in samples])
            think = greedy([example("think_action", s) for s in samples])
            for target, direct_ids, think_ids in zip(targets, direct, think):
                pred = backbone.parse_action_tokens(direct_ids)
                sums["action_exact"] += pred == target
                sums["action_prefix"] += prefix_match_reward(pred, target)
                sums["think_action_format"] += format_reward(backbone.completion_text(think_ids), require_action=True)
                sums["think_action_prefix"] += prefix_match_reward(backbone.parse_action_tokens(think_ids), target)
            sums["n_action"] += len(samples)
        mine = reasoning_probe[rank::world_size]
        for k in range(0, len(mine), batch_size):
            for ids in greedy([val_sets["reasoning"][i] for i in mine[k:k + batch_size]]):
                sums["reasoning_format"] += format_reward(backbone.completion_text(ids))
            sums["n_reasoning"] += len(mine[k:k + batch_size])
        sums = dict(zip(sums, all_sum(*sums.values())))
        for key in ("action_exact", "action_prefix", "think_action_format", "think_action_prefix", "reasoning_format"):
            n = sums["n_reasoning" if key == "reasoning_format" else "n_action"]
            if n:
                out[key] = sums[key] / n
        backbone.train()
        return {k: round(float(v), 5) for k, v in out.items()}

    def checkpoint(step):
        state = full_state_dict(backbone.model)  # collectives: every rank takes part
        optim = optimizer_state_dict(backbone, optimizer)

        def write(tmp):
            backbone.save_pretrained(tmp, state_dict=state)
            fast.save(os.path.join(tmp, "fast_tokenizer.json"))
            norm_stats.save(os.path.join(tmp, "norm_stats.json"))
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            torch.save(dict(step=step, optimizer=optim, rng=rng_state(), config=config), os.path.join(tmp, "train_state.pt"))
        if master:
            save_checkpoint(out_dir, write)
        if ddp:
            dist.barrier()

    def run_eval(step):
        t0 = time.time()
        with backbone.gathered():  # under FSDP: parameters gathered once for all the greedy decoding
            metrics = evaluate()
        logger.log(step=step, **metrics)
        if master:
            tqdm.write(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({time.time() - t0:.1f} s)")

    # ---- training loop ----
    if eval_interval and step == 0:
        run_eval(0)  # the untrained level
    if master and step >= max_iters:
        print(f"{out_dir} is already at step {step} of max_iters={max_iters}: nothing to train (raise --max_iters to go on)")
    bar = tqdm(total=max_iters, initial=step, disable=not master, desc="sft", dynamic_ncols=True)
    t_log = time.time()
    while step < max_iters:
        step_lr = cosine_lr(step, max_iters, lr, warmup_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr * group["lr_scale"]
        per_rank = global_batch // world_size
        pairs = mixture_batch(step, sizes, counts, seed)[rank * per_rank:(rank + 1) * per_rank]
        micro_batches = [build(pairs[k * micro_batch:(k + 1) * micro_batch], train_sets) for k in range(accum_per_rank)]
        # token-mean over the whole global batch: every process needs the global count of response tokens
        (global_tokens,) = all_sum(sum((b["labels"][:, 1:] != -100).sum().item() for b in micro_batches))
        total = 0.0
        for k, inputs in enumerate(micro_batches):
            sync = fsdp or not ddp or k == accum_per_rank - 1  # DDP all-reduces once per step; FSDP reduce-scatters each
            with nullcontext() if sync else model.no_sync():
                loss, _ = loss_sum(inputs, model)
                (loss * world_size / global_tokens).backward()  # DDP averages over processes, hence * world_size
            total += loss.item()
        grad_norm = clip_grad_norm(params, grad_clip)  # of the synchronized gradients: the same on every rank
        (total,) = all_sum(total)
        train_loss = total / global_tokens
        check_step(step + 1, train_loss, grad_norm, out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        logger.log(step=step, loss=round(train_loss, 6), lr=step_lr)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}")
        if master and (step % log_interval == 0 or step == max_iters):
            tqdm.write(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {step_lr:.2e} | "
                       f"{(time.time() - t_log) * 1000 / log_interval:.0f} ms/step")
            t_log = time.time()
        if eval_interval and (step % eval_interval == 0 or step == max_iters):
            run_eval(step)
        if step % save_interval == 0 or step == max_iters:
            checkpoint(step)
    bar.close()
    if master:
        print(f"done: {out_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

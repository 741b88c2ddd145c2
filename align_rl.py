"""Stage 2 of RoboAlign: GRPO that aligns the MLLM's reasoning with low-level actions (arXiv 2603.21341, stage 2).

The model sees image(s) + instruction with a prompt that asks it to reason, then answer with FAST action tokens:
`<think>...</think><answer><ACTION_START> <act_i>... <ACTION_END></answer>`. Each prompt gets G samples; the
reward is r = (r_format + r_action) / 2 with r_action the prefix match of the generated tokens against the
demonstration's (data.prefix_match_reward); advantages are normalized within each group; the policy takes
clipped-ratio steps, optionally with a KL penalty to the frozen start model. Written out here, no RL framework.

    python align_rl.py                                    # embedded default: from out/sft, CPU
    torchrun --nproc_per_node=8 align_rl.py config/align_rl_qwen2_5_vl_7b.py --fsdp=True   # the paper's recipe

One rollout step: sample G completions per prompt (Backbone.sample: each prompt and its images encoded once,
its KV cache shared by the group), score them, then take rollout_batch / update_batch optimizer steps, each over
micro-batches of micro_batch_size sequences with gradient accumulation. Every log-prob (old, reference, new) is
of the distribution the sampler draws from: logits / temperature, image ids excluded. top_p < 1 is applied by
the sampler but not by the log-probs (as in TRL and verl): the ratio then refers to the untruncated
distribution, so the paper config keeps top_p = 1. The first optimizer step of a rollout runs at the sampling
parameters, so its old log-probs are the current ones, detached: no extra forward (TRL does the same).

Writes out_dir like sft.py (backbone in HF format, fast_tokenizer.json, norm_stats.json, run_config.json,
train_state.pt, metrics.jsonl with, per rollout step, the metrics of step_metrics() and timings
(time_generate / time_logprob / time_update, seconds); and eval_reward / eval_reward_format /
eval_reward_action on held-out prompts, decoded greedily, at the start, every eval_interval and at the end;
eval_sampled_*: one answer per held-out prompt sampled at the rollout temperature, at the start and the end).
"""

import json
import os
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from data import (check_out_dir, check_step, check_compatible, MetricsLogger, NormStats, configure, check_data_dir, fast_target, format_reward,
                  global_batch_indices, open_robot_dataset, prefix_match_reward, recover_checkpoint, rng_state,
                  save_checkpoint, set_rng_state, setup_distributed)
from model import (Backbone, FastTokenizer, clip_grad_norm, compute_context, fsdp_shard, full_state_dict,
                   load_optimizer_state_dict, optimizer_state_dict, weights_fingerprint)

# -----------------------------------------------------------------------------
# config: these defaults ARE the embedded tiny CPU recipe (config/align_rl_qwen2_5_vl_7b.py: the paper's)
out_dir = "out/align_rl"
init_from = "out/sft"  # a stage-1 checkpoint dir, or a hub id with fast_tokenizer_path and norm_stats_path
fast_tokenizer_path = ""  # "" = init_from/fast_tokenizer.json
norm_stats_path = ""  # "" = init_from/norm_stats.json
dtype = "float32"  # compute dtype ("bfloat16" on GPUs); master weights and AdamW state stay in master_dtype
master_dtype = "float32"
attn_implementation = "sdpa"  # or "flash_attention_2" where installed
fsdp = False  # FSDP2 over all processes (model.fsdp_shard); False = DDP (the model fits on every GPU)
gradient_checkpointing = False  # recompute each decoder layer in backward
seed = 0
data_dir = "out/data"
robot_data = "libero"
robot_train = "{data_dir}/libero/train"
robot_val = "{data_dir}/libero/val"
flip_images = False
no_noops = True  # LIBERO: drop no-op steps as openvla / openpi train (data.LiberoDataset)
image_size = 56  # model.resize_with_pad size: the stage-1 checkpoint's (checked; the real recipe: 224)
prompt_template = data.REASONING_ACTION_PROMPT
prompt_images = True  # False: the instruction alone, no camera images (an ablation; the bench's text-only workload)
num_prompts = 512  # the RL subset of the demonstrations (paper: 12.8K, < 1% of the SFT data)
num_eval_prompts = 256  # held-out prompts, decoded greedily (64 left a standard error of ~0.04 on the reward)
eval_batch_size = 32
# rollouts
group_size = 5  # G (the paper)
rollout_batch = 16  # prompts per rollout step, over all processes (paper: 512)
update_batch = 8  # prompts per optimizer step (paper: 128): rollout_batch / update_batch steps per rollout
generation_batch = 16  # prompts per Backbone.sample call (x G sequences of KV cache)
micro_batch_size = 40  # sequences per forward / backward (a multiple of group_size); gradients accumulate
logprob_chunk = 1024  # tokens per LM-head chunk (model.token_logprobs)
temperature = 0.7  # the paper leaves it open (EasyR1's default: 1.0). The tiny SFT policy's T 1 samples score far
# below its greedy answer (held-out action reward 0.19 vs 0.29; 0.24 at T 0.7), so at 0.7 a group more often holds
# an answer better than the mode (README)
top_p = 1.0
max_new_tokens = 80  # the embedded default's scene thought + action tokens take 40-60
mask_truncated_completions = False  # True: completions cut at max_new_tokens get no loss (DAPO, Yu et al. 2025)
sample_per_prompt = False  # True: seed each prompt's group by (seed, step, prompt): world-size-independent samples
# reward r = format_weight * r_format + action_weight * r_action (the paper: 1/2 each)
format_weight = 0.5
action_weight = 0.5
reward_kind = "prefix"  # "prefix" (the paper) | "l1": 1 - mean |decoded - target| / 2 on normalized actions
# GRPO
advantage = "grpo"  # "grpo": (r - group mean) / (group std + 1e-6), std unbiased as EasyR1 and TRL |
# "mean_only": r - group mean (Dr. GRPO's advantage, Liu et al. 2025; Dr. GRPO also sets loss_norm="constant")
eps_low = 0.2
eps_high = 0.2
loss_norm = "token"  # "token": sum over the update batch's tokens / their count (EasyR1's token-mean) |
# "sequence": mean per sequence, then over sequences (the GRPO paper) | "constant": sum / (sequences x max_new_tokens)
beta = 0.0  # KL-penalty coefficient to the frozen start model (EasyR1: 1e-2); 0 = no reference model is loaded
kl_estimator = "low_var_kl"  # "k3" (Schulman 2020) | "low_var_kl": k3 clamped to [-10, 10] (EasyR1 / verl)
# optimization: the paper's constant lr 1e-6 moves a 7B; a 2M-parameter model needs ~1000x more to move in minutes
max_iters = 40  # rollout steps (60 gave no more: docs/embedded_default_notes.md)
lr = 2e-5
betas = (0.9, 0.99)  # the tiny recipe's; EasyR1's (0.9, 0.999) in the paper config
weight_decay = 0.0
# The paper trains all parameters in stage 2 (the paper config sets False). The tiny backbone's vision blocks
# are random and were frozen through SFT, so the rest of the model is fitted to their exact features: moving
# them perturbs every input the policy reads (the merger, Qwen-VL's projector, still trains)
freeze_vision = True
grad_clip = 1.0
eval_interval = 20
eval_sampled = True  # also score one rollout-temperature sample per held-out prompt, at the start and the end
save_interval = 30
log_interval = 1
resume = False  # continue the run in out_dir
overwrite = False  # start again over a run in out_dir (its log and checkpoint are replaced)
# -----------------------------------------------------------------------------


def group_advantages(rewards, kind="grpo", eps=1e-6):
    """rewards [P, G] -> advantages [P, G]. "grpo": (r - group mean) / (group std + eps) with the unbiased std
    (EasyR1's compute_grpo_outcome_advantage and TRL both use torch.std); "mean_only": r - group mean. A group
    whose rewards are all equal gets 0 everywhere: it carries no signal."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    assert rewards.dim() == 2, f"rewards must be [prompts, group], got {tuple(rewards.shape)}"
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "grpo":
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps) if rewards.shape[1] > 1 else centered * 0
    elif kind != "mean_only":
        raise ValueError(f"advantage={kind!r}: expected 'grpo' or 'mean_only'")
    return centered.float()


def kl_penalty(logp, ref_logp, estimator="low_var_kl"):
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy: k3 = exp(ref - logp) -
    (ref - logp) - 1 (Schulman 2020), unbiased and >= 0; low_var_kl clamps the log-ratio to [-20, 20] and k3 to
    [-10, 10] (EasyR1's verl/trainer/core_algos.py)."""
    log_ratio = ref_logp - logp
    if estimator == "low_var_kl":
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)
    k3 = torch.exp(log_ratio) - log_ratio - 1
    if estimator != "k3":
        raise ValueError(f"kl_estimator={estimator!r}: expected 'k3' or 'low_var_kl'")
    return k3


def grpo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, loss_norm="token", ref_logp=None, beta=0.0,
              kl_estimator="low_var_kl", num_tokens=None, num_sequences=None, max_new_tokens=None):
    """Clipped-ratio GRPO objective, negated. logp/old_logp/ref_logp/mask [N, T], advantages [N].
    The normalizers are of the whole update batch (all micro-batches and processes), so that summing the
    micro-batch losses gives the loss of one big batch: loss_norm "token": sum of per-token losses / num_tokens
    (default mask.sum()); "sequence": sum of each sequence's token mean / num_sequences (default N); "constant":
    sum / (num_sequences x max_new_tokens) (Dr. GRPO). A batch without tokens gives 0, not NaN.
    Returns (loss, stats) with stats the sums clipped_tokens and kl (per-token KL summed over the mask)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if beta > 0:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    num_sequences = num_sequences if num_sequences is not None else len(mask)
    if loss_norm == "token":
        loss = (per_token * mask).sum() / max(num_tokens if num_tokens is not None else mask.sum().item(), 1)
    elif loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(num_sequences, 1)
    elif loss_norm == "constant":
        loss = (per_token * mask).sum() / max(num_sequences * (max_new_tokens or mask.shape[1]), 1)
    else:
        raise ValueError(f"loss_norm={loss_norm!r}: expected 'token', 'sequence' or 'constant'")
    stats = dict(clipped_tokens=float(((clipped < unclipped).float() * mask).sum()),
                 kl=float((kl.detach() * mask).sum()) if kl is not None else 0.0)
    return loss, stats


def completion_mask(completions, eos_id, mask_truncated=False):
    """1 on generated tokens up to and including the first <|im_end|>, 0 on the padding after it; with
    mask_truncated, 0 on every token of a completion that never emitted <|im_end|>."""
    is_eos = (completions == eos_id).long()
    mask = (is_eos.cumsum(1) - is_eos == 0).long()
    if mask_truncated:
        mask = mask * is_eos.any(1, keepdim=True).long()
    return mask


def sequence_logprobs(policy, inputs, completions, mask, temperature, group_size, with_entropy=False, chunk_tokens=1024):
    """Per-token log-probs [N, C] (and entropies) of completions [N, C] after their prompts under `policy` (a
    Backbone, or its DDP / FSDP wrapper) at the sampling temperature. `inputs` hold the P = N / G prompts
    (left-padded, their images once); the text is repeated G times here."""
    P = inputs["input_ids"].shape[1]
    assert completions.shape == mask.shape and len(completions) == group_size * len(inputs["input_ids"])
    full = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    full["input_ids"] = torch.cat([inputs["input_ids"].repeat_interleave(group_size, 0), completions.cpu()], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"].repeat_interleave(group_size, 0), mask.cpu()], 1)
    full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"].repeat_interleave(group_size, 0),
                                           torch.zeros_like(completions.cpu())], 1)
    targets = torch.full_like(full["input_ids"], -100)  # position t predicts token t + 1: P - 1 .. P + C - 2
    targets[:, P - 1:-1] = completions.cpu().masked_fill(mask.cpu() == 0, -100)
    logp, entropy = policy(full, targets, temperature=temperature, suppress_image_tokens=True,
                           with_entropy=with_entropy, chunk_tokens=chunk_tokens, image_repeat=group_size)
    return logp[:, P - 1:-1], (entropy[:, P - 1:-1] if with_entropy else None)


def rewards_of(backbone, completions, targets, fast, reward_kind="prefix", format_weight=0.5, action_weight=0.5):
    """np.float64 [N, 3]: (reward, r_format, r_action) per completion; targets are the demonstrations' FAST ids."""
    out = []
    for ids, target in zip(completions, targets):
        r_format = format_reward(backbone.completion_text(ids), require_action=True)
        pred = backbone.parse_action_tokens(ids)
        if reward_kind == "prefix":
            r_action = prefix_match_reward(pred, target)
        elif reward_kind == "l1":  # the reviewers' ablation: a reward on the decoded continuous actions
            r_action = 0.0 if not pred else float(np.clip(1 - np.abs(fast.decode(pred) - fast.decode(target)).mean() / 2, 0, 1))
        else:
            raise ValueError(f"reward_kind={reward_kind!r}: expected 'prefix' or 'l1'")
        out.append((format_weight * r_format + action_weight * r_action, r_format, r_action))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def step_metrics(sums, group_size, updates=1):
    """Per rollout step metrics from sums over the step's sequences (all processes): the mean reward and its
    parts, the within-group reward std, groups whose rewards are all equal (to 1e-6), the mean response length,
    the clipped-token fraction, approx_kl (k3 from the sampling policy to the policy before each optimizer
    step, per token), kl (to the reference, per token), entropy (per token) and the loss (mean over the updates)."""
    n, tokens, groups = sums["sequences"], max(sums["tokens"], 1), sums["sequences"] / group_size
    return dict(reward=sums["reward"] / n, reward_format=sums["reward_format"] / n, reward_action=sums["reward_action"] / n,
                reward_std=sums["group_std"] / groups, zero_var_groups=int(sums["zero_var_groups"]),
                zero_var_frac=sums["zero_var_groups"] / groups, response_len=sums["tokens"] / n,
                clip_frac=sums["clipped_tokens"] / tokens, approx_kl=sums["approx_kl"] / tokens, kl=sums["kl"] / tokens,
                entropy=sums["entropy"] / tokens, loss=sums["loss"] / updates)


def all_sum(values, device):
    """Sum a dict of numbers over processes (float64); a no-op with one process."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def main():
    config = configure(globals())
    check_out_dir(out_dir, resume, overwrite)  # before anything is read or written
    rank, local_rank, world_size, device = setup_distributed()
    ddp, master = world_size > 1, rank == 0
    torch.manual_seed(seed + rank)  # sampling differs per rank; the data order does not
    if rollout_batch % update_batch or update_batch % world_size:
        raise ValueError(f"rollout_batch={rollout_batch} must be a multiple of update_batch={update_batch}, "
                         f"which must be a multiple of the number of processes ({world_size})")
    if micro_batch_size % group_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of group_size={group_size}: a micro-batch "
                         "holds whole groups, whose prompt images are encoded once")
    compute_dtype = getattr(torch, dtype)
    compute = compute_context(device, compute_dtype, fsdp)

    # ---- the SFT checkpoint: backbone, FAST tokenizer, normalization (a resumed run reads its own copies) ----
    if master:
        recover_checkpoint(out_dir)
    state_path = os.path.join(out_dir, "train_state.pt")
    if resume and not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume: {state_path} not found")
    source = out_dir if resume else init_from
    files = {"fast_tokenizer.json": fast_tokenizer_path, "norm_stats.json": norm_stats_path}
    files = {name: os.path.join(source, name) if resume or not given else given for name, given in files.items()}
    needed = list(files.values()) + ([os.path.join(source, "config.json")] if os.path.isdir(source) else [])
    for path in needed:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from={source!r}: {path} not found; align_rl.py starts from a stage-1 checkpoint "
                                    "(run `python sft.py` first), or a hub id with --fast_tokenizer_path and --norm_stats_path")
    fast = FastTokenizer.load(files["fast_tokenizer.json"])
    norm_stats = NormStats.load(files["norm_stats.json"])
    backbone = Backbone.from_pretrained(source, fast_vocab_size=fast.vocab_size, dtype=getattr(torch, master_dtype),
                                        attn_implementation=attn_implementation)
    backbone.set_image_size(image_size, source)
    reference, reference_fingerprint = None, None
    if beta > 0:  # the frozen start model, stored in the compute dtype
        reference = Backbone.from_pretrained(init_from, fast_vocab_size=fast.vocab_size, dtype=compute_dtype,
                                             attn_implementation=attn_implementation).requires_grad_(False).eval()
        reference.set_image_size(image_size, init_from)
        reference_fingerprint = weights_fingerprint(reference.state_dict())

    # ---- prompts: a seeded subset of the demonstrations (the paper: 12.8K) and held-out ones ----
    check_data_dir(data_dir)
    path = lambda p: p.format(data_dir=data_dir)
    robot_kwargs = dict(flip_images=flip_images, no_noops=no_noops) if robot_data == "libero" else {}
    train_set = open_robot_dataset(robot_data, path(robot_train), fast.horizon, **robot_kwargs)
    val_set = open_robot_dataset(robot_data, path(robot_val), fast.horizon, **robot_kwargs) if robot_val else None
    check_compatible(train_set[0], path(robot_train), norm_stats, files["norm_stats.json"], fast, files["fast_tokenizer.json"])
    prompt_ids = np.sort(np.random.default_rng(seed).permutation(len(train_set))[:num_prompts]).tolist()
    # the same held-out prompts whatever the seed, so runs with different seeds are compared on one set
    eval_ids = np.sort(np.random.default_rng(1).permutation(len(val_set))[:num_eval_prompts]).tolist() if val_set else []

    # ---- distribution: DDP, or FSDP2 shards (fp32 masters, compute_dtype all-gathers) ----
    if freeze_vision:
        backbone.freeze_vision_blocks()
    if gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.to(device).train()
    if fsdp:
        policy = fsdp_shard(backbone, compute_dtype)
        if reference is not None:
            fsdp_shard(reference, compute_dtype)
    elif ddp:
        policy = DDP(backbone, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False,
                     gradient_as_bucket_view=True)
    else:
        policy = backbone
    if reference is not None and not fsdp:
        reference.to(device)
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=device.type == "cuda")
    step = 0
    if resume:
        train_state = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
        load_optimizer_state_dict(backbone, optimizer, train_state["optimizer"])
        set_rng_state(train_state["rng"])
        step = train_state["step"]
        if train_state.get("reference") != reference_fingerprint:  # the KL reference is read from init_from again
            raise ValueError(f"--resume: init_from={init_from!r} is not the model this run started from (its KL reference; "
                             f"weights fingerprint {reference_fingerprint}, the run recorded {train_state.get('reference')})")
    logger = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=master, resume_step=step if resume else None)
    if master:
        print(f"backbone {source}: {sum(p.numel() for p in params) / 1e6:.2f}M trained params; {len(prompt_ids)} RL prompts, "
              f"{len(eval_ids)} held-out; G={group_size}; {world_size} process(es) on {device}"
              f"{' (FSDP)' if fsdp else ' (DDP)' if ddp else ''}")

    def prompt_inputs(samples):
        return backbone.build_inputs([s["images"] if prompt_images else [] for s in samples],
                                     [prompt_template.format(instruction=s["instruction"]) for s in samples])

    def rollout(samples, keys, step):
        """G sampled completions per prompt [len(samples) * G, C], generation_batch prompts per call.
        sample_per_prompt: each group comes from its own call seeded by (seed, step, prompt id), so the samples
        depend neither on the world size nor on which prompts share a call (the 1-vs-2-process test needs it)."""
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        calls = [(samples[k:k + generation_batch], None) for k in range(0, len(samples), generation_batch)]
        if sample_per_prompt:
            calls = [([s], np.random.default_rng([seed, step, key]).integers(2 ** 62)) for s, key in zip(samples, keys)]
        groups = []
        for chunk, call_seed in calls:
            if call_seed is not None:
                torch.manual_seed(int(call_seed))
            with compute:
                groups.append(backbone.sample(prompt_inputs(chunk), group_size, **kwargs).cpu())
        # a shorter call ended on <|im_end|> in every row, so padding it keeps the masks right
        width = max(g.shape[1] for g in groups)
        return torch.cat([torch.nn.functional.pad(g, (0, width - g.shape[1]), value=backbone.pad_id) for g in groups])

    def micro_batches(samples):
        """(prompt inputs, completion rows) per micro-batch of micro_batch_size sequences (whole groups)."""
        per = micro_batch_size // group_size
        return [(prompt_inputs(samples[k:k + per]), slice(k * group_size, (k + per) * group_size))
                for k in range(0, len(samples), per)]

    def logprobs(module, inputs, b, rows, with_entropy=False):
        with compute:
            return sequence_logprobs(module, inputs, b["completions"][rows].to(device), b["mask"][rows].to(device),
                                     temperature, group_size, with_entropy, logprob_chunk)

    @torch.no_grad()
    def evaluate(sampled=False):
        """Held-out prompts answered greedily: eval_reward, eval_reward_format, eval_reward_action; sampled=True:
        one answer per prompt sampled as in the rollouts (eval_sampled_*), the policy GRPO actually optimizes.
        The samples draw on their own seeded generator, so evaluating does not move the training RNG."""
        backbone.eval()
        sums = np.zeros(4)
        mine = eval_ids[rank::world_size]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), backbone.gathered():
            torch.manual_seed(10_000 + rank)
            for k in range(0, len(mine), eval_batch_size):
                samples = [val_set[i] for i in mine[k:k + eval_batch_size]]
                with compute:
                    if sampled:
                        completions = backbone.sample(prompt_inputs(samples), 1, max_new_tokens, temperature, top_p)
                    else:
                        completions = backbone.generate(prompt_inputs(samples), max_new_tokens=max_new_tokens)
                r = rewards_of(backbone, completions, [fast_target(s, fast, norm_stats) for s in samples], fast,
                               reward_kind, format_weight, action_weight)
                sums += np.concatenate([r.sum(0), [len(samples)]])
        sums = np.array(list(all_sum(dict(enumerate(sums)), device).values()))
        backbone.train()
        prefix = "eval_sampled_" if sampled else "eval_"
        return {prefix + k: v for k, v in zip(("reward", "reward_format", "reward_action"), np.round(sums[:3] / max(sums[3], 1), 5).tolist())}

    def checkpoint(step):
        state = full_state_dict(backbone.model)  # collectives: every rank takes part
        optim = optimizer_state_dict(backbone, optimizer)

        def write(tmp):
            backbone.save_pretrained(tmp, state_dict=state)
            for name, path in files.items():
                shutil.copy(path, os.path.join(tmp, name))
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            torch.save(dict(step=step, optimizer=optim, rng=rng_state(), config=config, reference=reference_fingerprint),
                       os.path.join(tmp, "train_state.pt"))
        if master:
            save_checkpoint(out_dir, write)
        if ddp:
            dist.barrier()

    if step == 0 and eval_ids:
        metrics = {**evaluate(), **(evaluate(sampled=True) if eval_sampled else {})}
        logger.log(step=0, **metrics)
        if master:
            print("eval step 0 (the SFT model): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if master and step >= max_iters:
        print(f"{out_dir} is already at step {step} of max_iters={max_iters}: nothing to train (raise --max_iters to go on)")
    bar = tqdm(total=max_iters, initial=step, disable=not master, desc="align_rl", dynamic_ncols=True)
    per_rank_update = update_batch // world_size
    while step < max_iters:
        t0 = time.time()
        sums = dict.fromkeys(("sequences", "tokens", "reward", "reward_format", "reward_action", "group_std", "zero_var_groups",
                              "clipped_tokens", "approx_kl", "kl", "entropy", "loss"), 0.0)
        # ---- rollouts: G samples per prompt from the current policy, parameters gathered once under FSDP ----
        # optimizer step j uses the global prompts rollout[j*U:(j+1)*U], split over ranks: the same prompts per
        # step as one process, whatever the world size
        prompts = global_batch_indices(step, len(prompt_ids), rollout_batch, seed)
        batches = []
        backbone.eval()
        with backbone.gathered():
            for j in range(0, rollout_batch, update_batch):
                mine = [prompt_ids[i] for i in prompts[j:j + update_batch][rank * per_rank_update:(rank + 1) * per_rank_update]]
                samples = [train_set[i] for i in mine]
                completions = rollout(samples, mine, step)
                targets = [fast_target(s, fast, norm_stats) for s in samples for _ in range(group_size)]
                r = rewards_of(backbone, completions, targets, fast, reward_kind, format_weight, action_weight)
                grouped = r[:, 0].reshape(-1, group_size)
                batches.append(dict(parts=micro_batches(samples), completions=completions, rewards=r,
                                    mask=completion_mask(completions, backbone.eos_id, mask_truncated_completions),
                                    adv=group_advantages(grouped, advantage).reshape(-1), old={}, ref={}))
                sums["zero_var_groups"] += int((np.ptp(grouped, axis=1) <= 1e-6).sum())
                sums["group_std"] += float(grouped.std(1, ddof=1).sum()) if group_size > 1 else 0.0
        t_generate = time.time() - t0
        # ---- old and reference log-probs, before any update: the first update's old log-probs are the current
        # ones (same parameters), so only the later updates of a rollout need this forward ----
        with torch.no_grad():
            for j, b in enumerate(batches):
                for k, (inputs, rows) in enumerate(b["parts"]):
                    if j > 0:
                        b["old"][k] = logprobs(policy, inputs, b, rows)[0]
                    if reference is not None:
                        b["ref"][k] = logprobs(reference, inputs, b, rows)[0]
        if fsdp and reference is not None:
            reference.reshard()  # FSDP2 keeps a root gathered after forward; the reference is done until the next rollout
        backbone.train()
        t_logprob = time.time() - t0 - t_generate
        # ---- GRPO updates: rollout_batch / update_batch optimizer steps, each accumulated over micro-batches ----
        grad_norms = []
        for b in batches:
            n = all_sum(dict(tokens=b["mask"].sum().item(), sequences=len(b["mask"])), device)
            for k, (inputs, rows) in enumerate(b["parts"]):
                mask, adv = b["mask"][rows].to(device), b["adv"][rows].to(device)
                sync = fsdp or not ddp or k == len(b["parts"]) - 1  # DDP all-reduces once per step; FSDP reduce-scatters each
                with nullcontext() if sync else policy.no_sync():
                    logp, entropy = logprobs(policy, inputs, b, rows, with_entropy=True)
                    old = b["old"].get(k, logp.detach())
                    loss, stats = grpo_loss(logp, old, adv, mask, eps_low, eps_high, loss_norm, b["ref"].get(k), beta, kl_estimator,
                                            num_tokens=n["tokens"], num_sequences=n["sequences"], max_new_tokens=max_new_tokens)
                    (loss * world_size).backward()  # DDP / FSDP average gradients over processes; the normalizers are global
                with torch.no_grad():  # k3 of KL(sampling policy || policy before this step), per sampled token
                    log_ratio = (logp.detach() - old) * mask
                    sums["approx_kl"] += float((torch.exp(log_ratio) - log_ratio - 1).mul(mask).sum())
                    sums["entropy"] += float((entropy * mask).sum())
                sums["clipped_tokens"] += stats["clipped_tokens"]
                sums["kl"] += stats["kl"]
                sums["loss"] += loss.item()  # this rank's share of the update's loss (global normalizers)
            grad_norms.append(clip_grad_norm(params, grad_clip))  # of the synchronized gradients: every rank's
            check_step(step + 1, 0.0, grad_norms[-1], out_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t0 - t_generate - t_logprob
        step += 1
        r = np.concatenate([b["rewards"] for b in batches])
        sums.update(sequences=len(r), tokens=sum(b["mask"].sum().item() for b in batches), reward=r[:, 0].sum(),
                    reward_format=r[:, 1].sum(), reward_action=r[:, 2].sum())
        metrics = step_metrics(all_sum(sums, device), group_size, updates=len(batches))
        metrics.update(grad_norm=float(np.mean(grad_norms)), lr=lr, time_generate=t_generate, time_logprob=t_logprob, time_update=t_update)
        logger.log(step=step, **{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in metrics.items()})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if master and step % log_interval == 0:
            tqdm.write(f"step {step}/{max_iters} | reward {metrics['reward']:.3f} (format {metrics['reward_format']:.2f}, "
                       f"action {metrics['reward_action']:.3f}) | zero-var groups {metrics['zero_var_groups']} | "
                       f"len {metrics['response_len']:.1f} | {time.time() - t0:.1f} s (generate {t_generate:.1f})")
        if eval_ids and (step % eval_interval == 0 or step == max_iters):
            metrics = {**evaluate(), **(evaluate(sampled=True) if eval_sampled and step == max_iters else {})}
            logger.log(step=step, **metrics)
            if master:
                tqdm.write(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step % save_interval == 0 or step == max_iters:
            checkpoint(step)
    bar.close()
    if master:
        print(f"done: {out_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

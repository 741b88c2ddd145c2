"""Stage 2 of RoboAlign: GRPO that aligns the MLLM's reasoning with low-level actions (PAPER.md "Stage 2").

The model sees image(s) + instruction with a prompt that asks it to reason, then answer with FAST action tokens:
`<think>...</think><answer><ACTION_START> <act_i>... <ACTION_END></answer>`. Each prompt gets G samples; the
reward is r = (r_format + r_action) / 2 with r_action the prefix match of the generated tokens against the
demonstration's (data.prefix_match_reward); advantages are normalized within each group; the policy takes
clipped-ratio steps. Written out here, no RL framework.

    python align_rl.py                                    # embedded default: from out/sft, CPU, ~5 min on 2 cores
    torchrun --nproc_per_node=8 align_rl.py config/align_rl_qwen2_5_vl_7b.py   # the paper's recipe

Writes out_dir like sft.py (backbone in HF format, fast_tokenizer.json, norm_stats.json, run_config.json,
train_state.pt, metrics.jsonl with, per rollout step, reward / reward_format / reward_action, reward_std (within
groups), zero_var_groups / zero_var_frac, response_len, clip_frac, approx_kl (k3, from the sampling policy to
the policy before each optimizer step), entropy, gen_tokens_per_s, grad_norm, loss; and eval_reward /
eval_reward_format / eval_reward_action on held-out prompts, decoded greedily, at the start, every
eval_interval and at the end; eval_sampled_reward / _format / _action: one answer per held-out prompt sampled
at the rollout temperature, at the start and the end).
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
from data import (MetricsLogger, NormStats, configure, ensure_synthetic_dataset, fast_target, format_reward,
                  global_batch_indices, open_robot_dataset, prefix_match_reward, recover_checkpoint, rng_state,
                  save_checkpoint, set_rng_state, setup_distributed)
from model import Backbone, FastTokenizer

# -----------------------------------------------------------------------------
# config: these defaults ARE the embedded tiny CPU recipe (config/align_rl_qwen2_5_vl_7b.py: the paper's)
out_dir = "out/align_rl"
init_from = "out/sft"  # a stage-1 checkpoint (backbone + fast_tokenizer.json + norm_stats.json)
dtype = "float32"  # "bfloat16" for a 7B
seed = 0
data_dir = "out/data"
robot_data = "libero"
robot_train = "{data_dir}/libero/train"
robot_val = "{data_dir}/libero/val"
flip_images = False
prompt_template = data.REASONING_ACTION_PROMPT
num_prompts = 512  # the RL subset of the demonstrations (paper: 12.8K, < 1% of the SFT data)
num_eval_prompts = 256  # held-out prompts, decoded greedily (64 left a standard error of ~0.04 on the reward)
eval_batch_size = 32
# rollouts
group_size = 5  # G (PAPER.md)
rollout_batch = 16  # prompts per rollout step, over all processes (paper: 512)
update_batch = 8  # prompts per optimizer step (paper: 128): rollout_batch / update_batch steps per rollout
temperature = 0.7  # PAPER.md leaves it open (its config: 1.0). The tiny SFT policy's T 1 samples score far below
# its greedy answer (held-out action reward 0.19 vs 0.29; 0.24 at T 0.7), so at 0.7 a group more often holds an
# answer better than the mode, and the greedy reward rises in every seed (README)
top_p = 1.0
max_new_tokens = 80  # the embedded default's scene thought + action tokens take 40-60
sample_per_prompt = False  # True: seed each prompt's group by (seed, step, prompt): world-size-independent samples
# reward r = format_weight * r_format + action_weight * r_action (PAPER.md: 1/2 each)
format_weight = 0.5
action_weight = 0.5
reward_kind = "prefix"  # "prefix" (PAPER.md) | "l1": 1 - mean |decoded - target| / 2 on normalized actions
# GRPO
scale_rewards = True  # (r - mean) / std per group; False = mean-only (Dr. GRPO)
eps_low = 0.2
eps_high = 0.2
loss_norm = "token"  # "token": sum over all tokens / their count | "sequence": mean per sequence, then mean
beta = 0.0  # k3 KL to the frozen start; 0 = no reference model is loaded
# optimization: the paper's constant lr 1e-6 moves a 7B; a 2M-parameter model needs ~1000x more to move in minutes
max_iters = 40  # rollout steps (~5 min on 2 cores; 60 gave no more: README)
lr = 2e-5
weight_decay = 0.0
# PAPER.md trains all parameters in stage 2 (the paper's config sets False). The tiny backbone's vision blocks
# are random and were frozen through SFT, so the rest of the model is fitted to their exact features: moving
# them perturbs every input the policy reads (the merger, Qwen-VL's projector, still trains)
freeze_vision = True
grad_clip = 1.0
eval_interval = 20
eval_sampled = True  # also score one rollout-temperature sample per held-out prompt, at the start and the end
save_interval = 30
log_interval = 1
resume = False
# -----------------------------------------------------------------------------


def group_advantages(rewards, scale=True, eps=1e-4):
    """rewards [P, G] -> advantages [P, G]: r - group mean, divided by the group std (unbiased=False) unless
    scale=False. A group whose rewards are all equal gets 0 everywhere: it carries no signal."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.float()


def grpo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, loss_norm="token", ref_logp=None, beta=0.0,
              num_tokens=None, num_sequences=None):
    """Clipped-ratio GRPO objective, negated. logp/old_logp/ref_logp/mask [N, T], advantages [N].
    loss_norm "token": sum of per-token losses / num_tokens (the global count; default mask.sum());
    "sequence": sum over sequences of their token mean / num_sequences (default N).
    Returns (loss, stats) with the fraction of tokens whose ratio was clipped."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if beta > 0:  # k3 estimator of KL(pi || ref) (Schulman 2020)
        per_token = per_token + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    if loss_norm == "token":
        loss = (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum())
    elif loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (num_sequences or len(mask))
    else:
        raise ValueError(f"loss_norm={loss_norm!r}: expected 'token' or 'sequence'")
    clip_frac = (((clipped < unclipped).float() * mask).sum() / mask.sum().clamp(min=1)).item()
    return loss, dict(clip_frac=clip_frac)


def completion_mask(completions, eos_id):
    """1 on generated tokens up to and including the first <|im_end|>, 0 on the padding after it."""
    is_eos = (completions == eos_id).long()
    return (is_eos.cumsum(1) - is_eos == 0).long()


def main():
    config = configure(globals())
    rank, local_rank, world_size, device = setup_distributed()
    ddp, master = world_size > 1, rank == 0
    torch.manual_seed(seed + rank)  # sampling differs per rank; the data order does not
    if rollout_batch % update_batch or update_batch % world_size:
        raise ValueError(f"rollout_batch={rollout_batch} must be a multiple of update_batch={update_batch}, "
                         f"which must be a multiple of the number of processes ({world_size})")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # ---- the SFT checkpoint: backbone, FAST tokenizer, normalization ----
    if master:
        recover_checkpoint(out_dir)
    state_path = os.path.join(out_dir, "train_state.pt")
    if resume and not os.path.isfile(state_path):
        raise FileNotFoundError(f"--resume: {state_path} not found")
    source = out_dir if resume else init_from
    for name in ("config.json", "fast_tokenizer.json", "norm_stats.json"):
        if not os.path.isfile(os.path.join(source, name)):
            raise FileNotFoundError(f"init_from={source!r}: {name} not found; align_rl.py starts from a stage-1 "
                                    "checkpoint: run `python sft.py` first")
    backbone = Backbone.from_pretrained(source, dtype=getattr(torch, dtype)).to(device)
    fast = FastTokenizer.load(os.path.join(source, "fast_tokenizer.json"))
    norm_stats = NormStats.load(os.path.join(source, "norm_stats.json"))
    reference = None
    if beta > 0:
        reference = Backbone.from_pretrained(init_from, dtype=getattr(torch, dtype)).to(device).requires_grad_(False).eval()

    # ---- prompts: a seeded subset of the demonstrations (PAPER.md: 12.8K) and held-out ones ----
    if data_dir == "out/data":
        ensure_synthetic_dataset(data_dir, seed=0, rank=rank)
    path = lambda p: p.format(data_dir=data_dir)
    robot_kwargs = dict(flip_images=flip_images) if robot_data == "libero" else {}
    train_set = open_robot_dataset(robot_data, path(robot_train), fast.horizon, **robot_kwargs)
    val_set = open_robot_dataset(robot_data, path(robot_val), fast.horizon, **robot_kwargs) if robot_val else None
    prompt_ids = np.sort(np.random.default_rng(seed).permutation(len(train_set))[:num_prompts]).tolist()
    # the same held-out prompts whatever the seed, so runs with different seeds are compared on one set
    eval_ids = np.sort(np.random.default_rng(1).permutation(len(val_set))[:num_eval_prompts]).tolist() if val_set else []

    if freeze_vision:
        backbone.freeze_vision_blocks()
    model = backbone.model
    model.train()
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), fused=device.type == "cuda")
    step = 0
    if resume:
        train_state = torch.load(state_path, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(train_state["optimizer"])
        set_rng_state(train_state["rng"])
        step = train_state["step"]
    elif master and os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        os.remove(os.path.join(out_dir, "metrics.jsonl"))
    logger = MetricsLogger(os.path.join(out_dir, "metrics.jsonl"), enabled=master, resume_step=step if resume else None)
    if master:
        print(f"backbone {source}: {sum(p.numel() for p in params) / 1e6:.2f}M trained params; {len(prompt_ids)} RL prompts, "
              f"{len(eval_ids)} held-out; G={group_size}; {world_size} process(es) on {device}")

    def all_sum(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()

    def rewards_of(completions, targets):
        """(reward, r_format, r_action) per completion, targets repeated per sample."""
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
        return np.array(out, dtype=np.float64)

    def prompt_inputs(samples, repeat):
        return backbone.build_inputs([s["images"] for s in samples for _ in range(repeat)],
                                     [prompt_template.format(instruction=s["instruction"]) for s in samples for _ in range(repeat)])

    def sequence_logp(module, inputs, completions, with_entropy=False):
        """Per-token log-probs [N, C] of the completions after their (left-padded) prompts, their mask, and
        (with_entropy) the policy's per-token entropy [N, C], detached."""
        P = inputs["input_ids"].shape[1]
        mask = completion_mask(completions, backbone.eos_id)
        full = dict(backbone._model_inputs(inputs))
        full["input_ids"] = torch.cat([full["input_ids"], completions.to(device)], 1)
        full["attention_mask"] = torch.cat([full["attention_mask"], mask.to(device)], 1)
        full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(completions).to(device)], 1)
        with autocast:
            logits = module(**full, use_cache=False).logits[:, P - 1:-1].float()
        logprobs = torch.log_softmax(logits, -1)
        logp = logprobs.gather(-1, completions.to(device)[..., None])[..., 0]
        if not with_entropy:
            return logp, mask.to(device)
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
        return logp, mask.to(device), entropy

    def sample_completions(samples, inputs, keys, step):
        """G sampled completions per prompt [len(samples) * G, C]. sample_per_prompt: each prompt's group comes
        from its own generate call seeded by (seed, step, prompt id), so the samples depend neither on the world
        size nor on which prompts share a batch (what the 1-vs-2-process test needs); otherwise one batched call."""
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)
        if not sample_per_prompt:
            return backbone.generate(inputs, **kwargs)
        groups = []
        for sample, key in zip(samples, keys):
            torch.manual_seed(int(np.random.default_rng([seed, step, key]).integers(2 ** 62)))
            groups.append(backbone.generate(prompt_inputs([sample], group_size), **kwargs))
        # a group shorter than another ended on <|im_end|> in every row, so padding it keeps the masks right
        width = max(g.shape[1] for g in groups)
        return torch.cat([torch.nn.functional.pad(g, (0, width - g.shape[1]), value=backbone.pad_id) for g in groups])

    @torch.no_grad()
    def evaluate(sampled=False):
        """Held-out prompts answered greedily: eval_reward, eval_reward_format, eval_reward_action; sampled=True:
        one answer per prompt sampled as in the rollouts (eval_sampled_*), the policy GRPO actually optimizes.
        The samples draw on their own seeded generator, so evaluating does not move the training RNG."""
        backbone.model.eval()
        sums = np.zeros(4)
        mine = eval_ids[rank::world_size]
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sampled else {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(10_000 + rank)
            for k in range(0, len(mine), eval_batch_size):
                samples = [val_set[i] for i in mine[k:k + eval_batch_size]]
                with autocast:
                    completions = backbone.generate(prompt_inputs(samples, 1), max_new_tokens=max_new_tokens, **kwargs)
                r = rewards_of(completions, [fast_target(s, fast, norm_stats) for s in samples])
                sums += np.concatenate([r.sum(0), [len(samples)]])
        sums = np.array(all_sum(*sums))
        backbone.model.train()
        prefix = "eval_sampled_" if sampled else "eval_"
        return {prefix + k: v for k, v in zip(("reward", "reward_format", "reward_action"), np.round(sums[:3] / max(sums[3], 1), 5).tolist())}

    def checkpoint(step):
        def write(tmp):
            backbone.save_pretrained(tmp)
            for name in ("fast_tokenizer.json", "norm_stats.json"):
                shutil.copy(os.path.join(init_from, name), os.path.join(tmp, name))
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(config, f, indent=1)
            torch.save(dict(step=step, optimizer=optimizer.state_dict(), rng=rng_state(), config=config),
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
    bar = tqdm(total=max_iters, initial=step, disable=not master, desc="align_rl", dynamic_ncols=True)
    per_rank_update = update_batch // world_size
    while step < max_iters:
        t0 = time.time()
        # ---- rollouts: G samples per prompt, old log-probs recorded at sampling time ----
        # optimizer step j uses the global prompts rollout[j*U:(j+1)*U], split over ranks: the same prompts per
        # step as one process, whatever the world size
        rollout = global_batch_indices(step, len(prompt_ids), rollout_batch, seed)
        batches, gen_tokens, gen_time = [], 0, 0.0
        for j in range(0, rollout_batch, update_batch):
            mine = [prompt_ids[i] for i in rollout[j:j + update_batch][rank * per_rank_update:(rank + 1) * per_rank_update]]
            samples = [train_set[i] for i in mine]
            inputs = prompt_inputs(samples, group_size)
            backbone.model.eval()
            t_gen = time.time()
            with torch.no_grad(), autocast:
                completions = sample_completions(samples, inputs, mine, step)
                gen_time += time.time() - t_gen
                old_logp, mask = sequence_logp(backbone.model, inputs, completions)
                ref_logp = sequence_logp(reference.model, inputs, completions)[0] if reference is not None else None
            backbone.model.train()
            targets = [fast_target(s, fast, norm_stats) for s in samples for _ in range(group_size)]
            r = rewards_of(completions, targets)
            adv = group_advantages(r[:, 0].reshape(-1, group_size), scale=scale_rewards).reshape(-1).to(device)
            group_std = r[:, 0].reshape(-1, group_size).std(1)
            gen_tokens += int(mask.sum())
            batches.append(dict(inputs=inputs, completions=completions, old_logp=old_logp, mask=mask, ref_logp=ref_logp,
                                adv=adv, rewards=r, zero_var=int((group_std == 0).sum()), group_std=float(group_std.sum())))
        # ---- GRPO updates: rollout_batch / update_batch optimizer steps over the rollout ----
        clip_fracs, losses, grad_norms, kl_sum, entropy_sum = [], [], [], 0.0, 0.0
        for b in batches:
            num_tokens, num_sequences = all_sum(b["mask"].sum().item(), len(b["mask"]))
            logp, _, entropy = sequence_logp(model, b["inputs"], b["completions"], with_entropy=True)
            loss, stats = grpo_loss(logp, b["old_logp"], b["adv"], b["mask"], eps_low, eps_high, loss_norm,
                                    b["ref_logp"], beta, num_tokens=num_tokens, num_sequences=num_sequences)
            (loss * world_size).backward()  # DDP averages gradients over processes; the normalization is global
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # k3 estimate of KL(sampling policy || policy before this step), unbiased for
                log_ratio = (logp.detach() - b["old_logp"]) * b["mask"]  # tokens sampled from the former (Schulman)
                kl_sum += float((torch.exp(log_ratio) - log_ratio - 1).mul(b["mask"]).sum())
                entropy_sum += float((entropy * b["mask"]).sum())
            clip_fracs.append(stats["clip_frac"])
            losses.append(loss.item() * world_size)
        step += 1
        r = np.concatenate([b["rewards"] for b in batches])
        tot = all_sum(*r.sum(0), len(r), sum(b["zero_var"] for b in batches), sum(b["mask"].sum().item() for b in batches),
                      float(np.mean(clip_fracs)), float(np.mean(losses)), sum(b["group_std"] for b in batches), kl_sum,
                      entropy_sum, gen_tokens / max(gen_time, 1e-9))
        n, n_tokens = tot[3], tot[5]
        metrics = dict(reward=tot[0] / n, reward_format=tot[1] / n, reward_action=tot[2] / n,
                       reward_std=tot[8] / (n / group_size), zero_var_groups=int(tot[4]),
                       zero_var_frac=tot[4] / (n / group_size), response_len=n_tokens / n, clip_frac=tot[6] / world_size,
                       approx_kl=tot[9] / n_tokens, entropy=tot[10] / n_tokens, gen_tokens_per_s=tot[11],
                       grad_norm=float(np.mean(grad_norms)), loss=tot[7] / world_size, lr=lr)
        logger.log(step=step, **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if master and step % log_interval == 0:
            tqdm.write(f"step {step}/{max_iters} | reward {metrics['reward']:.3f} (format {metrics['reward_format']:.2f}, "
                       f"action {metrics['reward_action']:.3f}) | zero-var groups {metrics['zero_var_groups']} | "
                       f"len {metrics['response_len']:.1f} | {time.time() - t0:.1f} s")
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

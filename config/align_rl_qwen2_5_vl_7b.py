# Stage 2, the paper's recipe on the stage-1 Qwen2.5-VL-7B checkpoint, 8 GPUs of 80 GB:
#   torchrun --nproc_per_node=8 align_rl.py config/align_rl_qwen2_5_vl_7b.py
# From the paper (arXiv 2603.21341, stage 2): 12.8K prompts (0.56% of the SFT data), G = 5, rollout batch 512
# prompts, update batch 128, constant lr 1e-6, all parameters trained, one epoch: 12_800 / 512 = 25 rollout steps
# of 4 optimizer steps each. The paper trained with EasyR1; what it leaves open takes EasyR1's defaults
# (hiyouga/EasyR1 examples/config.yaml): KL loss low_var_kl with coefficient 1e-2, AdamW betas (0.9, 0.999)
# and weight decay 1e-2, responses up to 2048 tokens, temperature 1.0, gradient clipping 1.0, log-probs at the
# rollout temperature. The clip range is the paper's (0.2 both ways; EasyR1's default clip_ratio_high is 0.3).
out_dir = "out/align_rl"
init_from = "out/sft"
# memory (bench/memory.py): FSDP2 shards fp32 master weights, gradients and AdamW state over the 8 GPUs, bf16
# compute; each decoder layer is recomputed in backward; log-probs in micro-batches of two groups
dtype = "bfloat16"
master_dtype = "float32"
fsdp = True
gradient_checkpointing = True
micro_batch_size = 10  # sequences per forward / backward: two groups (prompt ~ 2 images + 100 tokens, 2048 new)
generation_batch = 16  # prompts per sampling call: 80 sequences of KV cache
image_size = 224  # the stage-1 checkpoint's (checked)
robot_data = "libero"  # BridgeData V2 as in the paper: the files prepare/bridge.py writes (config/sft_bridge_qwen2_5_vl_7b.py)
robot_train = ",".join(f"/data/LIBERO/datasets/{suite}" for suite in
                       ("libero_spatial", "libero_object", "libero_goal", "libero_10"))
robot_val = ""
flip_images = True
num_prompts = 12_800
num_eval_prompts = 0
group_size = 5
rollout_batch = 512
update_batch = 128
temperature = 1.0
top_p = 1.0  # log-probs are of the untruncated distribution (align_rl.py docstring): keep 1.0
max_new_tokens = 2048
advantage = "grpo"
loss_norm = "token"
beta = 1e-2
kl_estimator = "low_var_kl"
lr = 1e-6
betas = (0.9, 0.999)
weight_decay = 1e-2
grad_clip = 1.0
freeze_vision = False  # the paper: all parameters trained in stage 2
max_iters = 25
eval_interval = 5
save_interval = 5

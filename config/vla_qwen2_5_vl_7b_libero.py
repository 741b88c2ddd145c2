# Stage 3, the paper's recipe (arXiv 2603.21341 stage 3): the aligned Qwen2.5-VL-7B frozen, layer 18 of 28 feeding a
# new flow-matching DiT head (GR00T N1.5), trained on LIBERO, 60K steps, batch 32, horizon 16, 8 GPUs:
#   torchrun --nproc_per_node=8 train_vla.py config/vla_qwen2_5_vl_7b_libero.py
# Baseline with the SFT-only backbone, same budget: add --init_from=out/sft --out_dir=out/vla_sft
out_dir = "out/vla"
init_from = "out/align_rl"
dtype = "bfloat16"  # the frozen backbone in bf16 (16.6 GB) fits every GPU; --fsdp=True shards it
layer = 18
image_size = 224  # the backbone checkpoint's (checked); saved in vla.json, applied by eval_libero.py
robot_data = "libero"
robot_train = ",".join(f"/data/LIBERO/datasets/{suite}" for suite in
                       ("libero_spatial", "libero_object", "libero_goal", "libero_10"))
robot_val = ""  # held-out demos for val_action_mse ("" = none)
flip_images = True  # LIBERO's files store upside-down renders; eval_libero.py flips the live ones the same way
action_horizon = 16
# GR00T N1.5's head: DiT width 1024 (here 512 keeps it light on top of a frozen 7B), 16 layers, 32 heads
head_width = 512
head_depth = 16
head_heads = 8
head_self_attention = True  # GR00T N1.5's alternating cross / self-attention DiT
num_future_tokens = 32
num_vl_self_attn_layers = 4
head_dropout = 0.2  # GR00T N1.5's DiT dropout
# the frozen backbone's layer-18 features, cached once (tokens x 3584 x 2 bytes per frame in bf16)
feature_cache = True
cache_dtype = "bfloat16"  # half the disk of float32 (features then differ from on-the-fly ones by rounding)
cache_in_memory = False
cache_batch_size = 16
batch_size = 4  # per GPU: global 32 = 4 x 8
gradient_accumulation_steps = 8
max_iters = 60_000
lr = 1e-4
min_lr = 1e-5
warmup_frac = 0.05
betas = (0.95, 0.999)  # GR00T N1.5's fine-tuning AdamW
ema_decay = 0.999
eval_interval = 5000
save_interval = 5000
log_interval = 100

# Stage 3 on CALVIN ABC -> D (arXiv 2603.21341 stage 3: 100K steps, batch 32): train on scenes A, B, C, evaluate
# in D with eval_calvin.py (config/calvin_abc_d.py --checkpoint=out/vla_calvin).
#   torchrun --nproc_per_node=8 train_vla.py config/vla_calvin.py
out_dir = "out/vla_calvin"
init_from = "out/align_rl"
dtype = "bfloat16"  # the frozen backbone in bf16 (16.6 GB) fits every GPU; --fsdp=True shards it
layer = 18
image_size = 224  # the backbone checkpoint's (checked): CALVIN's 200x200 static and 84x84 wrist frames both go in at 224
robot_data = "calvin"  # lang-annotated windows of task_ABC_D/training; rel_actions keep CALVIN's +1 = open gripper
robot_train = "/data/calvin/task_ABC_D/training"
robot_val = "/data/calvin/task_ABC_D/validation"
action_horizon = 16
head_width = 512
head_depth = 16
head_heads = 8
head_self_attention = True  # GR00T N1.5's alternating cross / self-attention DiT
num_future_tokens = 32
num_vl_self_attn_layers = 4
head_dropout = 0.2  # GR00T N1.5's DiT dropout
clip_actions = True  # CALVIN's rel_actions are clipped to [-1, 1] (calvin_env utils.to_relative_action)
feature_cache = True
cache_dtype = "bfloat16"  # half the disk of float32 (features then differ from on-the-fly ones by rounding)
cache_in_memory = False
batch_size = 4
gradient_accumulation_steps = 8
max_iters = 100_000
lr = 1e-4
min_lr = 1e-5
ema_decay = 0.999
eval_interval = 5000
save_interval = 5000

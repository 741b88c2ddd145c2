# Stage 2, the paper's recipe (PAPER.md "Stage 2") on the stage-1 Qwen2.5-VL-7B checkpoint, 8 GPUs:
#   torchrun --nproc_per_node=8 align_rl.py config/align_rl_qwen2_5_vl_7b.py
# 12.8K prompts (0.56% of the SFT data), G = 5, rollout batch 512 prompts, update batch 128, constant lr 1e-6,
# one epoch: 12_800 / 512 = 25 rollout steps of 4 optimizer steps each. Not given by the paper (open): KL
# coefficient (0 here), temperature (1.0), maximum response length (256 here).
out_dir = "out/align_rl"
init_from = "out/sft"
dtype = "bfloat16"
robot_data = "libero"  # or "bridge" as in the paper (data.open_bridge_dataset; see config/sft_bridge_qwen2_5_vl_7b.py)
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
top_p = 1.0
max_new_tokens = 256
lr = 1e-6
freeze_vision = False  # PAPER.md: all parameters trained in stage 2
beta = 0.0
max_iters = 25
eval_interval = 5
save_interval = 5

# Stage 2 on the stage-1 Qwen3-VL-8B checkpoint: the 7B recipe with another backbone. After it:
#   torchrun --nproc_per_node=8 align_rl.py config/align_rl_qwen2_5_vl_7b.py config/align_rl_qwen3_vl_8b.py
init_from = "out/sft_qwen3_vl_8b"
out_dir = "out/align_rl_qwen3_vl_8b"

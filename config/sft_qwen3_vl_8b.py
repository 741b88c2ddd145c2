# Stage 1 on Qwen3-VL-8B-Instruct (the paper's second backbone): the 7B recipe with another backbone. After it:
#   torchrun --nproc_per_node=8 sft.py config/sft_qwen2_5_vl_7b_libero.py config/sft_qwen3_vl_8b.py
init_from = "Qwen/Qwen3-VL-8B-Instruct"
out_dir = "out/sft_qwen3_vl_8b"
max_pixels = 256 * 32 * 32  # Qwen3-VL merges 2x2 patches of 16 pixels: 32 x 32 pixels per visual token

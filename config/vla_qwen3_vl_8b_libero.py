# Stage 3 on the aligned Qwen3-VL-8B: the 7B recipe with another backbone. After it:
#   torchrun --nproc_per_node=8 train_vla.py config/vla_qwen2_5_vl_7b_libero.py config/vla_qwen3_vl_8b_libero.py
init_from = "out/align_rl_qwen3_vl_8b"
out_dir = "out/vla_qwen3_vl_8b"
# the paper gives the layer for the 7B only (18 of 28, about two thirds); two thirds of Qwen3-VL-8B's 36 layers
layer = 24

# Stage 1 SFT, the paper's recipe (arXiv 2603.21341 stage 1) on Qwen2.5-VL-7B-Instruct with LIBERO actions, 8 GPUs:
#   torchrun --nproc_per_node=8 sft.py config/sft_qwen2_5_vl_7b_libero.py
# Edit the data paths below first. Keys not set here keep sft.py's defaults.
out_dir = "out/sft"
init_from = "Qwen/Qwen2.5-VL-7B-Instruct"
# memory (bench/memory.py): FSDP2 shards fp32 master weights, gradients and AdamW state over the 8 GPUs; bf16
# compute; each decoder layer recomputed in backward; at most 256 visual tokens per image, 2048 tokens per sample
dtype = "bfloat16"
master_dtype = "float32"
fsdp = True
max_pixels = 256 * 28 * 28
max_seq_len = 2048
image_size = 224  # every image resized and padded to 224 x 224 (openpi's LIBERO rule), training and evaluation

# data (placeholders: your files). VQA and reasoning: LLaVA-style json / jsonl, images relative to image_root.
data_dir = "/data/roboalign"
vqa_train = "{data_dir}/vqa_train.json"  # general + embodied VQA
vqa_val = ""  # "" = no held-out VQA loss
reasoning_train = "{data_dir}/reasoning_train.json"  # answers <think>...</think><answer>...</answer>
reasoning_val = "{data_dir}/reasoning_val.json"
image_root = "{data_dir}/images"
robot_data = "libero"
# official LIBERO hdf5 files (one per task), comma-separated dirs / files / globs
robot_train = ",".join(f"/data/LIBERO/datasets/{suite}" for suite in
                       ("libero_spatial", "libero_object", "libero_goal", "libero_10"))
robot_val = ""  # held-out demos (files you kept out of robot_train) give action_exact / action_prefix
flip_images = True  # LIBERO's files store upside-down renders; eval_libero.py flips the live ones the same way

# mixture: the paper has 1.88M QA samples (VQA + reasoning; the split is not given) and 400K action samples
vqa_weight = 0.66
reasoning_weight = 0.16
action_weight = 0.18
think_action_weight = 0.0  # a 7B follows REASONING_ACTION_PROMPT zero-shot; the tiny recipe needs the hint

# FAST (arXiv 2603.21341 stage 0): 2048 BPE tokens; chunk length is open, openpi's pi0-FAST LIBERO uses 10 steps
action_horizon = 10
fast_vocab_size = 2048
fast_scale = 10.0

# optimization: lr 2e-5, cosine, warm-up 3%, 1 epoch (arXiv 2603.21341); the global batch is not given (open)
batch_size = 4  # per GPU
gradient_accumulation_steps = 32  # over the 8 GPUs: global batch 4 * 32 = 128
max_iters = (1_880_000 + 400_000) // 128  # one epoch over the paper's 2.28M samples (set from your data)
lr = 2e-5
min_lr = 0.0
warmup_frac = 0.03
weight_decay = 0.0
beta2 = 0.999
freeze_vision = True
gradient_checkpointing = True

eval_interval = 1000
eval_iters = 20
eval_action_samples = 512
eval_reasoning_samples = 256
save_interval = 1000
log_interval = 10

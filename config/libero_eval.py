# LIBERO (arXiv 2603.21341, evaluation): the four standard suites, 50 trials per task from the fixed initial states,
# the official protocol (see eval_libero.py). A GPU-node job: ~2000 episodes of up to 230-530 steps at
# CPU env steps at 256 x 256. Usage:
#   python eval_libero.py config/libero_eval.py --checkpoint=out/vla
# Add libero_90 to `suites` for LIBERO-90. Keep batch_size fixed when comparing runs (num_envs is free).
checkpoint = "out/vla"
suites = "libero_spatial,libero_object,libero_goal,libero_10"
task_ids = ""
trials = 50
max_steps = 0  # each suite's own: 220 / 280 / 300 / 520 (400 for libero_90)
replan_steps = 5  # openpi's LIBERO value; the paper does not state it
num_envs = 32  # env worker processes: one CPU core each
batch_size = 32  # episodes in lockstep = the policy's batch
device = "cuda"
seed = 7
videos_per_task = 0
out_dir = "out/eval_libero"

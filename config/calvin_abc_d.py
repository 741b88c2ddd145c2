# CALVIN ABC->D (arXiv 2603.21341, evaluation): the VLA trained on scenes A, B, C plays the official 1000 chains of
# 5 subtasks in scene D (<dataset_path>/validation). Usage:
#   python eval_calvin.py config/calvin_abc_d.py --checkpoint=out/vla_calvin --dataset_path=/data/calvin/task_ABC_D
# For a smoke run keep the official chain list and play its first chains: --debug_num_chains=20
# (a small --num_sequences instead draws chains only from the first few initial conditions).
checkpoint = "out/vla"
dataset_path = "data/calvin/task_ABC_D"
scene = ""  # the scene of validation/.hydra/merged_config.yaml, i.e. D
num_sequences = 1000
ep_len = 360
replan_steps = 5  # of the head's 16-step chunk; the paper does not state it (openpi's LIBERO value)
gripper_convention = "calvin"  # the head was trained on CALVIN rel_actions (+1 = open)
num_workers = 4  # each worker holds one PyBullet env and one copy of the policy
device = "cuda"
out_dir = "out/eval_calvin_abc_d"
seed = 0

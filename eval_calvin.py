"""
Closed-loop CALVIN evaluation of a VLA checkpoint (arXiv 2603.21341, evaluation: CALVIN ABC->D, 1000 chains of
5 language-conditioned subtasks in scene D; success rate of completing 1..5 in a row, and average length).

It follows the official protocol of mees/calvin `calvin_models/calvin_agent/evaluation/evaluate_policy.py`
(mees/calvin calvin_models/calvin_agent/evaluation/evaluate_policy.py):
  - the chains are calvin_agent's `get_sequences(num_sequences)` (reimplemented below, reproducing the same
    chains for the same seed; calvin_agent's own function is used when it is importable), generated once and
    cached in `chains_cache` with their sha256 (the official 1000 are checked against their known checksum),
  - each chain starts from its initial state, gripper open: calvin_env's reset leaves the last gripper command in
    robot_obs[14], which reset_env sets back, so a chain's result does not depend on what its worker played before,
  - actions go to env.step unclipped, as in the official loop, unless the checkpoint was trained on clipped
    actions (vla.json clip_actions, set by train_vla.py's clip_actions for CALVIN's clipped rel_actions),
  - the env is reset once per chain to the chain's initial condition; the robot is not reset between subtasks,
  - each subtask gets `ep_len` (360) steps, its one fixed validation instruction, a fresh action-chunk buffer,
  - a subtask succeeds as soon as the task oracle `get_task_info_for_set(start_info, info, {subtask})`
    reports it; the chain stops at its first failure,
  - avg length = mean number of consecutive successes; chain_sr[i] = fraction of chains with >= i successes.

Usage:
  python eval_calvin.py config/calvin_abc_d.py --checkpoint=out/vla --dataset_path=/data/calvin/task_ABC_D
  python eval_calvin.py config/calvin_abc_d.py --num_workers=4 --debug_num_chains=20   # smoke run

Needs calvin_env (GitHub, not PyPI): see _INSTALL_HELP below. Chains run in `num_workers` processes; each
worker owns one env and one copy of the policy and plays whole chains, each chain seeded with seed + its
index, so the results do not depend on the number of workers (see `evaluate`).
"""

import functools
import hashlib
import json
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import permutations, product
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config (nanoGPT style: module-level defaults, overridden by config files and --key=value)
checkpoint = "out/vla"  # a VLA.save() directory (vla.json, action_head.safetensors, norm_stats.json)
backbone = ""  # "" = the backbone checkpoint vla.json names; a directory overrides it (e.g. for a copied out/ tree)
dataset_path = "data/calvin/task_ABC_D"  # CALVIN root; the env is built from <dataset_path>/validation (scene D)
scene = ""  # "" = the scene of validation/.hydra/merged_config.yaml; else a calvin_env conf/scene name
num_sequences = 1000  # get_sequences(n) (official: 1000); a small n draws from the first n initial conditions only
ep_len = 360  # env steps per subtask (official EP_LEN)
replan_steps = 5  # execute the first k of the H predicted actions, then re-plan (openpi LIBERO uses 5)
gripper_convention = "calvin"  # "calvin": policy outputs rel_actions with +1 = open (CALVIN's own);
#                                "libero": +1 = close (LIBERO's convention) -> negated before env.step
num_workers = 1  # processes, each with its own env and policy copy
torch_threads = 1  # torch threads per worker for the policy (1: workers do not compete for cores); 0 = torch's
chains_cache = "out/calvin_chains"  # the generated chains are written here once (with their sha256) and read back
device = "cpu"  # policy device in every worker
out_dir = "out/eval_calvin"
seed = 0  # chain i is played with seed + i (torch / numpy / random)
debug = False  # print every chain's subtasks and outcome
debug_num_chains = 0  # > 0: play only the first n of the generated chains (a smoke run, not a benchmark number)
# -----------------------------------------------------------------------------

_INSTALL_HELP = """\
CALVIN's simulator (calvin_env, PyBullet) is not on PyPI. Install it from a git checkout:
  git clone --recurse-submodules https://github.com/mees/calvin.git
  cd calvin/calvin_env/tacto && pip install -e . && cd .. && pip install -e .
(calvin_env reads its own git hash, so keep it a git checkout.) calvin_models is optional (this script then
uses calvin_agent's own get_sequences); it pins torch==1.13.1, so install it only in a separate venv:
  cd calvin && sh install.sh
Data: cd calvin/dataset && sh download_data.sh ABC   (task_ABC_D; validation/ is scene D)"""

# The 34 subtasks and their one validation instruction each, from mees/calvin
# calvin_models/conf/annotations/new_playtable_validation.yaml (evaluate_policy uses val_annotations[task][0]).
_COLORS = ("red", "blue", "pink")
VALIDATION_INSTRUCTIONS = {
    **{f"rotate_{c}_block_{side}": f"take the {c} block and rotate it to the {side}" for c in _COLORS for side in ("right", "left")},
    **{f"push_{c}_block_{side}": f"go push the {c} block {side}" for c in _COLORS for side in ("right", "left")},
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    **{f"lift_{c}_block_table": f"grasp and lift the {c} block" for c in _COLORS},
    **{f"lift_{c}_block_slider": f"lift the {c} block from the sliding cabinet" for c in _COLORS},
    **{f"lift_{c}_block_drawer": f"Take the {c} block from the drawer" for c in _COLORS},
    "place_in_slider": "store the grasped block in the sliding cabinet",
    "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer",
    "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block",
    "turn_on_lightbulb": "use the switch to turn on the light bulb",
    "turn_off_lightbulb": "use the switch to turn off the light bulb",
    "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}

# -----------------------------------------------------------------------------
# The evaluation chains. calvin_agent/evaluation/multistep_sequences.py keeps a symbolic world model
# (each task = a category + alternative (condition, effect) pairs over a discrete scene state) and samples
# chains of 5 tasks that are feasible in it. The ORDER of the task dict matters: it is the population of
# np.random.choice. Built here by loops that produce that same order and the same conditions/effects.


def _symbolic_tasks():
    """{task: (category, [(condition, effect), ...])}; a condition value that is a tuple means 'one of'."""
    tasks = {}
    for verb in ("rotate", "push"):  # category 1: the block stays on the table
        for c in _COLORS:
            for side in ("right", "left"):
                tasks[f"{verb}_{c}_block_{side}"] = (1, [({f"{c}_block": "table", "grasped": 0}, {f"{c}_block": "table"})])
    tasks["move_slider_left"] = (2, [({"slider": "right", "grasped": 0}, {"slider": "left"})])
    tasks["move_slider_right"] = (2, [({"slider": "left", "grasped": 0}, {"slider": "right"})])
    tasks["open_drawer"] = (3, [({"drawer": "closed", "grasped": 0}, {"drawer": "open"})])
    tasks["close_drawer"] = (3, [({"drawer": "open", "grasped": 0}, {"drawer": "closed"})])
    for c in _COLORS:
        block, lifted = f"{c}_block", {f"{c}_block": "grasped", "grasped": 1}
        tasks[f"lift_{c}_block_table"] = (4, [({block: "table", "grasped": 0}, lifted)])
        tasks[f"lift_{c}_block_slider"] = (5, [({block: "slider_left", "slider": "right", "grasped": 0}, lifted),
                                              ({block: "slider_right", "slider": "left", "grasped": 0}, lifted)])
        tasks[f"lift_{c}_block_drawer"] = (6, [({block: "drawer", "drawer": "open", "grasped": 0}, lifted)])
    # placing into the slider: the block lands on the side the sliding door does not cover
    tasks["place_in_slider"] = (7, [({f"{c}_block": "grasped", "slider": s, "grasped": 1}, {f"{c}_block": f"slider_{s}", "grasped": 0})
                                    for c in _COLORS for s in ("right", "left")])
    tasks["place_in_drawer"] = (7, [({f"{c}_block": "grasped", "drawer": "open", "grasped": 1}, {f"{c}_block": "drawer", "grasped": 0})
                                    for c in _COLORS])
    pairs = list(permutations(_COLORS, 2))  # (top, bottom): (red, blue), (red, pink), (blue, red), ...
    tasks["stack_block"] = (10, [({f"{t}_block": "grasped", f"{b}_block": "table", "grasped": 1},
                                  {f"{t}_block": "stacked_top", f"{b}_block": "stacked_bottom", "grasped": 0}) for t, b in pairs])
    tasks["unstack_block"] = (11, [({f"{t}_block": "stacked_top", f"{b}_block": "stacked_bottom", "grasped": 0},
                                    {f"{t}_block": "table", f"{b}_block": "table"}) for t, b in pairs])
    for light in ("lightbulb", "led"):
        tasks[f"turn_on_{light}"] = (8, [({light: 0, "grasped": 0}, {light: 1})])
        tasks[f"turn_off_{light}"] = (8, [({light: 1, "grasped": 0}, {light: 0})])
    on_slider = ("slider_right", "slider_left")  # push_into_drawer: the one block on the table, the others in the slider
    tasks["push_into_drawer"] = (9, [({f"{c}_block": "table", **{f"{o}_block": on_slider for o in _COLORS if o != c},
                                       "drawer": "open", "grasped": 0}, {f"{c}_block": "drawer", "grasped": 0}) for c in _COLORS])
    return tasks


SYMBOLIC_TASKS = _symbolic_tasks()
# the possible initial scene conditions, in this key order (it is hashed for the block poses, see below)
INITIAL_CONDITION_VALUES = {
    "led": [0, 1], "lightbulb": [0, 1], "slider": ["right", "left"], "drawer": ["closed", "open"],
    "red_block": ["table", "slider_right", "slider_left"], "blue_block": ["table", "slider_right", "slider_left"],
    "pink_block": ["table", "slider_right", "slider_left"], "grasped": [0],
}


def next_states(state, task):
    """The symbolic states reachable by `task` from `state` (one per (condition, effect) pair that applies)."""
    out = []
    for condition, effect in SYMBOLIC_TASKS[task][1]:
        if all(state[k] in v if isinstance(v, tuple) else state[k] == v for k, v in condition.items()):
            out.append({**state, **effect})
    return out


def is_feasible(state, sequence):
    """Every task applies unambiguously in turn, and no two tasks share a category."""
    for task in sequence:
        states = next_states(state, task)
        if len(states) != 1:
            return False
        state = states[0]
    return len({SYMBOLIC_TASKS[t][0] for t in sequence}) == len(sequence)


def initial_conditions():
    """All initial conditions: 1 or 2 blocks on the table, at most one per slider side -> 192 states."""
    states = []
    for values in product(*INITIAL_CONDITION_VALUES.values()):
        blocks = values[4:7]
        if blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2:
            states.append(dict(zip(INITIAL_CONDITION_VALUES, values)))
    return states


def sequences_for_state(state, state_index, count, seq_len=5):
    """`count` feasible chains from `state`: 5 distinct tasks drawn with np.random.seed(state_index) until feasible."""
    task_names = list(SYMBOLIC_TASKS)
    category = [SYMBOLIC_TASKS[t][0] for t in task_names]
    rng = np.random.RandomState(state_index)  # the legacy global RNG after np.random.seed(state_index)
    found = []
    while len(found) < count:
        # == rng.choice(task_names, seq_len, replace=False), which is permutation(n)[:size]; 4x faster
        draw = rng.permutation(len(task_names))[:seq_len].tolist()
        if len({category[j] for j in draw}) < seq_len:  # a cheap rejection first (is_feasible would reject too)
            continue
        sequence = tuple(task_names[j] for j in draw)
        if is_feasible(state, sequence):
            found.append(sequence)
    return found


def get_sequences(num_sequences=1000):
    """[(initial_condition dict, (task, ...)), ...]: the same chains as calvin_agent's get_sequences.

    The chains are split over the 192 initial conditions as np.array_split does (the first
    num_sequences % 192 get one more), each state samples its share, and the whole list is shuffled with
    seed 0. About 7M draws for 1000 chains (the official one uses a process pool); load_chains caches the result.
    """
    states = initial_conditions()
    per_state, extra = divmod(num_sequences, len(states))
    chains = []
    for i, state in enumerate(states):
        chains += [(dict(state), seq) for seq in sequences_for_state(state, i, per_state + (i < extra))]
    np.random.RandomState(0).shuffle(chains)  # calvin: np.random.shuffle under temp_seed(0)
    return chains


# sha256 of json.dumps([[list(state.items()), list(sequence)], ...]) over the official get_sequences(1000)
OFFICIAL_1000_SHA256 = "4121d62cea846bd5a80cf9309b27240dbd8b2a21a5ba02f311f39df01819e86d"


def chains_sha256(chains):
    return hashlib.sha256(json.dumps([[list(s.items()), list(q)] for s, q in chains]).encode()).hexdigest()


def load_chains(num_sequences, cache_dir, sequences_fn=get_sequences):
    """get_sequences(num_sequences), generated once (calvin_agent's own takes minutes for the official 1000) and cached as
    <cache_dir>/chains_<n>.json with its sha256; a cache whose chains do not hash to the recorded checksum, or a
    1000-chain list that is not the official one, is an error (never silently replaced)."""
    path = os.path.join(cache_dir, f"chains_{num_sequences}.json") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)
            chains = [(dict(state), tuple(sequence)) for state, sequence in stored["chains"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a chain cache written by eval_calvin.py ({e}); move it away to regenerate") from None
        digest = chains_sha256(chains)
        if digest != stored.get("sha256"):
            raise ValueError(f"{path}: its chains hash to {digest}, the file records {stored.get('sha256')}: the cache is "
                             "damaged; move it away to regenerate")
    else:
        chains = [(dict(state), tuple(sequence)) for state, sequence in sequences_fn(num_sequences)]
        digest = chains_sha256(chains)
    if num_sequences == 1000 and digest != OFFICIAL_1000_SHA256:
        raise ValueError(f"{path or 'get_sequences(1000)'}: sha256 {digest} is not the official 1000 chains' "
                         f"{OFFICIAL_1000_SHA256}")
    if path and not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"num_sequences": num_sequences, "sha256": digest, "chains": [[s, list(q)] for s, q in chains]}, f)
        os.replace(path + ".tmp", path)
    return chains


# -----------------------------------------------------------------------------
# The env state of an initial condition (calvin_agent/evaluation/utils.py::get_env_state_for_initial_condition):
# a fixed neutral robot pose, and a 24-d scene_obs (slider, drawer, button, switch, lightbulb, green light,
# red/blue/pink block xyz + euler) built from the condition; which table spot each block gets and its yaw
# are drawn from a seed hashed from the condition.

NEUTRAL_ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                              -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])
_BLOCK_SLIDER_LEFT = np.array([-2.40851662e-01, 9.24044687e-02, 4.60990009e-01])
_BLOCK_SLIDER_RIGHT = np.array([7.03416330e-02, 9.24044687e-02, 4.60990009e-01])
_BLOCK_TABLE_SPOTS = np.array([[5.00000896e-02, -1.20000177e-01, 4.59990009e-01],
                               [2.29995412e-01, -1.19995140e-01, 4.59990010e-01]])
_BLOCK_YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)


def pyhash_fnv1_32(text):
    """calvin hashes with pyhash.fnv1_32() (a C extension that no longer builds): FNV-1 32-bit with the
    hash starting at pyhash's default seed 0 (not the FNV offset basis), over the UTF-16-LE bytes of a str.
    Checked against pyhash's own test vectors (flier/pyfasthash:tests/test_fnv1.py: b'test' -> 3698262380, u'test' -> 3910690890)."""
    data = text.encode("utf-16-le") if isinstance(text, str) else bytes(text)
    h = 0
    for byte in data:
        h = ((h * 16777619) & 0xFFFFFFFF) ^ byte
    return h


def env_state_for_initial_condition(condition):
    """(robot_obs [15], scene_obs [24]) for env.reset, as calvin_agent computes them."""
    rng = np.random.RandomState(pyhash_fnv1_32(str(condition.values())))  # str of dict_values: key order matters
    table = [_BLOCK_TABLE_SPOTS[0].copy(), _BLOCK_TABLE_SPOTS[1].copy()]
    rng.shuffle(table)
    on_slider = {"slider_left": _BLOCK_SLIDER_LEFT, "slider_right": _BLOCK_SLIDER_RIGHT}
    scene_obs = np.zeros(24)
    scene_obs[0] = 0.28 if condition["slider"] == "left" else 0.0
    scene_obs[1] = 0.22 if condition["drawer"] == "open" else 0.0
    scene_obs[3] = 0.088 if condition["lightbulb"] == 1 else 0.0  # the switch position that lights the bulb
    scene_obs[4], scene_obs[5] = condition["lightbulb"], condition["led"]
    red_on_table = condition["red_block"] == "table"
    table_spot = {"red_block": table[0], "blue_block": table[1] if red_on_table else table[0], "pink_block": table[1]}
    for offset, block in ((6, "red_block"), (12, "blue_block"), (18, "pink_block")):  # red, blue, pink: the draw order
        scene_obs[offset:offset + 3] = on_slider.get(condition[block], table_spot[block])
        scene_obs[offset + 5] = rng.uniform(*_BLOCK_YAW_RANGE)
    return NEUTRAL_ROBOT_OBS.copy(), scene_obs


# -----------------------------------------------------------------------------
# The real simulator, task oracle and policy (imported lazily: CI has none of calvin's packages)


def import_calvin_env():
    try:
        import calvin_env  # noqa: F401
        from calvin_env.envs.play_table_env import get_env  # noqa: F401
        from calvin_env.envs.tasks import Tasks  # noqa: F401
    except ImportError as e:
        print(f"eval_calvin.py: cannot import calvin_env ({e}).\n{_INSTALL_HELP}", file=sys.stderr)
        sys.exit(2)
    return calvin_env


def official_protocol_functions():
    """calvin_agent's own (get_sequences, get_env_state_for_initial_condition) when installed, else ours."""
    try:
        from calvin_agent.evaluation.multistep_sequences import get_sequences as official_get_sequences
        from calvin_agent.evaluation.utils import get_env_state_for_initial_condition
        return official_get_sequences, get_env_state_for_initial_condition
    except ImportError:
        return get_sequences, env_state_for_initial_condition


def resolve_scene(scene_name, scene_dir):
    """'' -> None (the dataset's own scene); 'D' -> 'calvin_scene_D'; must be a yaml in calvin_env's conf/scene."""
    if not scene_name:
        return None
    if len(scene_name) == 1:
        scene_name = f"calvin_scene_{scene_name}"
    known = sorted(p.stem for p in Path(scene_dir).glob("*.yaml"))
    if scene_name not in known:
        raise ValueError(f"unknown scene {scene_name!r}: no {Path(scene_dir) / (scene_name + '.yaml')}; known scenes: {', '.join(known)}")
    return scene_name


def check_dataset(root):
    """get_env builds the simulator from <root>/validation/.hydra/merged_config.yaml (cameras, robot, scene)."""
    validation = Path(root) / "validation"
    if not validation.is_dir():
        raise FileNotFoundError(f"dataset_path={root!r}: no {validation} directory (expected a CALVIN split such as "
                                "task_ABC_D whose validation/ holds scene D)")
    merged_config = validation / ".hydra" / "merged_config.yaml"
    if not merged_config.is_file():
        raise FileNotFoundError(f"dataset_path={root!r}: missing {merged_config}, which calvin_env's get_env needs "
                                "to build the evaluation scene")
    return validation


def make_calvin_env(dataset_path, scene):
    """One PyBullet env of <dataset_path>/validation, rendering only the two cameras the policy sees."""
    import calvin_env
    from calvin_env.envs.play_table_env import get_env
    kwargs = {}
    if scene:
        kwargs["scene"] = resolve_scene(scene, Path(calvin_env.__file__).parents[1] / "conf" / "scene")
    obs_space = {"rgb_obs": ["rgb_static", "rgb_gripper"], "depth_obs": []}  # skip the tactile/depth renders
    return get_env(check_dataset(dataset_path), obs_space=obs_space, show_gui=False, **kwargs)


def make_calvin_oracle():
    """calvin_env's Tasks built from its conf/tasks/new_playtable_tasks.yaml (identical to calvin_models'
    conf/callbacks/rollout/tasks/new_playtable_tasks.yaml, which evaluate_policy instantiates)."""
    import calvin_env
    from calvin_env.envs.tasks import Tasks
    from omegaconf import OmegaConf
    path = Path(calvin_env.__file__).parents[1] / "conf" / "tasks" / "new_playtable_tasks.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install calvin_env from a git checkout (pip install -e calvin_env)")
    return Tasks(OmegaConf.load(path).tasks)


def load_vla(checkpoint_dir, device_name, backbone_path=""):
    from model import VLA
    if not os.path.isfile(os.path.join(checkpoint_dir, "vla.json")):
        raise FileNotFoundError(f"checkpoint={checkpoint_dir!r}: no vla.json (expected a VLA.save() directory, e.g. out/vla)")
    return VLA.load(checkpoint_dir, device=device_name, backbone_path=backbone_path or None)


def check_policy(policy, checkpoint_dir, k):
    """CALVIN needs 7-D rel_actions from the 15-D robot_obs; the chunk must be at least replan_steps long."""
    if policy.action_dim != 7:
        raise ValueError(f"checkpoint {checkpoint_dir!r}: action_dim={policy.action_dim}, but CALVIN's env takes 7-D "
                         "rel_actions [dx, dy, dz, drx, dry, drz, gripper]")
    if policy.state_dim != 15:
        raise ValueError(f"checkpoint {checkpoint_dir!r}: state_dim={policy.state_dim}, but CALVIN's robot_obs is 15-D "
                         "(tcp pos 3, tcp euler 3, gripper width 1, arm joints 7, gripper action 1)")
    if not 1 <= k <= policy.horizon:
        raise ValueError(f"replan_steps={k} must be in [1, horizon={policy.horizon}] of checkpoint {checkpoint_dir!r}")
    return policy


# -----------------------------------------------------------------------------
# One chain


def policy_inputs(obs):
    """CALVIN obs -> the VLA inputs: [third-person, wrist] uint8 images and the 15-d robot_obs."""
    try:
        images = [obs["rgb_obs"]["rgb_static"], obs["rgb_obs"]["rgb_gripper"]]
    except KeyError as e:
        raise KeyError(f"env observation lacks obs['rgb_obs'][{e}]: the env must render the static and gripper "
                       "cameras (see validation/.hydra/merged_config.yaml 'cameras')") from None
    return images, np.asarray(obs["robot_obs"], dtype=np.float32)


def to_env_action(action, convention, clip=False):
    """A predicted action in rel_actions units -> what env.step takes: the gripper binarized to -1/+1 as
    calvin_agent's CalvinEnvWrapper does (CALVIN: +1 = open, -1 = close). The relative part goes as predicted,
    as in the official evaluation; clip=True (a checkpoint trained on clipped actions, VLA.clip_actions) clips it
    to [-1, 1] like its training data."""
    action = np.asarray(action, dtype=np.float64).copy()
    if convention == "libero":
        action[6] = -action[6]
    if clip:
        action[:6] = np.clip(action[:6], -1.0, 1.0)
    action[6] = 1.0 if action[6] > 0 else -1.0
    return action


def rollout_subtask(env, oracle, policy, subtask, cfg):
    """Up to ep_len steps on one subtask; True as soon as the oracle reports it. Action chunking: predict H
    actions, execute the first replan_steps, re-plan. The chunk buffer starts empty for every subtask (the
    official loop calls model.reset() per subtask)."""
    instruction = VALIDATION_INSTRUCTIONS[subtask]
    if hasattr(policy, "reset"):
        policy.reset()
    obs = env.get_obs()
    start_info = env.get_info()
    planned = []
    for _ in range(cfg["ep_len"]):
        if not planned:
            images, state = policy_inputs(obs)
            chunk = policy.predict_action_batch([images], [instruction], state[None])[0]
            planned = list(chunk[:cfg["replan_steps"]])
        obs, _, _, info = env.step(to_env_action(planned.pop(0), cfg["gripper_convention"], getattr(policy, "clip_actions", False)))
        if oracle.get_task_info_for_set(start_info, info, {subtask}):
            return True
    return False


def reset_env(env, robot_obs, scene_obs):
    """env.reset to a chain's initial state. calvin_env's Robot.reset sets the joints and fingers but not its
    `gripper_action`, the last gripper command that robot_obs[14] reports: it would carry over from the chain this
    env played before, so results would depend on num_workers. It is set from the initial state (open) here."""
    env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    robot = getattr(env, "robot", None)
    if robot is not None and hasattr(robot, "gripper_action"):
        robot.gripper_action = 1 if robot_obs[14] > 0 else -1


def evaluate_chain(env, oracle, policy, initial_condition, sequence, cfg, env_state_fn=env_state_for_initial_condition):
    """Number of consecutive subtasks solved (0..5): reset once to the chain's initial state, stop at a failure."""
    robot_obs, scene_obs = env_state_fn(initial_condition)
    reset_env(env, robot_obs, scene_obs)
    for solved, subtask in enumerate(sequence):
        if not rollout_subtask(env, oracle, policy, subtask, cfg):
            return solved
    return len(sequence)


# -----------------------------------------------------------------------------
# Chains in parallel. Each worker process owns one env and one policy copy and plays whole chains; chain i
# is seeded with seed + i, so its outcome depends only on (chain, policy, seed), not on which worker ran it
# or what ran before. This is simpler than batching inference across workers on the main process, whose
# results would depend on the batch composition (stochastic sampling, padding) and so on num_workers.
# On GPUs run one worker per device's worth of memory.

_WORKER = {}  # per-process env / oracle / policy, built at the first chain a process plays


def _play_chain(job):
    index, (initial_condition, sequence), setup = job
    make_env, make_oracle, load_policy, env_state_fn, cfg = setup
    if not _WORKER:
        if cfg.get("torch_threads"):
            torch.set_num_threads(cfg["torch_threads"])
        policy = check_policy(load_policy(cfg["checkpoint"], cfg["device"]), cfg["checkpoint"], cfg["replan_steps"])
        _WORKER.update(env=make_env(cfg["dataset_path"], cfg["scene"]), oracle=make_oracle(), policy=policy)
    random.seed(cfg["seed"] + index)
    np.random.seed(cfg["seed"] + index)
    torch.manual_seed(cfg["seed"] + index)
    solved = evaluate_chain(_WORKER["env"], _WORKER["oracle"], _WORKER["policy"], initial_condition, sequence, cfg, env_state_fn)
    return index, solved


def evaluate(chains, cfg, make_env=make_calvin_env, make_oracle=make_calvin_oracle, load_policy=load_vla,
             env_state_fn=env_state_for_initial_condition):
    """Play every chain; returns the list of consecutive-success counts, in chain order."""
    setup = (make_env, make_oracle, load_policy, env_state_fn, cfg)
    jobs = [(i, chain, setup) for i, chain in enumerate(chains)]
    results = [None] * len(chains)
    pbar = tqdm(total=len(chains), desc="chains", dynamic_ncols=True)
    pool, threads = None, torch.get_num_threads()
    if cfg["num_workers"] > 1:
        # spawn, not fork: PyBullet / EGL / torch threads do not survive a fork safely. A worker that dies
        # (e.g. its env cannot be built) fails the run with BrokenProcessPool instead of hanging it.
        pool = ProcessPoolExecutor(cfg["num_workers"], mp_context=multiprocessing.get_context("spawn"))
        outcomes = (future.result() for future in as_completed([pool.submit(_play_chain, job) for job in jobs]))
    else:
        outcomes = map(_play_chain, jobs)
    try:
        for index, solved in outcomes:
            results[index] = solved
            if cfg["debug"]:
                sequence = chains[index][1]
                marks = [f"{t}:{'ok' if j < solved else 'FAIL'}" for j, t in enumerate(sequence[:solved + 1])]
                tqdm.write(f"chain {index}: {' -> '.join(marks)}")
            pbar.update(1)
            done = [r for r in results if r is not None]
            pbar.set_description(" ".join(f"{i}/5 {100 * v:.1f}%" for i, v in enumerate(chain_success_rates(done), 1)))
    finally:
        pbar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _WORKER.clear()  # a later in-process run builds its own env/policy
        torch.set_num_threads(threads)  # an in-process run leaves the caller's threads as they were
    return results


# -----------------------------------------------------------------------------
# Metrics (calvin_agent/evaluation/utils.py: count_success, print_and_save)


def chain_success_rates(results, seq_len=5):
    """[fraction of chains with >= i consecutive successes for i = 1..seq_len]."""
    n = max(1, len(results))
    return [sum(r >= i for r in results) / n for i in range(1, seq_len + 1)]


def summarize(results, chains):
    """avg_seq_len, chain_sr {1..5}, and per task the successes / attempts (a task is attempted when the chain
    reaches it; the first failed one is the last attempt of its chain)."""
    success, attempts = Counter(), Counter()
    for solved, (_, sequence) in zip(results, chains):
        for j, task in enumerate(sequence[:solved + 1]):
            attempts[task] += 1
            success[task] += j < solved
    return {
        "avg_seq_len": float(np.mean(results)) if results else 0.0,
        "chain_sr": {str(i): sr for i, sr in enumerate(chain_success_rates(results), 1)},
        "task_info": {t: {"success": success[t], "total": attempts[t]} for t in sorted(attempts)},
        "num_chains": len(results),
    }


def print_summary(summary, title):
    rates = summary["chain_sr"]
    print(f"\n{title}")
    print(" | ".join(f"{i}/5" for i in rates) + " | Avg len")
    print(" | ".join(f"{100 * v:.1f}" for v in rates.values()) + f" | {summary['avg_seq_len']:.2f}")
    for task, info in summary["task_info"].items():
        print(f"  {task:<26} {info['success']:>4} / {info['total']:<4}  SR {100 * info['success'] / info['total']:.1f}%")


def run(config, chains, **factories):
    """Play `chains`, write <out_dir>/results.json, print the table; `factories` as for evaluate()."""
    t0 = time.time()
    results = evaluate(chains, config, **factories)
    summary = summarize(results, chains)
    summary.update(
        checkpoint=os.path.abspath(config["checkpoint"]), config=config, seconds=round(time.time() - t0, 1),
        chains=[{"initial_state": dict(s), "sequence": list(q), "solved": r} for (s, q), r in zip(chains, results)],
    )
    os.makedirs(config["out_dir"], exist_ok=True)
    path = os.path.join(config["out_dir"], "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary, f"CALVIN {config['dataset_path']} ({len(chains)} chains), checkpoint {config['checkpoint']}")
    print(f"wrote {path}")
    return summary


def main(argv):
    from data import configure
    config = configure(dict(globals()), argv)  # a copy: the module defaults stay as they are
    if config["gripper_convention"] not in ("calvin", "libero"):
        raise ValueError(f"gripper_convention={config['gripper_convention']!r}: expected 'calvin' or 'libero'")
    if not os.path.isdir(config["checkpoint"]):
        raise FileNotFoundError(f"checkpoint={config['checkpoint']!r} is not a directory (expected a VLA.save() directory)")
    check_dataset(config["dataset_path"])
    calvin_env = import_calvin_env()  # exits with install instructions when missing
    resolve_scene(config["scene"], Path(calvin_env.__file__).parents[1] / "conf" / "scene")
    sequences_fn, env_state_fn = official_protocol_functions()
    chains = load_chains(config["num_sequences"], config["chains_cache"], sequences_fn)
    if config["debug_num_chains"] > 0:
        chains = chains[:config["debug_num_chains"]]
    return run(config, chains, env_state_fn=env_state_fn,
               load_policy=functools.partial(load_vla, backbone_path=config["backbone"]))


if __name__ == "__main__":
    main(sys.argv[1:])

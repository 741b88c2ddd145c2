"""
A privileged scripted expert for LIBERO pick-and-place tasks, and a recorder that writes its successful
episodes in the official LIBERO hdf5 layout (Lifelong-Robot-Learning/LIBERO:scripts/create_dataset.py) plus
per-step reasoning text (data/demo_i/reasoning, the expert's current sub-goal: sft.py's think_action thought).

The expert reads object poses from the simulator (the BDDL goal's object and target, e.g. the alphabet soup
and basket_1_contain_region), and drives the eef with 7-d OSC_POSE delta actions: xyz delta (1.0 ~ 1.2 cm per
step), zero rotation, gripper -1 open / +1 close. Each step it also names its current sub-goal in English.

Usage:
  python prepare/libero_expert.py --tasks=0,1 --demos_per_task=50        # record demos (resumable)
  python prepare/libero_expert.py --tasks=0 --workers=2                  # the same file, two simulators at once
  python prepare/libero_expert.py --eval_init_states --episodes=20       # expert success on the benchmark init states
Demo episodes start from seeded re-samples (env.seed(seed_base + k); env.reset()), never from the
benchmark init states that evaluation uses.
"""

import json
import os
import re
import sys
import time

os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import configure  # noqa: E402

# -----------------------------------------------------------------------------
# config (nanoGPT style: module-level defaults, overridden by --key=value)
suite = "libero_object"
tasks = ""  # comma-separated task ids, "" = all tasks of the suite
demos_per_task = 50  # stop recording a task at this many successful demos
max_attempts = 0  # attempts per task in total (incl. earlier runs); 0 = 2 * demos_per_task
image_size = 128  # camera_heights = camera_widths
seed_base = 1000  # demo attempt k uses env.seed(seed_base + k): disjoint from the benchmark init states
workers = 1  # processes playing attempts in parallel, one simulator each; the file is the same for any count
out_dir = "out/libero_demos"
eval_init_states = False  # play from the benchmark init states, report success, record nothing
episodes = 20  # eval mode: init states 0..episodes-1 per task
eval_render = False  # eval mode: render the cameras anyway (only to time steps with rendering)
eval_seed = 7  # eval mode: env.seed like eval_libero.py
max_steps = 0  # 0 = the suite's evaluation budget
gain = 0.8  # P gain of the position controller (action = gain * error / STEP_M)
# Demonstrations must cover the states a policy meets, not one path (measured: a VLA trained on noise-free demos
# replays the path and lands its grasp 1-2 cm off from the benchmark's init states):
init_joint_noise = 0.02  # std (rad) added to the 7 arm joints at reset: the spread of the benchmark's own init states
action_noise = 0.3  # std of noise added to the executed xyz action (DART, Laskey et al. 2017); the recorded label
                    # is the expert's clean action, so the demos show the correction from the perturbed state
verbose = False  # print the phase changes of each episode
# -----------------------------------------------------------------------------

SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_STEPS_WAIT = 10  # settle steps, not recorded
DUMMY_ACTION = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
RIM_GRASP_WIDTH = 0.075  # objects wider than this along the fingers' axis are grasped by the rim
RIM_INSET = 0.008  # rim grasp: grip point this far inside the near rim (fingers close along y)
STEP_M = 0.012  # metres of eef motion per step for an action of 1.0 (measured: ~1.15 cm)


def nice_name(name):
    """'alphabet_soup_1' / 'basket_1_contain_region' -> 'alphabet soup' / 'basket'."""
    name = re.sub(r"_\d+(_.*)?$", "", name)
    return name.replace("_", " ")


# -----------------------------------------------------------------------------
# Privileged scene reading


def object_geoms(sim, root_body):
    """Collision geoms of every body under root_body (LIBERO objects are free bodies of the world)."""
    m = sim.model
    return [g for g in range(m.ngeom)
            if m.body_rootid[m.geom_bodyid[g]] == root_body and (m.geom_contype[g] or m.geom_conaffinity[g])]


def world_aabb(sim, geoms):
    """World-frame box around the geoms: each geom's local AABB corners mapped by its pose."""
    m, d = sim.model, sim.data
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    pts = []
    for g in geoms:
        local = corners * m.geom_aabb[g][3:] + m.geom_aabb[g][:3]
        pts.append(local @ d.geom_xmat[g].reshape(3, 3).T + d.geom_xpos[g])
    pts = np.concatenate(pts)
    return pts.min(0), pts.max(0)


class Scene:
    """The goal predicate's object and target (a body, or a region site of a body), read from the sim."""

    def __init__(self, env):
        e = env.env
        self.sim = e.sim
        goal = e.parsed_problem["goal_state"]
        pred = goal[0]  # libero_object / libero_spatial: one ('in' | 'on', object, target) predicate
        self.relation, self.obj, self.target = pred[0].lower(), pred[1], pred[2]
        self.obj_geoms = object_geoms(self.sim, e.obj_body_id[self.obj])
        # a region site ("basket_1_contain_region") belongs to the body whose name prefixes it
        owner = self.target if self.target in e.obj_body_id else max(
            (n for n in e.obj_body_id if self.target.startswith(n)), key=len)
        self.target_geoms = object_geoms(self.sim, e.obj_body_id[owner])
        self.is_site = self.target not in e.obj_body_id
        self.obj_name, self.target_name = nice_name(self.obj), nice_name(self.target)

    def obj_box(self):
        return world_aabb(self.sim, self.obj_geoms)

    def target_point(self):
        """(xy where the object should go, top z of the target)."""
        lo, hi = world_aabb(self.sim, self.target_geoms)
        xy = self.sim.data.get_site_xpos(self.target)[:2] if self.is_site else (lo[:2] + hi[:2]) / 2
        return np.array(xy), hi[2]


# -----------------------------------------------------------------------------
# The expert: a phase machine over eef position targets


class Expert:
    HOVER = 0.08  # approach height above the object's top
    CLEAR = 0.04  # carried object's bottom above the target's top
    DROP = 0.015  # release with the object's bottom this far above the target's top

    def __init__(self, env):
        self.scene = Scene(env)
        self.phase, self.t, self.retries = "approach", 0, 0
        self.grasp_pos = self.hold_offset = self.lift_z0 = self.carry_z = None
        self.eef = None  # eef position at the previous step: detects a stalled descent

    @staticmethod
    def grip_point(lo, hi):
        """Where the grip site closes. The fingers close along world y and open ~8 cm: narrower objects are
        held around their middle, wider ones (bowls) by the near rim wall."""
        center = (lo + hi) / 2
        if hi[1] - lo[1] < RIM_GRASP_WIDTH:
            return np.array([center[0], center[1], max(center[2], lo[2] + 0.012)])  # fingertips off the floor
        return np.array([center[0], lo[1] + RIM_INSET, max(hi[2] - 0.01, lo[2] + 0.012)])

    def goto(self, eef, target, grip):
        delta = np.clip(gain * (np.asarray(target) - eef) / STEP_M, -1.0, 1.0)
        return np.concatenate([delta, np.zeros(3), [grip]])

    def next(self, phase):
        if verbose:
            lo, hi = self.scene.obj_box()
            print(f"    {self.phase} -> {phase} after {self.t} steps; eef {self.eef.round(3)} obj {lo.round(3)} {hi.round(3)}")
        self.phase, self.t = phase, 0

    def act(self, obs):
        """obs -> (7-d action, sub-goal phrase)."""
        s, eef = self.scene, np.asarray(obs["robot0_eef_pos"], dtype=float)
        lo, hi = s.obj_box()
        center = (lo + hi) / 2
        goal_xy, goal_top = s.target_point()
        grip_point = self.grip_point(lo, hi)
        moved = np.inf if self.eef is None else abs(eef[2] - self.eef[2])
        self.t, self.eef, p = self.t + 1, eef, self.phase
        if p == "approach":  # above the object, gripper open
            target = np.array([grip_point[0], grip_point[1], hi[2] + self.HOVER])
            if np.linalg.norm(target[:2] - eef[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.03 or self.t > 80:
                self.next("descend")
            return self.goto(eef, target, -1), f"move above the {s.obj_name}"
        if p == "descend":  # straight down around the object
            target = grip_point
            stalled = self.t > 10 and moved < 0.0005  # fingertips on the floor (or the hand on a neighbour)
            if np.linalg.norm(target - eef) < 0.008 or (stalled and np.linalg.norm(target[:2] - eef[:2]) < 0.01) or self.t > 50:
                self.grasp_pos = np.array(target)
                self.next("grasp")
            return self.goto(eef, target, -1), f"reach down to the {s.obj_name}"
        if p == "grasp":  # close the fingers in place
            if self.t >= 12:
                self.lift_z0, self.hold_offset = lo[2], eef - center
                self.carry_z = goal_top + self.CLEAR + min(0.2, eef[2] - lo[2])  # relative: tables differ in height
                self.next("lift")
            return self.goto(eef, self.grasp_pos, 1), f"grasp the {s.obj_name}"
        if p == "lift":
            target = np.array([self.grasp_pos[0], self.grasp_pos[1], self.carry_z])
            if self.t > 8 and lo[2] < self.lift_z0 + 0.01:  # the object stayed behind: grasp again
                if self.retries < 2:
                    self.retries += 1
                    self.next("reopen")
            elif abs(target[2] - eef[2]) < 0.02 or self.t > 60:
                self.hold_offset = eef - center  # the grip as it settled
                self.next("carry")
            return self.goto(eef, target, 1), f"lift the {s.obj_name}"
        if p == "reopen":  # open and rise a bit before a new approach
            if self.t >= 8:
                self.next("approach")
            return self.goto(eef, eef + [0, 0, 0.02], -1), f"open the gripper to grasp the {s.obj_name} again"
        if p == "carry":  # object's centre over the target point, at a clearing height
            target = np.array([goal_xy[0] + self.hold_offset[0], goal_xy[1] + self.hold_offset[1], self.carry_z])
            if np.linalg.norm(target[:2] - eef[:2]) < 0.01 or self.t > 100:
                self.next("lower")
            return self.goto(eef, target, 1), f"move over the {s.target_name}"
        if p == "lower":
            target = np.array([goal_xy[0] + self.hold_offset[0], goal_xy[1] + self.hold_offset[1],
                               goal_top + self.DROP + (eef[2] - lo[2])])
            target[2] = min(target[2], eef[2])  # never climb while lowering
            if abs(lo[2] - goal_top - self.DROP) < 0.01 or self.t > 40:
                self.next("release")
            return self.goto(eef, target, 1), f"lower the {s.obj_name} {'into' if s.relation == 'in' else 'onto'} the {s.target_name}"
        if p == "release":
            if self.t >= 10:
                self.next("retreat")
            return self.goto(eef, eef, -1), f"release the {s.obj_name}"
        return self.goto(eef, eef + [0, 0, 0.1], -1), "move up and away"


# -----------------------------------------------------------------------------
# Episodes and recording


def make_env(task, render=True):
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env_kwargs = dict(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size)
    # the expert never looks at images: evaluating it without cameras is ~5x faster, same physics
    return OffScreenRenderEnv(**env_kwargs, use_camera_obs=render), env_kwargs


def perturbed_start(env, rng, std):
    """The reset's sim state with N(0, std) added to the arm's joint angles (the benchmark's init states vary
    the arm this way; LIBERO's own reset does not)."""
    e = env.env
    state = np.array(env.get_sim_state())
    qpos = np.asarray(e.robots[0]._ref_joint_pos_indexes)
    state[1 + qpos] += rng.normal(0.0, std, len(qpos))  # MuJoCo's flattened state: [time, qpos, qvel]
    return state


def play(env, seed, init_state, budget, record, joint_noise=0.0, noise=0.0):
    """One episode: seed, reset (or an init state), settle, expert until done. -> (success, steps, traj).
    joint_noise: perturb the arm's start (seeded re-samples only); noise: std of the executed xyz action's noise."""
    from robosuite.utils.transform_utils import quat2axisangle
    env.seed(seed)
    obs = env.reset()
    rng = np.random.default_rng(seed)  # the episode's own noise: a rerun of attempt k is the same episode
    if init_state is not None:
        obs = env.set_init_state(init_state)
    elif joint_noise > 0:
        obs = env.set_init_state(perturbed_start(env, rng, joint_noise))
    for _ in range(NUM_STEPS_WAIT):  # objects drop into place; not recorded
        obs, _, _, _ = env.step(DUMMY_ACTION)
    expert = Expert(env)
    keys = ("actions", "reasoning", "agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "ee_states",
            "gripper_states", "joint_states", "states", "robot_states", "rewards", "dones")
    traj = {k: [] for k in keys}
    for t in range(budget):
        action, phrase = expert.act(obs)
        if record:  # the observation the action was chosen from, as create_dataset.py pairs them
            axis_angle = quat2axisangle(np.array(obs["robot0_eef_quat"]))  # copy: robosuite clips in place
            traj["reasoning"].append(phrase)
            traj["agentview_rgb"].append(obs["agentview_image"])  # upside down, as robosuite renders
            traj["eye_in_hand_rgb"].append(obs["robot0_eye_in_hand_image"])
            traj["ee_pos"].append(obs["robot0_eef_pos"])
            traj["ee_ori"].append(axis_angle)
            traj["ee_states"].append(np.concatenate([obs["robot0_eef_pos"], axis_angle]))
            traj["gripper_states"].append(obs["robot0_gripper_qpos"])
            traj["joint_states"].append(obs["robot0_joint_pos"])
            traj["states"].append(env.get_sim_state())
            traj["robot_states"].append(np.concatenate([obs["robot0_gripper_qpos"], obs["robot0_eef_pos"], obs["robot0_eef_quat"]]))
        executed = np.array(action, dtype=np.float64)
        if noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
        obs, reward, done, _ = env.step(executed.tolist())
        if record:
            traj["actions"].append(action)
            traj["rewards"].append(reward)
            traj["dones"].append(int(done))
        if done:
            return True, t + 1, traj
    return False, budget, traj


def open_task_file(path, task, env, env_kwargs):
    """Open (or create) a task's hdf5 file in append mode and write the data-level attributes once."""
    f = h5py.File(path, "a")
    data = f.require_group("data")
    if "problem_info" not in data.attrs:
        e = env.env
        info = {"problem_name": env.problem_name, "domain_name": env.domain_name,
                "language_instruction": str(task.language)}
        data.attrs["problem_info"] = json.dumps(info)
        data.attrs["env_name"] = type(e).__name__
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": type(e).__name__, "problem_name": env.problem_name,
                                             "bddl_file": env_kwargs["bddl_file_name"],
                                             "env_kwargs": {**env_kwargs, "controller": "OSC_POSE", "control_freq": 20}})
        data.attrs["bddl_file_name"] = env_kwargs["bddl_file_name"]
        data.attrs["macros_image_convention"] = "opengl"  # upside-down renders, as the official files
        data.attrs["expert"] = "prepare/libero_expert.py (scripted, privileged)"
        data.attrs["num_attempts"] = 0
    return f


def write_demo(f, traj, seed):
    data = f["data"]
    i = len([k for k in data if k.startswith("demo_")])
    g = data.create_group(f"demo_{i}")
    obs = g.create_group("obs")
    for key in ("agentview_rgb", "eye_in_hand_rgb"):
        frames = np.stack(traj[key]).astype(np.uint8)
        obs.create_dataset(key, data=frames, chunks=(1, *frames.shape[1:]), compression="gzip", compression_opts=4)
    for key in ("ee_pos", "ee_ori", "ee_states", "gripper_states", "joint_states"):
        obs.create_dataset(key, data=np.stack(traj[key]).astype(np.float64))
    g.create_dataset("actions", data=np.stack(traj["actions"]).astype(np.float64))
    g.create_dataset("states", data=np.stack(traj["states"]))
    g.create_dataset("robot_states", data=np.stack(traj["robot_states"]))
    g.create_dataset("rewards", data=np.array(traj["rewards"], dtype=np.uint8))
    g.create_dataset("dones", data=np.array(traj["dones"], dtype=np.uint8))
    g.create_dataset("reasoning", data=traj["reasoning"], dtype=h5py.string_dtype())
    g.attrs["num_samples"] = len(traj["actions"])
    g.attrs["init_state"] = traj["states"][0]
    g.attrs["seed"] = seed
    data.attrs["num_demos"] = i + 1
    data.attrs["total"] = int(data.attrs.get("total", 0)) + len(traj["actions"])
    f.flush()  # each demo is on disk before the next attempt: a killed run resumes from here
    return i + 1


def attempt(env, seed, budget):
    """Demo attempt `seed`: (seed, success, steps, trajectory if it succeeded, seconds)."""
    t0 = time.perf_counter()
    success, T, traj = play(env, seed, None, budget, record=True, joint_noise=init_joint_noise, noise=action_noise)
    return seed, success, T, traj if success else None, time.perf_counter() - t0


_worker_env = None


def _start_worker(config, task):
    global _worker_env
    globals().update(config)  # a spawned process starts from the module's defaults
    _worker_env = make_env(task)[0]


def _worker_attempt(job):
    return attempt(_worker_env, *job)


def attempts_played(env, task, seeds, budget):
    """The attempts' results in seed order, played here (workers=1) or by a pool of processes, each with its own
    simulator; a consumer that stops early ends the pool (the attempts in flight are dropped, never counted)."""
    if workers == 1:
        for seed in seeds:
            yield attempt(env, seed, budget)
        return
    import multiprocessing
    config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
    with multiprocessing.get_context("spawn").Pool(workers, _start_worker, (config, task)) as pool:
        yield from pool.imap(_worker_attempt, ((seed, budget) for seed in seeds))


def record_task(bench, task_id, budget):
    task = bench.get_task(task_id)
    path = os.path.join(out_dir, f"{task.name}_demo.hdf5")
    env, env_kwargs = make_env(task, render=workers == 1)  # with workers, only for the file's attributes
    f = open_task_file(path, task, env, env_kwargs)
    n = len([k for k in f["data"] if k.startswith("demo_")])
    attempts0 = attempts = int(f["data"].attrs["num_attempts"])
    cap = max_attempts or 2 * demos_per_task
    ok = steps = 0
    step_time = 0.0
    bar = tqdm(total=demos_per_task, initial=min(n, demos_per_task), desc=f"task {task_id}", leave=True)
    # attempt k always sees the same scene (seed_base + k); results are taken in that order, so the file does not
    # depend on the number of workers
    seeds = range(seed_base + attempts, seed_base + cap) if n < demos_per_task else range(0)
    played = attempts_played(env, task, seeds, budget)
    try:
        for seed, success, T, traj, seconds in played:
            step_time += seconds
            steps += T
            attempts += 1
            f["data"].attrs["num_attempts"] = attempts
            if success:
                ok += 1
                n = write_demo(f, traj, seed)
                bar.update(1)
            bar.set_postfix(success=f"{100 * ok / (attempts - attempts0):.0f}%", attempts=attempts)
            if n >= demos_per_task:
                break
    finally:
        played.close()
        bar.close()
        f.close()
        env.close()
    return dict(instruction=str(task.language), file=path, demos=n, attempts=attempts - attempts0,
                successes=ok, success_rate=ok / max(1, attempts - attempts0), sec_per_step=step_time / max(1, steps))


def eval_task(bench, task_id, budget):
    task = bench.get_task(task_id)
    init_states = bench.get_task_init_states(task_id)
    env, _ = make_env(task, render=eval_render)
    ok, lengths, t0, steps = 0, [], time.perf_counter(), 0
    bar = tqdm(range(min(episodes, len(init_states))), desc=f"eval task {task_id}")
    for i in bar:
        success, T, _ = play(env, eval_seed, init_states[i], budget, record=False)
        ok += success
        steps += T
        if success:
            lengths.append(T)
        bar.set_postfix(success=f"{100 * ok / (i + 1):.0f}%")
    env.close()
    n = min(episodes, len(init_states))
    return dict(instruction=str(task.language), episodes=n, successes=ok, success_rate=ok / n,
                mean_len=float(np.mean(lengths)) if lengths else 0.0, sec_per_step=(time.perf_counter() - t0) / max(1, steps))


def main(argv):
    configure(globals(), argv)  # --key=value into the module-level defaults above
    from libero.libero import benchmark
    bench = benchmark.get_benchmark_dict()[suite]()
    ids = [int(t) for t in tasks.split(",") if t.strip()] or list(range(bench.n_tasks))
    budget = max_steps or SUITE_MAX_STEPS[suite]
    os.makedirs(out_dir, exist_ok=True)
    mode = "eval_init_states" if eval_init_states else "record"
    results = {}
    for task_id in ids:
        results[task_id] = (eval_task if eval_init_states else record_task)(bench, task_id, budget)
        r = results[task_id]
        print(f"{suite} task {task_id}: {r['successes']}/{r.get('episodes', r.get('attempts'))} "
              f"= {100 * r['success_rate']:.0f}%  ({r['sec_per_step']:.3f} s/step)  {r['instruction']}")
    stats_path = os.path.join(out_dir, "expert_stats.json")
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else {}
    for task_id, r in results.items():  # merge: earlier runs' other tasks stay
        stats.setdefault(mode, {}).setdefault(suite, {})[str(task_id)] = r
    with open(stats_path, "w") as fh:
        json.dump(stats, fh, indent=1)
    total = sum(r["successes"] for r in results.values())
    count = sum(r.get("episodes", r.get("attempts", 0)) for r in results.values())
    print(f"{mode} {suite}: {total}/{count} = {100 * total / max(1, count):.1f}% expert success; wrote {stats_path}")


if __name__ == "__main__":
    main(sys.argv[1:])

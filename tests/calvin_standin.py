"""
STAND-INS for CALVIN's simulator and task oracle, so eval_calvin.py's loop can be tested without PyBullet.

They copy the *interface* of calvin_env (mees/calvin_env):
  - `StandinCalvinEnv` like calvin_env.envs.play_table_env.PlayTableSimEnv: `reset(robot_obs=, scene_obs=)`,
    `step(action) -> (obs, 0, False, info)`, `get_obs()`, `get_info()`; obs = {"rgb_obs": {"rgb_static",
    "rgb_gripper"}, "depth_obs": {}, "robot_obs" [15], "scene_obs" [24]}; info = {"robot_info", "scene_info"};
    `step` asserts what the real robot asserts (a 7-D relative action with the gripper in {-1, +1}).
  - `StandinTasks` like calvin_env.envs.tasks.Tasks: `get_task_info_for_set(start_info, end_info, task_filter)`.

The world is scripted, not simulated: every task has its own direction in xyz, the end effector moves by the
relative action, and a task counts as done once the end effector has moved more than SUCCESS_DISTANCE along
that task's direction since the subtask started (the real oracle, too, compares start and current info).
A policy that points the right way at speed 0.4 therefore solves a subtask at exactly its 3rd step.

`DummyPolicy` has the VLA API (`predict_action_batch(images_list, instructions, states) ->
np.float32 [B, H, 7]`, `.action_dim`, `.state_dim`, `.horizon`) and steers toward the instructed task's
direction, except for `fail_tasks` (it stands still); `flip_prob` > 0 reverses a chunk at random (torch RNG)
so outcomes depend on the seed (and, through one more draw when robot_obs[14] says closed, on the gripper state).
"""

import numpy as np
import torch

from eval_calvin import VALIDATION_INSTRUCTIONS

SUCCESS_DISTANCE = 1.0
TASK_DIRECTIONS = {}
for _k, _task in enumerate(sorted(VALIDATION_INSTRUCTIONS)):
    _v = np.random.RandomState(_k).randn(3)
    TASK_DIRECTIONS[_task] = _v / np.linalg.norm(_v)
INSTRUCTION_TO_TASK = {text: task for task, text in VALIDATION_INSTRUCTIONS.items()}


class StandinRobot:
    """calvin_env's Robot keeps the last gripper command in `gripper_action` (robot_obs[14]); its reset(robot_obs)
    sets the joints but leaves gripper_action alone, so it carries over from the previous chain on this env."""

    def __init__(self):
        self.gripper_action = 1


class StandinCalvinEnv:
    def __init__(self, dataset_path=None, scene=None):
        self.dataset_path, self.scene = dataset_path, scene
        self.resets, self.actions = [], []  # what eval_calvin sent, for the tests
        self.robot, self.robot_obs, self.scene_obs = StandinRobot(), np.zeros(15), np.zeros(24)

    def reset(self, robot_obs=None, scene_obs=None):
        self.robot_obs = np.array(robot_obs, dtype=np.float64)
        self.scene_obs = np.array(scene_obs, dtype=np.float64)
        self.resets.append((self.robot_obs.copy(), self.scene_obs.copy()))
        return self.get_obs()

    def get_obs(self):
        shade = np.uint8(len(self.actions) % 256)
        self.robot_obs[14] = self.robot.gripper_action  # as calvin_env's Robot.get_observation reports it
        return {"rgb_obs": {"rgb_static": np.full((20, 20, 3), shade, np.uint8),
                            "rgb_gripper": np.full((12, 12, 3), shade, np.uint8)},
                "depth_obs": {}, "robot_obs": self.robot_obs.copy(), "scene_obs": self.scene_obs.copy()}

    def get_info(self):
        return {"robot_info": {"tcp_pos": self.robot_obs[:3].copy(), "gripper_action": self.robot.gripper_action},
                "scene_info": {}}

    def step(self, action):
        action = np.asarray(action)
        assert action.shape == (7,), action.shape
        assert action[6] in (-1, 1), f"gripper action must be -1 or +1, got {action[6]}"  # as calvin's robot asserts
        self.actions.append(action.copy())
        self.robot_obs[:3] += action[:3]
        self.robot.gripper_action = int(action[6])
        return self.get_obs(), 0, False, self.get_info()


class StandinTasks:
    def get_task_info_for_set(self, start_info, end_info, task_filter):
        moved = end_info["robot_info"]["tcp_pos"] - start_info["robot_info"]["tcp_pos"]
        return {task for task in task_filter if moved @ TASK_DIRECTIONS[task] > SUCCESS_DISTANCE}


def make_standin_env(dataset_path, scene):
    return StandinCalvinEnv(dataset_path, scene)


def make_standin_oracle():
    return StandinTasks()


class DummyPolicy:
    def __init__(self, fail_tasks=(), horizon=8, action_dim=7, state_dim=15, speed=0.4, flip_prob=0.0, clip_actions=False):
        self.fail_tasks, self.speed, self.flip_prob, self.clip_actions = set(fail_tasks), speed, flip_prob, clip_actions
        self.horizon, self.action_dim, self.state_dim = horizon, action_dim, state_dim
        self.calls = []  # (instruction, state) per call

    def predict_action_batch(self, images_list, instructions, states):
        assert len(images_list) == len(instructions) == len(states)
        assert all(len(images) == 2 and images[0].dtype == np.uint8 and images[0].ndim == 3 for images in images_list)
        assert np.asarray(states).shape == (len(instructions), self.state_dim)
        out = np.zeros((len(instructions), self.horizon, self.action_dim), np.float32)
        for b, instruction in enumerate(instructions):
            self.calls.append((instruction, np.asarray(states[b]).copy()))
            task = INSTRUCTION_TO_TASK[instruction]
            if self.flip_prob and states[b][14] < 0:  # a closed gripper draws once more: outcomes depend on it
                torch.rand(())
            sign = -1.0 if self.flip_prob and torch.rand(()).item() < self.flip_prob else 1.0
            if task not in self.fail_tasks:
                out[b, :, :3] = sign * self.speed * TASK_DIRECTIONS[task]
            out[b, :, 6] = 0.3 if task.startswith("lift") else -0.2  # not yet binarized: the eval must do it
        return out


def load_dummy_policy(checkpoint, device, **kwargs):
    """A stand-in for VLA.load(checkpoint, device); use functools.partial to set DummyPolicy's arguments."""
    return DummyPolicy(**kwargs)

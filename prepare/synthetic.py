"""The embedded default's data, generated from a seed in seconds: a top-down tabletop with four coloured blocks,
written in the one robot-data format every stage reads (LIBERO's hdf5 layout) plus LLaVA-style VQA and reasoning
json. Each task is "put the A block on the B block"; the scripted demonstration moves above A (aligning its yaw),
descends, closes, lifts, moves above B, descends, opens and lifts, with smoothed velocity commands in [-1, 1] like
LIBERO's delta actions. Which way to move depends on where A and B are in *this* image, so a model that ignores
the image (or the instruction) cannot predict the actions.

    python prepare/synthetic.py                       # out/data, seed 0 (what the stages' defaults read)
    python prepare/synthetic.py --out_dir=out/data_1 --seed=1
"""

import json
import math
import os
import shutil
import sys

import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import REASONING_ACTION_PROMPT, configure  # noqa: E402

# -----------------------------------------------------------------------------
# config (nanoGPT style: --key=value)
out_dir = "out/data"
seed = 0
demos_per_task = 32
val_demos_per_task = 4
image_size = 56
qa_per_demo = 6
overwrite = False  # replace an out_dir that holds other data
# -----------------------------------------------------------------------------

# The embedded default: a top-down tabletop with four coloured blocks. Each task is "put the A block
# on the B block"; the scripted demonstration moves above A (aligning its yaw), descends, closes,
# lifts, moves above B, descends, opens and lifts, with smoothed velocity commands in [-1, 1] like
# LIBERO's delta actions. Which way to move depends on where A and B are in *this* image, so a model
# that ignores the image (or the instruction) cannot predict the actions.

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SYNTH_TASKS = [("red", "blue"), ("blue", "green"), ("green", "yellow"), ("yellow", "red"), ("red", "green"), ("blue", "yellow")]
TABLE, BLOCK, STEP = 0.25, 0.05, 0.03   # table half-size, block size, max displacement per step (metres)
HOVER, GRASP_Z, PLACE_Z = 0.12, 0.02, 0.06
AGENT_SPAN, WRIST_SPAN = 0.30, 0.12      # half-width of the area each camera sees
HOME_JITTER = 0.02                        # start within +-2 cm of the table centre
SCENE_JITTER, YAW_JITTER = 0.01, 0.1      # blocks within +-1 cm / +-0.1 rad of their task's scene (LIBERO's init
                                          # regions are ~2 cm boxes)
FINGER_OPEN = 0.04                        # finger joint position when open; it closes or opens over 3 steps


def _render(blocks, held, gripper, center, span, size):
    """Top-down orthographic render: +x right, +y up in the image. The gripper is a ring whose radius
    grows with height, white when open, black when closed; a held block is drawn under it."""
    u = (np.arange(size) + 0.5) / size * 2 - 1
    px, py = center[0] + u[None, :] * span, center[1] - u[:, None] * span
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (150, 120, 90)
    img[(np.abs(px) > TABLE + 0.03) | (np.abs(py) > TABLE + 0.03)] = (60, 60, 60)
    for name, (x, y, yaw) in blocks.items():
        if name == held:
            x, y = gripper[0], gripper[1]
        c, s = math.cos(yaw), math.sin(yaw)
        lu, lv = (px - x) * c + (py - y) * s, -(px - x) * s + (py - y) * c
        img[(np.abs(lu) < BLOCK / 2) & (np.abs(lv) < BLOCK / 4)] = COLORS[name]  # 2:1 bars show the yaw
    r = np.hypot(px - gripper[0], py - gripper[1])
    radius = 0.012 + 0.1 * gripper[2]
    ring = (r > radius) & (r < radius + max(0.008, 1.5 * span / size))
    img[ring] = (0, 0, 0) if gripper[4] > 0 else (255, 255, 255)
    # the gripper's yaw: a short tick in the ring's colour
    c, s = math.cos(gripper[3]), math.sin(gripper[3])
    along = (px - gripper[0]) * c + (py - gripper[1]) * s
    across = -(px - gripper[0]) * s + (py - gripper[1]) * c
    img[(np.abs(across) < span / size) & (np.abs(along) < radius) & (np.abs(along) > radius * 0.4)] = img[ring][0] if ring.any() else 0
    return img


def _relation(dx, dy, tol=0.015):
    words = []
    if dy > tol:
        words.append("behind")
    elif dy < -tol:
        words.append("in front of")
    if dx > tol:
        words.append("right of")
    elif dx < -tol:
        words.append("left of")
    return " and ".join(words) if words else "right under"


def _move_words(dx, dy, tol=0.015):
    words = [w for w, cond in (("back", dy > tol), ("forward", dy < -tol), ("right", dx > tol), ("left", dx < -tol)) if cond]
    return " and ".join(words)


def _task_scene(rng):
    """A task's fixed scene: four blocks at least 0.1 m apart, away from the table edge (x, y, yaw each)."""
    while True:
        pos = rng.uniform(-TABLE + 0.04, TABLE - 0.04, size=(4, 2))
        if min(np.hypot(*(pos[i] - pos[j])) for i in range(4) for j in range(i)) > 0.1:
            return {name: (pos[i, 0], pos[i, 1], rng.uniform(-math.pi / 4, math.pi / 4)) for i, name in enumerate(COLORS)}


def _synthetic_episode(rng, task, scene, noise=0.01):
    """One scripted demonstration: dict of arrays in the LIBERO layout plus per-step phase notes."""
    pick, place = task
    # like a LIBERO task, each task has one scene and every episode places the blocks within a small region of it
    blocks = {name: (x + rng.uniform(-SCENE_JITTER, SCENE_JITTER), y + rng.uniform(-SCENE_JITTER, SCENE_JITTER),
                     yaw + rng.uniform(-YAW_JITTER, YAW_JITTER)) for name, (x, y, yaw) in scene.items()}
    # the arm starts near a home pose above the table centre, as LIBERO's init states do: a random start would
    # add two input dimensions the head must generalize over from a few hundred demonstrations
    g = np.array([*rng.uniform(-HOME_JITTER, HOME_JITTER, 2), HOVER + rng.uniform(0, 0.04), 0.0, -1.0])  # x, y, z, yaw, grip
    (ax, ay, ayaw), (bx, by, _) = blocks[pick], blocks[place]
    # waypoints: (target xyz, target yaw, gripper command, phase)
    plan = [((ax, ay, HOVER), ayaw, -1, "reach"), ((ax, ay, GRASP_Z), ayaw, -1, "descend"), (None, ayaw, 1, "grasp"),
            ((ax, ay, HOVER), ayaw, 1, "lift"), ((bx, by, HOVER), ayaw, 1, "carry"), ((bx, by, PLACE_Z), ayaw, 1, "lower"),
            (None, ayaw, -1, "release"), ((bx, by, HOVER), ayaw, -1, "retreat")]
    frames, prev = [], np.zeros(6)
    held, finger = None, FINGER_OPEN
    for target, yaw, grip, phase in plan:
        for k in range(40):
            if target is None:  # close or open in place over 3 steps
                if k == 3:
                    break
                cmd = np.zeros(6)
            else:
                delta = np.array([*target]) - g[:3]
                if np.abs(delta).max() < 0.004 and abs(yaw - g[3]) < 0.02:
                    break
                cmd = np.concatenate([np.clip(delta / STEP, -1, 1), [0, 0, np.clip((yaw - g[3]) / 0.15, -1, 1)]])
            cmd = 0.5 * prev + 0.5 * cmd  # smooth like a human teleoperator's velocity commands
            jitter = rng.normal(0, noise, 6) * np.array([1, 1, 1, 0, 0, 1]) * (target is not None)  # rx, ry stay 0
            action = np.concatenate([cmd + jitter, [grip]])
            frames.append(dict(g=g.copy(), held=held, finger=finger, action=action, phase=phase))
            prev = cmd
            g[:3] += cmd[:3] * STEP
            g[3] += cmd[5] * 0.15
            g[4] = grip
            finger = float(np.clip(finger - grip * FINGER_OPEN / 3, 0.0, FINGER_OPEN))
            if phase == "grasp" and k == 2:
                held = pick
            if phase == "release" and k == 2:
                held = None
    return blocks, frames


def _write_episode(group, blocks, frames, image_size, task):
    T = len(frames)
    agent = np.stack([_render(blocks, f["held"], f["g"], (0.0, 0.0), AGENT_SPAN, image_size) for f in frames])
    wrist = np.stack([_render(blocks, f["held"], f["g"], f["g"][:2], WRIST_SPAN, image_size) for f in frames])
    gs = np.stack([f["g"] for f in frames])
    finger = np.array([[f["finger"]] for f in frames])  # gripper_states are finger joint positions, as LIBERO's
    ee_states = np.concatenate([gs[:, :3], np.zeros((T, 2)), gs[:, 3:4]], axis=1)  # pos + axis-angle (yaw only)
    obs = group.create_group("obs")
    chunked = dict(chunks=(1, image_size, image_size, 3), compression="gzip", compression_opts=1)
    obs.create_dataset("agentview_rgb", data=agent, **chunked)
    obs.create_dataset("eye_in_hand_rgb", data=wrist, **chunked)
    obs.create_dataset("ee_states", data=ee_states.astype(np.float64))
    obs.create_dataset("ee_pos", data=gs[:, :3])
    obs.create_dataset("ee_ori", data=ee_states[:, 3:])
    obs.create_dataset("gripper_states", data=np.concatenate([finger, -finger], axis=1))
    obs.create_dataset("joint_states", data=np.tanh(np.concatenate([gs[:, :4], gs[:, :3]], axis=1)))  # a stand-in arm
    quat = np.stack([np.cos(gs[:, 3] / 2), np.zeros(T), np.zeros(T), np.sin(gs[:, 3] / 2)], axis=1)
    group.create_dataset("actions", data=np.stack([f["action"] for f in frames]).astype(np.float64))
    group.create_dataset("robot_states", data=np.concatenate([finger, -finger, gs[:, :3], quat], axis=1))
    scene = np.array([v for b in blocks.values() for v in b])
    group.create_dataset("states", data=np.concatenate([np.repeat(scene[None], T, 0), gs], axis=1))
    group.create_dataset("rewards", data=np.eye(T, dtype=np.uint8)[-1])
    group.create_dataset("dones", data=np.eye(T, dtype=np.uint8)[-1])
    # per-step reasoning annotations (an extension of the LIBERO layout, like ECoT's): LiberoDataset exposes them
    group.create_dataset("reasoning", data=[_scene_thought(blocks, f, task)[0] for f in frames], dtype=h5py.string_dtype())
    group.attrs["num_samples"] = T
    return agent, wrist


def _scene_thought(blocks, frame, task):
    """What the image shows and what to do next, in words: (thought, answer)."""
    pick, place = task
    g, phase = frame["g"], frame["phase"]
    target = pick if phase in ("reach", "descend", "grasp") else place
    tx, ty, _ = blocks[target]
    rel, move = _relation(tx - g[0], ty - g[1]), _move_words(tx - g[0], ty - g[1])
    state = "closed and holding the " + pick + " block" if frame["held"] else ("closed" if g[4] > 0 else "open")
    answer = {"reach": f"move {move} above the {pick} block" if move else f"turn to line up with the {pick} block",
              "descend": f"move down onto the {pick} block", "grasp": "close the gripper",
              "lift": "lift the block up", "carry": f"move {move} above the {place} block" if move else "hold still",
              "lower": f"move down onto the {place} block", "release": "open the gripper",
              "retreat": "move up away from the blocks"}[phase]
    return f"The gripper is {state}. The {target} block is {rel} the gripper. So the robot should {answer}.", answer


def _vqa(rng, blocks, frame):
    g = frame["g"]
    name = list(COLORS)[rng.integers(len(COLORS))]
    x, y, _ = blocks[name]
    nearest = min(COLORS, key=lambda c: np.hypot(blocks[c][0] - g[0], blocks[c][1] - g[1]) + 9 * (c == frame["held"]))
    return [("What colour is the block closest to the gripper?", f"The {nearest} block."),
            (f"Where is the {name} block relative to the gripper?", f"It is {_relation(x - g[0], y - g[1])} the gripper."),
            ("Is the gripper open or closed?", "Closed." if g[4] > 0 else "Open.")][rng.integers(3)]


SYNTHETIC_VERSION = 4  # 2: home start pose; 3: per-step reasoning in the hdf5 files; 4: a scene per task, gradual fingers


def make_synthetic_dataset(out_dir, seed=0, demos_per_task=32, val_demos_per_task=4, image_size=56,
                           qa_per_demo=6, tasks=None, overwrite=False):
    """Write the embedded default dataset to out_dir (skipped if an identical one is already there):

        libero/{train,val}/<task>_demo.hdf5     LIBERO layout, one file per task, plus data/demo_i/reasoning:
                                                one thought per step (what the image shows, what to do next)
        vqa_{train,val}.json, reasoning_{train,val}.json, images/...png   LLaVA-style conversations
        dataset.json                            what was generated (the arguments below)

    Returns the dataset.json content. Deterministic per seed. An out_dir holding anything else is an error
    unless overwrite=True.
    """
    tasks = [tuple(t) for t in (tasks or SYNTH_TASKS)]
    meta = dict(version=SYNTHETIC_VERSION, seed=seed, demos_per_task=demos_per_task, val_demos_per_task=val_demos_per_task,
                image_size=image_size, qa_per_demo=qa_per_demo, tasks=[list(t) for t in tasks])
    meta_path = os.path.join(out_dir, "dataset.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return meta
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds other data (its dataset.json, if any, records other settings): "
                              "pass --overwrite to replace it, or choose another --out_dir")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n_demos in (("train", demos_per_task), ("val", val_demos_per_task)):
        os.makedirs(os.path.join(tmp, "libero", split))
        os.makedirs(os.path.join(tmp, "images", split))
        vqa, reasoning = [], []
        for task_index, task in enumerate(tasks):
            instruction = f"put the {task[0]} block on the {task[1]} block"
            name = instruction.replace(" ", "_")
            rng = np.random.default_rng([seed, task_index, split == "val"])
            scene = _task_scene(np.random.default_rng([seed, task_index, 2]))  # shared by train and val
            with h5py.File(os.path.join(tmp, "libero", split, f"{name}_demo.hdf5"), "w") as f:
                data = f.create_group("data")
                data.attrs["problem_info"] = json.dumps(dict(problem_name="synthetic_blocks", domain_name="roboalign_synthetic",
                                                             language_instruction=instruction))
                data.attrs["env_name"] = "roboalign_synthetic_blocks"
                data.attrs["bddl_file_name"] = ""
                total = 0
                for d in range(n_demos):
                    blocks, frames = _synthetic_episode(rng, task, scene)
                    agent, wrist = _write_episode(data.create_group(f"demo_{d}"), blocks, frames, image_size, task)
                    total += len(frames)
                    for q in range(qa_per_demo):  # conversations about random frames of this demo
                        t = int(rng.integers(len(frames)))
                        stem = f"images/{split}/{name}_{d}_{t}"
                        for cam, img in (("agent", agent[t]), ("wrist", wrist[t])):
                            if not os.path.exists(os.path.join(tmp, f"{stem}_{cam}.png")):
                                Image.fromarray(img).save(os.path.join(tmp, f"{stem}_{cam}.png"))
                        if q % 2 == 0:
                            question, answer = _vqa(rng, blocks, frames[t])
                            vqa.append({"id": f"{name}_{d}_{t}_vqa", "image": f"{stem}_agent.png",
                                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                          {"from": "gpt", "value": answer}]})
                        else:
                            reasoning.append({"id": f"{name}_{d}_{t}_reason", "image": [f"{stem}_agent.png", f"{stem}_wrist.png"],
                                              "conversations": [{"from": "human", "value": "<image>\n" + REASONING_ACTION_PROMPT
                                                                 .replace(" give the action tokens", " say what to do")
                                                                 .format(instruction=instruction)},
                                                                {"from": "gpt", "value": "<think>{}</think><answer>{}</answer>".format(
                                                                    *_scene_thought(blocks, frames[t], task))}]})
                data.attrs["num_demos"], data.attrs["total"] = n_demos, total
        for kind, records in (("vqa", vqa), ("reasoning", reasoning)):
            with open(os.path.join(tmp, f"{kind}_{split}.json"), "w") as f:
                json.dump(records, f, indent=0)
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return meta


def main():
    config = configure({k: v for k, v in globals().items() if k in ("out_dir", "seed", "demos_per_task", "val_demos_per_task",
                                                                    "image_size", "qa_per_demo", "overwrite")})
    meta = make_synthetic_dataset(**config)
    print(f"{config['out_dir']}: {len(meta['tasks'])} tasks x {meta['demos_per_task']} training + "
          f"{meta['val_demos_per_task']} held-out demonstrations")


if __name__ == "__main__":
    main()

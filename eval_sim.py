"""eval_sim.py: MetaWorld (v3, MuJoCo) expert demonstrations as RLDS, and batched policy evaluation;
the CALVIN long-horizon benchmark where calvin_env is installed.

    python eval_sim.py collect --tasks mt10 --episodes 50 --out data/metaworld/mt10
    python eval_sim.py evaluate --ckpt runs/rt1/ckpt.pt --tasks mt10 --episodes 20
    python eval_sim.py evaluate --policy expert --tasks reach-v3,push-v3 --episodes 10
    python eval_sim.py evaluate --suite calvin --ckpt runs/gr1/ckpt.pt --calvin_data /data/task_ABC_D
    python eval_sim.py export --ckpt runs/rt1/ckpt.pt --out runs/rt1/export   # evaluate --ckpt runs/rt1/export
    python eval_sim.py pixels --tasks mt10 --size 64     # how many pixels show each task's objects

--tasks is mt10, mt50 or a comma list of MetaWorld task names (e.g. reach-v3,door-open-v3).

collect: MetaWorld's scripted experts (metaworld.policies) act from the simulator state; every step stores a
primary camera image ("corner4"), a gripper camera image ("gripperPOV"), the state (hand xyz + gripper
opening), MetaWorld's 4-d action [dx, dy, dz, grab effort (+1 closes)] and the task's instruction (the
INSTRUCTIONS table). Only successful episodes are kept, each ends at its first success. The result is an
RLDS dataset <out>/1.0.0/ (internal name "metaworld") that data.py reads like any Open X-Embodiment set.

evaluate: rebuilds a policy from any nanorobot checkpoint, or a folder that export wrote (`method` names the
module, which has a `Policy.from_checkpoint(ckpt, device)`), runs N episodes of every task at once in
environments spread over worker processes, asks the policy for one batched action per step, prints the
success rate per task, and writes results.json and one rollout video per task (green border: success, red:
failure) to --out: an H.264 mp4 (PyAV), or a GIF where PyAV or its libx264 is missing (said once).

export: a checkpoint's policy as model.safetensors, config.json and stats.json (train.export), which
evaluate --ckpt loads without pickle.

pixels: for each task and camera, how many pixels of a --size image show each of the task's objects and its
goal marker (MuJoCo's segmentation rendering, mean over evaluation variations): whether a policy's image size
still shows what it must find.
Policies speak the standard 7-d action [dx, dy, dz, droll, dpitch, dyaw, gripper (1 open, 0 closed)];
to_standard_action / to_env_action convert to and from MetaWorld's action. A policy has reset(num_envs)
and act(obs, instructions) -> (N, 7), where obs holds uint8 image_primary and image_wrist (N, 3, H, W),
float32 state (N, 4) as stored in the dataset, and goal_image_primary (N, 3, H, W) if the policy sets
wants_goal_image (the last frame of the expert's successful rollout of the same variation).

From Python: default_data() returns the dataset a method trains on when given no --data (collected on
first use), and evaluate(policy, tasks, episodes, out_dir, ...) is what a method's main() calls after
training.

An episode is one seeded task variation (object and goal positions). Demonstrations use seeds from
DEMO_SEED up, evaluations from EVAL_SEED up, so a policy is never evaluated on a variation it was shown.
Rendering is MuJoCo offscreen through EGL (Mesa on a CPU machine), without shadows, reflections or
multisampling.

--suite calvin runs the official CALVIN protocol (mees/calvin evaluate_policy.py): the same 1000 chains of 5
subtasks as its get_sequences(1000), each from its seeded start scene, 360 steps per subtask, judged by
calvin_env's task oracle; it prints and writes the success rates of 1-5 subtasks in a row, the average
length and per-task successes. The simulator is calvin_env (not on PyPI; the error message says how to
install it), configured by --calvin_data's validation/.hydra/merged_config.yaml. The policy sees
image_primary (N, 3, 200, 200) and image_wrist (N, 3, 84, 84) uint8 and state = robot_obs (N, 15), with N = 1,
and is reset before every subtask; its standard action is sent as CALVIN's relative action.
"""
import argparse
import contextlib
import functools
import importlib
import io
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported
os.environ.setdefault("LP_NUM_THREADS", "1")  # Mesa: one render thread per worker process (mt10 collect: 15% faster)

import numpy as np
import mujoco
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
from metaworld.policies import ENV_POLICY_MAP
from PIL import Image, ImageDraw
from tqdm import tqdm

warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")  # the scripted experts' own

SUITES = {"mt10": list(MT10_V3), "mt50": list(ALL_V3_ENVIRONMENTS)}
PRIMARY_CAMERA = "corner4"  # of the corner cameras, the one that shows the objects largest in all 50 tasks
WRIST_CAMERA = "gripperPOV"
SIM_CAMERAS = {"image": PRIMARY_CAMERA, "wrist": WRIST_CAMERA}  # a TaskSim observation's image keys
VIEWS = {"image_primary": "image", "image_wrist": "wrist"}  # a policy's observation image key -> TaskSim's
VIDEO_EVERY = 4  # the rollout video shows every 4th step of episode 0 (and the step it succeeds)
VIDEO_FPS = 20  # its frames per second: 80 simulator steps a second
MAX_STEPS = 500  # MetaWorld's max_path_length: success at any step before it counts
DEMO_SEED = 0  # demonstration k of a task tries seeds DEMO_SEED + k + attempt * episodes
DEMO_TRIES = 10  # attempts per demonstration before the expert is declared broken on a task
EVAL_SEED = 1_000_000  # evaluation episode i uses seed EVAL_SEED + seed_offset + i
VERSION = "1.0.0"  # RLDS version directory written by collect

INSTRUCTIONS = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "move the cube from the red bin into the blue bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall from the front",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the lock to lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "turn the lock to unlock the door",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle counter-clockwise",
    "faucet-close-v3": "turn the faucet handle clockwise",
    "hammer-v3": "hit the nail into the wall with the hammer",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg up out of the hole",
    "reach-v3": "reach the goal position",
    "push-back-v3": "move the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


class EvalError(ValueError):
    """Bad input, or an evaluation that cannot go on: the message names the flag, file, method or task (and
    seed) and what was expected or went wrong."""


def parse_tasks(spec):
    """'mt10' | 'mt50' | 'reach-v3,push-v3' | a list of names -> list of MetaWorld task names."""
    if isinstance(spec, str) and spec in SUITES:
        return SUITES[spec]
    names = [t.strip() for t in spec.split(",") if t.strip()] if isinstance(spec, str) else list(spec)
    unknown = [t for t in names if t not in ALL_V3_ENVIRONMENTS]
    if unknown or not names:
        raise EvalError(f"--tasks '{spec}': unknown task(s) {unknown}; expected mt10, mt50 or a comma list "
                        f"of: {', '.join(ALL_V3_ENVIRONMENTS)}")
    return names


def to_standard_action(a):
    """MetaWorld (..., 4) [dx, dy, dz, grab effort, +1 closes] -> standard (..., 7), gripper 1 = open."""
    a = np.asarray(a, np.float32)
    return np.concatenate([a[..., :3], np.zeros(a.shape[:-1] + (3,), np.float32), (1 - a[..., 3:]) / 2], -1)


def to_env_action(s):
    """Standard (..., 7) -> MetaWorld (..., 4), clipped to its action box [-1, 1]."""
    s = np.asarray(s, np.float32)
    return np.clip(np.concatenate([s[..., :3], 1 - 2 * s[..., 6:7]], -1), -1, 1)


def check_size(size):
    if not 16 <= size <= 1024:
        raise EvalError(f"--size {size}: expected an image size of 16 to 1024 pixels")


def check_workers(workers):
    if workers is not None and workers < 1:
        raise EvalError(f"--workers {workers}: expected at least 1 process (default: one per CPU core)")


def demo_seed(k, attempt, episodes):
    return DEMO_SEED + k + attempt * episodes


def eval_seeds(episodes, seed_offset=0):
    if episodes < 1:
        raise EvalError(f"--episodes {episodes}: expected at least 1")
    if seed_offset < 0:
        raise EvalError(f"--seed_offset {seed_offset}: expected >= 0 (lower seeds belong to demonstrations)")
    return [EVAL_SEED + seed_offset + i for i in range(episodes)]


# ---------------------------------------------------------------------------------------------------
# The simulator: environments of one task in one process, one shared offscreen renderer

def make_env(task):
    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False  # the goal position is in the 39-d state: the scripted experts read it
    del env.sawyer_observation_space  # a cached property; recomputed for the goal-observable layout
    env._freeze_rand_vec = False  # new object and goal positions at every reset,
    env.seeded_rand_vec = True  # drawn from env.np_random, so env.seed(s) fixes the task variation
    env._set_task_called = True  # the variation comes from the seed, not from a metaworld.Task
    return env


def make_renderer(model, size):
    model.vis.quality.shadowsize = 0  # no shadow map,
    model.vis.quality.offsamples = 0  # no multisampling,
    model.vis.global_.offwidth = model.vis.global_.offheight = size  # and a small offscreen buffer
    renderer = mujoco.Renderer(model, size, size)
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer


class TaskSim:
    """n environments of one task. They share one renderer (~100 MB and 0.3 s each to make): the scene is
    drawn from each env's own data, and the pixels equal those of a renderer per env (checked)."""

    def __init__(self, task, size, n=1):
        self.task, self.envs = task, [make_env(task) for _ in range(n)]
        self.renderer = make_renderer(self.envs[0].model, size)
        self.expert = ENV_POLICY_MAP[task]()
        self.state = [None] * n  # each env's last 39-d MetaWorld observation (what the expert reads)

    def reset(self, i, seed, render=True):
        self.envs[i].seed(seed)  # fixes the variation drawn by the reset
        self.state[i], _ = self.envs[i].reset()
        return self.observe(i, render)

    def step(self, i, env_action, render=True):
        self.state[i], reward, _, _, info = self.envs[i].step(env_action)
        return self.observe(i, render), float(reward), bool(info["success"])

    def observe(self, i, render=True):
        """render: True (every camera), False, or the keys of SIM_CAMERAS to draw (~10 ms per camera)."""
        obs = {"state": self.state[i][:4].astype(np.float32)}  # hand xyz, gripper opening
        for key in (tuple(SIM_CAMERAS) if render is True else render or ()):
            obs[key] = self.render(i, SIM_CAMERAS[key])
        return obs

    def render(self, i, camera):  # -> uint8 (H, W, 3)
        self.renderer.update_scene(self.envs[i].data, camera=camera)
        image = self.renderer.render()
        return image[::-1, ::-1].copy() if camera.startswith("corner") else image  # corners are mounted upside down

    def expert_action(self, i):  # MetaWorld's native 4-d action
        return np.clip(self.expert.get_action(self.state[i]), -1, 1).astype(np.float32)

    def close(self):
        self.renderer.close()
        for env in self.envs:
            env.close()


def expert_rollout(sim, i, seed, render=True):
    """Scripted expert from a seeded reset to its first success -> ([(obs, action, reward), ...], success)."""
    obs, steps = sim.reset(i, seed, render), []
    for _ in range(MAX_STEPS):
        action = sim.expert_action(i)
        next_obs, reward, success = sim.step(i, action, render)
        steps.append((obs, action, reward))
        if success:
            return steps, True
        obs = next_obs
    return steps, False


SCENERY = ("world", "tablelink", "RetainingWall", "mocap")  # root bodies every task shares: floor, table, walls


def object_pixels(task, size=128, episodes=5):
    """{camera key: {object: pixels}}: how many pixels of each SIM_CAMERAS image at `size` show each of the
    task's objects (a root body that is neither the robot nor SCENERY) and its goal marker (the site "goal"),
    mean over the first `episodes` evaluation variations: how large what a policy must find is in its frames."""
    sim = TaskSim(task, size)
    model = sim.envs[0].model
    robot = model.body_rootid[model.body("right_hand").id]
    goal = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")  # -1: the task draws none
    counts = {key: {} for key in SIM_CAMERAS}
    sim.renderer.enable_segmentation_rendering()
    try:
        for seed in eval_seeds(episodes):
            sim.reset(0, seed, render=False)
            for key, camera in SIM_CAMERAS.items():
                seg = sim.render(0, camera)  # (H, W, 2): each pixel's object id and object type
                ids, kinds = seg[..., 0].ravel(), seg[..., 1].ravel()
                geoms, pixels = np.unique(ids[kinds == mujoco.mjtObj.mjOBJ_GEOM], return_counts=True)
                for geom, n in zip(geoms, pixels):
                    root = model.body_rootid[model.geom_bodyid[geom]]
                    name = model.body(root).name
                    if root != robot and name not in SCENERY:
                        counts[key][name] = counts[key].get(name, 0) + n / episodes
                if goal >= 0:
                    marker = np.sum((kinds == mujoco.mjtObj.mjOBJ_SITE) & (ids == goal))
                    counts[key]["goal marker"] = counts[key].get("goal marker", 0) + marker / episodes
    finally:
        sim.close()
    return counts


# ---------------------------------------------------------------------------------------------------
# collect: expert demonstrations -> RLDS

_SIM = None  # a collect worker's simulator for the task it last worked on


def _demo_job(job):
    """Pool worker: the k-th successful demonstration of a task as an RLDS episode (key, example)."""
    global _SIM
    task, k, episodes, size = job
    if _SIM is None or _SIM.task != task:
        if _SIM is not None:
            _SIM.close()
        _SIM = TaskSim(task, size)
    for attempt in range(DEMO_TRIES):
        seed = demo_seed(k, attempt, episodes)
        steps, success = expert_rollout(_SIM, 0, seed)
        if success:
            return f"{task}_{k:05d}", rlds_episode(task, seed, steps)
    raise RuntimeError(f"the scripted expert failed {DEMO_TRIES} times in a row on {task} (demonstration {k})")


def rlds_episode(task, seed, steps):
    T = len(steps)
    last = np.arange(T) == T - 1
    return {"steps": {
        "observation": {"image": np.stack([o["image"] for o, _, _ in steps]),  # (T, H, W, 3)
                        "wrist_image": np.stack([o["wrist"] for o, _, _ in steps]),  # (T, H, W, 3)
                        "state": np.stack([o["state"] for o, _, _ in steps])},  # (T, 4)
        "action": np.stack([a for _, a, _ in steps]),  # (T, 4)
        "reward": np.array([r for _, _, r in steps], np.float32),  # MetaWorld's shaped reward
        "discount": np.ones(T, np.float32),
        "is_first": np.arange(T) == 0, "is_last": last, "is_terminal": last,  # ends at success
        "language_instruction": [INSTRUCTIONS[task]] * T,
    }, "episode_metadata": {"task": task, "seed": seed}}


def rlds_features(size):
    import tensorflow_datasets as tfds  # lazily: workers and evaluation never need TensorFlow
    F = tfds.features
    image = lambda: F.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="jpeg")
    scalar = lambda dtype: F.Scalar(dtype=dtype)
    return F.FeaturesDict({
        "steps": F.Dataset({
            "observation": F.FeaturesDict({
                "image": image(), "wrist_image": image(),
                "state": F.Tensor(shape=(4,), dtype=np.float32, doc="hand xyz, gripper opening")}),
            "action": F.Tensor(shape=(4,), dtype=np.float32, doc="dx, dy, dz, grab effort (+1 closes)"),
            "reward": scalar(np.float32), "discount": scalar(np.float32),
            "is_first": scalar(np.bool_), "is_last": scalar(np.bool_), "is_terminal": scalar(np.bool_),
            "language_instruction": F.Text()}),
        "episode_metadata": F.FeaturesDict({"task": F.Text(), "seed": scalar(np.int64)})})


def collect(tasks="mt10", episodes=50, out="data/metaworld/mt10", size=128, workers=None):
    """Collect `episodes` successful expert demonstrations per task into the RLDS directory <out>/1.0.0.
    Written into a temporary directory and renamed at the end, so a partial run never looks finished."""
    tasks, final = parse_tasks(tasks), os.path.join(out, VERSION)
    check_size(size)
    check_workers(workers)
    if os.path.exists(final):
        raise EvalError(f"--out {out}: {final} already exists; delete it to collect again")
    if episodes < 1 or DEMO_SEED + DEMO_TRIES * episodes > EVAL_SEED:
        raise EvalError(f"--episodes {episodes}: expected 1 .. {(EVAL_SEED - DEMO_SEED) // DEMO_TRIES}")
    import torch, torchvision  # noqa: F401, before TensorFlow: importing them after it aborts the process
    import tensorflow_datasets as tfds
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # TFDS warns about its own unfinished folder while writing
    tfds.disable_progress_bar()
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=out)
    jobs = [(task, k, episodes, size) for task in tasks for k in range(episodes)]
    try:
        with mp.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
            demos = tqdm(pool.imap_unordered(_demo_job, jobs), total=len(jobs), desc="collect", unit="episode")
            with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing ..."
                tfds.dataset_builders.store_as_tfds_dataset(
                    name="metaworld", version=VERSION, features=rlds_features(size), data_dir=tmp,
                    split_datasets={"train": demos},
                    description=f"MetaWorld v3 scripted-expert demonstrations (eval_sim.py): {len(tasks)} "
                                f"tasks x {episodes} successful episodes, {size}x{size} images")
        os.rename(os.path.join(tmp, "metaworld", VERSION), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def data_dir(tasks, episodes, root="data/metaworld"):
    return os.path.join(root, f"{tasks.replace(',', '+')}_{episodes}")  # e.g. data/metaworld/mt10_50


def default_data(tasks="mt10", episodes=50, root="data/metaworld"):
    """The RLDS directory of the default MetaWorld dataset, collected first if it is not there yet."""
    out = data_dir(tasks, episodes, root)
    if not os.path.exists(os.path.join(out, VERSION)):
        print(f"eval_sim: no MetaWorld data at {out}; collecting {episodes} expert episodes per task of "
              f"'{tasks}' there (a few minutes on a 2-core machine, once)")
        collect(tasks, episodes, out)
    return os.path.join(out, VERSION)


# ---------------------------------------------------------------------------------------------------
# evaluate: a policy on N seeded episodes per task, batched over environments in worker processes

def _env_worker(conn, size):
    """Worker process: owns a share of the environments; answers 'reset' and 'step' messages. An exception
    prints its traceback here and answers ("error", task, seed, what happened)."""
    sim, task, seeds, seed = None, None, [], None
    try:
        while (msg := conn.recv())[0] != "close":
            if msg[0] == "reset":  # ("reset", task, seeds, goal, {local env index: SIM_CAMERAS keys})
                _, task, seeds, goal, cameras = msg
                if sim is not None:
                    sim.close()
                sim = TaskSim(task, size, len(seeds))
                replies = []
                for i, seed in enumerate(seeds):
                    replies.append(_reset(sim, i, seed, goal, cameras[i]))
            else:  # ("step", {local env index: standard action}, {local env index: SIM_CAMERAS keys})
                replies = {}
                for i, action in msg[1].items():
                    seed = seeds[i]
                    replies[i] = _step(sim, i, action, msg[2][i])
            conn.send(replies)
    except Exception as e:
        traceback.print_exc()
        conn.send(("error", task, seed, f"{type(e).__name__}: {e}".splitlines()[0]))
    finally:
        if sim is not None:
            sim.close()


def _reset(sim, i, seed, goal, cameras):
    obs = {"success": False}
    if goal:  # the last primary frame of the expert's rollout of this very variation (it succeeds on ~99%)
        expert_rollout(sim, i, seed, render=False)
        obs["goal"] = sim.render(i, PRIMARY_CAMERA)
    return obs | sim.reset(i, seed, _cameras(cameras)) | {"expert_action": to_standard_action(sim.expert_action(i))}


def _step(sim, i, action, cameras):
    """cameras: the SIM_CAMERAS keys to draw after the step, and "video": the primary frame if it succeeds."""
    obs, _, success = sim.step(i, to_env_action(action), _cameras(cameras))
    if success and "video" in cameras and "image" not in obs:
        obs["image"] = sim.render(i, PRIMARY_CAMERA)
    return obs | {"success": success, "expert_action": to_standard_action(sim.expert_action(i))}


def _cameras(keys):
    return tuple(k for k in keys if k != "video")


class Workers:
    """Environment worker processes; env i of a batch lives in worker i % len(workers)."""

    def __init__(self, n, size):
        ctx = mp.get_context("spawn")
        self.conns, self.procs, self.task, self.seeds = [], [], None, [[] for _ in range(n)]
        for _ in range(n):
            conn, child = ctx.Pipe()
            self.procs.append(ctx.Process(target=_env_worker, args=(child, size), daemon=True))
            self.procs[-1].start()
            self.conns.append(conn)

    def _call(self, msgs):
        """One message to each worker -> their replies; every reply is read before a failure is raised, so a
        worker that is still alive stays in step."""
        failures = [self._send(w, msg) for w, msg in enumerate(msgs)]
        replies = []
        for w, conn in enumerate(self.conns):
            reply = None
            if not failures[w]:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    failures[w] = self._died(w)
            if isinstance(reply, tuple) and reply[0] == "error":
                _, task, seed, what = reply
                failures[w] = EvalError(f"the environment worker failed on {task}, seed {seed}: {what} "
                                        f"(its traceback is printed above)")
            replies.append(reply)
        for failure in failures:
            if failure:
                raise failure
        return replies

    def _send(self, w, msg):
        try:
            self.conns[w].send(msg)
        except OSError:  # the pipe is broken: the worker is gone
            return self._died(w)

    def _died(self, w):
        """EvalError naming the task and seeds of worker w, which ended without an answer."""
        self.procs[w].join(timeout=5)
        code = self.procs[w].exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else
               f"exit status {code}" if code is not None else "it closed its pipe")
        return EvalError(f"the environment worker for {self.task} (episodes with seeds {self.seeds[w]}) died "
                         f"({how}; out of memory, or a crash in MuJoCo or its renderer?)")

    def reset(self, task, seeds, goal, cameras=lambda i: tuple(SIM_CAMERAS)):  # -> observation dicts, one per env
        """cameras(env index) -> the SIM_CAMERAS keys drawn for that env (+ "video", see _step)."""
        W = len(self.conns)
        self.task, self.seeds = task, [seeds[w::W] for w in range(W)]
        obs = [None] * len(seeds)
        msgs = [("reset", task, seeds[w::W], goal, [cameras(i) for i in range(w, len(seeds), W)]) for w in range(W)]
        for w, reply in enumerate(self._call(msgs)):
            obs[w::W] = reply
        return obs

    def step(self, actions, cameras=lambda i: tuple(SIM_CAMERAS)):
        """{env index: standard action} -> {env index: observation dict}; cameras as in reset."""
        W = len(self.conns)
        mine = lambda w: [i for i in actions if i % W == w]
        replies = self._call([("step", {i // W: actions[i] for i in mine(w)}, {i // W: cameras(i) for i in mine(w)})
                              for w in range(W)])
        return {j * W + w: obs for w, reply in enumerate(replies) for j, obs in reply.items()}

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("close",))
            except OSError:  # a worker that failed has closed its end already
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def policy_views(policy):
    """The observation image keys `policy` reads: its `views` attribute (a tuple of VIEWS keys); a policy that
    declares none is given every camera."""
    views = tuple(getattr(policy, "views", VIEWS))
    if not set(views) <= set(VIEWS):
        raise EvalError(f"policy {type(policy).__name__}: views {views} must be among {tuple(VIEWS)}")
    return views


def batch(obs, policy):
    """List of per-env observation dicts -> the policy's obs dict, batched over envs (N first); images only
    for the views the policy reads."""
    chw = lambda key: np.ascontiguousarray(np.stack([o[key] for o in obs]).transpose(0, 3, 1, 2))
    out = {view: chw(VIEWS[view]) for view in policy_views(policy)}  # uint8 (N, 3, H, W)
    out["state"] = np.stack([o["state"] for o in obs])  # float32 (N, 4)
    if getattr(policy, "wants_goal_image", False):
        out["goal_image_primary"] = chw("goal")  # uint8 (N, 3, H, W)
    if getattr(policy, "wants_expert_action", False):  # the built-in expert only
        out["expert_action"] = np.stack([o["expert_action"] for o in obs])  # (N, 7)
    return out


def act(policy, obs, instructions):
    """policy.act in its training's precision (train.precision): bf16 autocast when the policy was trained in bf16
    (its `amp_dtype`: a checkpoint's "amp_dtype", set by rebuild_policy; absent = fp32) and its device computes
    bf16 natively, with the training's attention kernel. Every Policy
    returns float32 actions: it casts the model's outputs to float32 before un-normalising them."""
    import torch
    import train
    if getattr(policy, "amp_dtype", "fp32") != "bf16" or not train.bf16_native(policy.device):
        return policy.act(obs, instructions)
    with train.precision(policy.device, torch.bfloat16):
        return policy.act(obs, instructions)


def check_actions(actions, n, method):
    ok = isinstance(actions, np.ndarray) and actions.shape == (n, 7) and np.issubdtype(actions.dtype, np.number)
    if not ok or not np.isfinite(actions).all():
        got = f"an array of shape {actions.shape}, dtype {actions.dtype}" if isinstance(actions, np.ndarray) \
            else type(actions).__name__
        raise EvalError(f"policy '{method}': act() returned {got}; expected a numpy array of shape ({n}, 7) of "
                        f"finite numbers [dx, dy, dz, droll, dpitch, dyaw, gripper]")
    return actions


def run_task(workers, policy, task, seeds, method, bar, video=True):
    """All episodes of one task at once -> (success per episode, video frames of episode 0: every
    VIDEO_EVERY-th step, the last step and the step it succeeds). Only the cameras the policy reads are drawn,
    and episode 0's primary camera on the video's steps."""
    n, instructions = len(seeds), [INSTRUCTIONS[task]] * len(seeds)
    views = tuple(VIEWS[v] for v in policy_views(policy))
    frame_step = lambda t: t % VIDEO_EVERY == 0 or t == MAX_STEPS  # t steps taken (0: the reset)

    def cameras(t):  # -> (env index -> the SIM_CAMERAS keys it draws after t steps, + "video": see _step)
        video_keys = (("image",) if frame_step(t) else ()) + ("video",)
        return lambda i: tuple(dict.fromkeys(views + video_keys)) if video and i == 0 else views

    obs = workers.reset(task, seeds, goal=getattr(policy, "wants_goal_image", False), cameras=cameras(0))
    policy.reset(n)
    success, done, frames = np.zeros(n, bool), np.zeros(n, bool), [obs[0]["image"]] if video else []
    for t in range(MAX_STEPS):
        actions = check_actions(act(policy, batch(obs, policy), instructions), n, method)
        for i, o in workers.step({i: actions[i] for i in np.flatnonzero(~done)}, cameras(t + 1)).items():
            obs[i], success[i] = obs[i] | o, o["success"]  # a step's reply updates; the reset's goal stays
            if video and i == 0 and (frame_step(t + 1) or o["success"]):
                frames.append(o["image"])
        finished = success | (t == MAX_STEPS - 1)
        if (finished & ~done).any():
            bar.update(int((finished & ~done).sum()))
        done = finished
        if done.all():
            break
    return success, frames


def video_format():
    """"mp4" when PyAV can encode H.264 here, else "gif", after one line that says why."""
    try:
        import av
        av.codec.Codec("libx264", "w")
        return "mp4"
    except (ImportError, ValueError) as e:  # no PyAV, or an FFmpeg build without libx264 (UnknownCodecError)
        print(f"eval_sim: rollout videos are GIFs, not mp4: no H.264 encoder ({type(e).__name__}: {e}); "
              f"pip install 'av>=14' (its wheels bundle FFmpeg with libx264)")
        return "gif"


def marked(frame, success):
    """uint8 (H, W, 3) -> a PIL image with the outcome drawn on it: a green border and 'success' or a red border
    and 'failure'. Padded to an even width and height, as H.264's half-resolution colour (yuv420p) needs; the
    border covers the padding."""
    color, label = ((0, 200, 0), "success") if success else ((230, 0, 0), "failure")
    h, w = frame.shape[:2]
    img = Image.new("RGB", (w + w % 2, h + h % 2))
    img.paste(Image.fromarray(frame))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=color, width=max(2, img.width // 40))
    draw.text((6, 4), label, fill=color)
    return img


def save_video(frames, success, path):
    """One rollout's frames, marked with its outcome, as an H.264 mp4 (yuv420p, PyAV), or as a GIF if `path`
    ends in .gif (evaluate's fallback where there is no H.264 encoder)."""
    images = [marked(f, success) for f in frames]
    if path.endswith(".gif"):
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // VIDEO_FPS, loop=0)
        return
    import av
    with av.open(path, "w") as video:
        stream = video.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = images[0].width, images[0].height, "yuv420p"
        stream.options = {"crf": "18"}  # x264's default is 23: 18 keeps the thin border's colour
        for image in images:
            video.mux(stream.encode(av.VideoFrame.from_image(image)))
        video.mux(stream.encode())  # the frames the encoder still holds


def evaluate(policy, tasks, episodes, out_dir=None, seed_offset=0, video=True, method="name", size=128,
             workers=None):
    """Success rate of `policy` on `episodes` seeded episodes per task; prints a table and returns
    {"success": {task: rate}, "mean": rate, ...}; with out_dir, writes results.json and a rollout video per task
    there (<task>.mp4, or <task>.gif where there is no H.264 encoder: results["videos"] names them)."""
    tasks, seeds = parse_tasks(tasks), eval_seeds(episodes, seed_offset)
    check_size(size)
    check_workers(workers)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    pool = Workers(min(workers or os.cpu_count(), episodes), size)
    bar = tqdm(total=len(tasks) * episodes, desc=f"evaluate {method}", unit="episode")
    per_task, videos, start = {}, {}, time.time()
    fmt = video_format() if video and out_dir else None
    try:
        for task in tasks:
            success, frames = run_task(pool, policy, task, seeds, method, bar, video=bool(fmt))
            per_task[task] = success.tolist()
            if fmt:
                videos[task] = f"{task}.{fmt}"
                save_video(frames, success[0], os.path.join(out_dir, videos[task]))
    finally:
        bar.close()
        pool.close()
    seconds = time.time() - start
    rates = {task: float(np.mean(s)) for task, s in per_task.items()}
    wins = int(sum(map(sum, per_task.values())))
    results = {"method": method, "episodes": episodes, "seeds": [seeds[0], seeds[-1]], "success": rates,
               "mean": float(np.mean(list(rates.values()))), "successes": wins, "total": len(tasks) * episodes,
               "interval": wilson(wins, len(tasks) * episodes), "per_episode": per_task, "videos": videos,
               "seconds": round(seconds, 1),
               "episodes_per_minute": round(60 * len(tasks) * episodes / seconds, 1)}
    print_table(results)
    if out_dir:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def wilson(successes, n, z=1.96):
    """The 95% Wilson score interval [low, high] of a success rate from n episodes (Wilson 1927): unlike
    p +- z * sqrt(p(1 - p) / n) it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    center, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (center - half) / (1 + z * z / n), (center + half) / (1 + z * z / n)
    # at 0 (n) successes the low (high) bound is exactly 0 (1); rounding would give +-1e-17 ("-0.0%")
    return [0.0 if successes == 0 else float(low), 1.0 if successes == n else float(high)]


def print_table(results):
    width = max(len(t) for t in results["success"]) + 2
    print(f"\n{'task':<{width}}success ({results['episodes']} episodes each, {results['method']})")
    for task, rate in results["success"].items():
        print(f"{task:<{width}}{100 * rate:6.1f}%")
    low, high = results["interval"]
    print(f"{'mean':<{width}}{100 * results['mean']:6.1f}%   ({results['successes']}/{results['total']}, 95% Wilson "
          f"interval {100 * low:.1f}-{100 * high:.1f}%; {results['episodes_per_minute']} episodes/min)")


# ---------------------------------------------------------------------------------------------------
# Policies: built-in ones and the ones rebuilt from checkpoints

class ExpertPolicy:
    """MetaWorld's scripted expert, through the standard-action path that learned policies take."""
    wants_expert_action, views = True, ()  # it reads the simulator's state: no camera is drawn for it

    def reset(self, num_envs):
        pass

    def act(self, obs, instructions):
        return obs["expert_action"]


class RandomPolicy:
    """Uniform random standard actions (no rotation): the floor any policy should beat."""
    views = ()  # no camera is drawn for it

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def reset(self, num_envs):
        pass

    def act(self, obs, instructions):
        n = len(instructions)
        return np.concatenate([self.rng.uniform(-1, 1, (n, 3)), np.zeros((n, 3)), self.rng.uniform(0, 1, (n, 1))], 1)


def load_policy(path, device="cpu"):
    """Checkpoint -> (policy, method name); one clear EvalError that names the checkpoint when it is missing,
    corrupt or refused, its method is unknown, or its config and weights do not fit its method's code."""
    import train  # torch and data.py: not needed by the simulator's worker processes
    try:
        ckpt = train.load_checkpoint(path)
    except train.CheckpointError as e:
        raise EvalError(f"--ckpt {e}") from None
    method = ckpt["method"]
    if not method.isidentifier():
        raise EvalError(f"--ckpt {path}: method '{method}' is not a module name; expected the name of a nanorobot "
                        f"method file such as rt1, gcbc, hpt, gr1 or mcr")
    try:
        module = importlib.import_module(method)
    except ModuleNotFoundError as e:
        if e.name != method:
            raise
        raise EvalError(f"--ckpt {path}: method '{method}' is unknown (no module {method}.py); expected the "
                        f"name of a nanorobot method file such as rt1, gcbc, hpt, gr1 or mcr")
    if not hasattr(module, "Policy"):
        raise EvalError(f"--ckpt {path}: module '{method}' has no Policy class; expected a nanorobot method file")
    return rebuild_policy(module, ckpt, device, path), method


def export(ckpt, out):
    """train.export with its errors as EvalErrors naming the flag: the checkpoint's policy into the folder `out`."""
    import train
    try:
        return train.export(ckpt, out)
    except train.CheckpointError as e:
        raise EvalError(f"--ckpt {e}") from None
    except train.RunError as e:
        raise EvalError(f"--out {e}") from None


def rebuild_policy(module, ckpt, device, path):
    """module.Policy.from_checkpoint(ckpt, device); what it raises on a checkpoint that does not fit the
    method's code becomes one EvalError naming the checkpoint and what is wrong."""
    import torch
    import train
    method = f"{module.__name__}.Policy.from_checkpoint"
    try:
        policy = module.Policy.from_checkpoint(ckpt, device)
        policy.amp_dtype = ckpt.get("amp_dtype", "fp32")  # the training's autocast dtype (older checkpoints: fp32)
        if ckpt.get("channels_last"):  # NHWC convolutions, as in training (older checkpoints: NCHW)
            policy.model.to(memory_format=torch.channels_last)
        return policy
    except KeyError as e:
        raise EvalError(f"--ckpt {path}: lacks the key {e} that {method} reads (written by another version of "
                        f"{module.__name__}.py?)") from None
    except TypeError as e:
        raise EvalError(f"--ckpt {path}: its config does not fit {method} ({train.one_line(e)})") from None
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise EvalError(f"--ckpt {path}: its weights do not fit the model its config builds "
                        f"({train.state_dict_misfit(e)})") from None
    except (ValueError, IndexError) as e:
        raise EvalError(f"--ckpt {path}: {method}: {train.one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------
# CALVIN: the long-horizon benchmark of mees/calvin (calvin_agent/evaluation/) on calvin_env
#
# A chain is 5 language instructions from one of 192 symbolic start scenes; every subtask gets EP_LEN steps,
# calvin_env's task oracle judges it, the chain stops at its first failure and the scene is not reset
# between subtasks. The chains, the scene reset and the metrics are re-implemented here (the chains are
# checked against the official generator in tests/test_calvin_eval.py); the simulator and the task oracle
# come from calvin_env, which users install from its repository (it is not on PyPI).

CALVIN_EP_LEN = 360  # EP_LEN of evaluate_policy.py: steps per subtask
CALVIN_SEQUENCES = 1000  # NUM_SEQUENCES: chains in the benchmark
CALVIN_CHAIN = 5  # subtasks per chain
CALVIN_ENV_FIX = "797142c"  # calvin_env "fix bug in button during rollouts" (calvin issue 32): evaluate at or after
CALVIN_BLOCKS = ("red", "blue", "pink")
CALVIN_INSTALL = (
    "the CALVIN evaluation needs calvin_env (not on PyPI): git clone --recursive https://github.com/mees/calvin_env "
    f"(at or after commit {CALVIN_ENV_FIX}, which fixes the LED button reset), then pip install -e calvin_env; and "
    "--calvin_data, a CALVIN dataset root (task_ABC_D, task_D_D, ...) whose validation/.hydra/merged_config.yaml "
    "describes the scene, cameras and robot (evaluate_policy.py builds the env from it; nothing else there is read)")

# The instruction of each task: the first (only) sentence in conf/annotations/new_playtable_validation.yaml.
CALVIN_INSTRUCTIONS = {
    "rotate_red_block_right": "take the red block and rotate it to the right",
    "rotate_red_block_left": "take the red block and rotate it to the left",
    "rotate_blue_block_right": "take the blue block and rotate it to the right",
    "rotate_blue_block_left": "take the blue block and rotate it to the left",
    "rotate_pink_block_right": "take the pink block and rotate it to the right",
    "rotate_pink_block_left": "take the pink block and rotate it to the left",
    "push_red_block_right": "go push the red block right",
    "push_red_block_left": "go push the red block left",
    "push_blue_block_right": "go push the blue block right",
    "push_blue_block_left": "go push the blue block left",
    "push_pink_block_right": "go push the pink block right",
    "push_pink_block_left": "go push the pink block left",
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    "lift_red_block_table": "grasp and lift the red block",
    "lift_blue_block_table": "grasp and lift the blue block",
    "lift_pink_block_table": "grasp and lift the pink block",
    "lift_red_block_slider": "lift the red block from the sliding cabinet",
    "lift_blue_block_slider": "lift the blue block from the sliding cabinet",
    "lift_pink_block_slider": "lift the pink block from the sliding cabinet",
    "lift_red_block_drawer": "Take the red block from the drawer",
    "lift_blue_block_drawer": "Take the blue block from the drawer",
    "lift_pink_block_drawer": "Take the pink block from the drawer",
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


def calvin_tasks():
    """Task name -> (category, rules) as `tasks` and `task_categories` of multistep_sequences.py. A rule is
    (precondition, effect) on the symbolic scene: the precondition maps keys to their allowed values, the
    effect to new values. The order is the official one, and it matters: chains are drawn by index into it."""
    free, holding = {"grasped": (0,)}, {"grasped": (1,)}
    on = lambda block, *places: {f"{block}_block": places}
    tasks = {}
    for verb in ("rotate", "push"):  # the block stays on the table
        for b in CALVIN_BLOCKS:
            for side in ("right", "left"):
                tasks[f"{verb}_{b}_block_{side}"] = (1, [(on(b, "table") | free, {f"{b}_block": "table"})])
    tasks["move_slider_left"] = (2, [({"slider": ("right",)} | free, {"slider": "left"})])
    tasks["move_slider_right"] = (2, [({"slider": ("left",)} | free, {"slider": "right"})])
    tasks["open_drawer"] = (3, [({"drawer": ("closed",)} | free, {"drawer": "open"})])
    tasks["close_drawer"] = (3, [({"drawer": ("open",)} | free, {"drawer": "closed"})])
    for b in CALVIN_BLOCKS:
        lift = {f"{b}_block": "grasped", "grasped": 1}
        tasks[f"lift_{b}_block_table"] = (4, [(on(b, "table") | free, lift)])
        tasks[f"lift_{b}_block_slider"] = (5, [  # the door must have slid away from the block's side
            (on(b, "slider_left") | {"slider": ("right",)} | free, lift),
            (on(b, "slider_right") | {"slider": ("left",)} | free, lift)])
        tasks[f"lift_{b}_block_drawer"] = (6, [(on(b, "drawer") | {"drawer": ("open",)} | free, lift)])
    tasks["place_in_slider"] = (7, [(on(b, "grasped") | {"slider": (side,)} | holding,
                                     {f"{b}_block": f"slider_{side}", "grasped": 0})
                                    for b in CALVIN_BLOCKS for side in ("right", "left")])
    tasks["place_in_drawer"] = (7, [(on(b, "grasped") | {"drawer": ("open",)} | holding,
                                     {f"{b}_block": "drawer", "grasped": 0}) for b in CALVIN_BLOCKS])
    pairs = list(itertools.permutations(CALVIN_BLOCKS, 2))  # (top, bottom): red-blue, red-pink, blue-red, ...
    tasks["stack_block"] = (10, [(on(t, "grasped") | on(u, "table") | holding,
                                  {f"{t}_block": "stacked_top", f"{u}_block": "stacked_bottom", "grasped": 0})
                                 for t, u in pairs])
    tasks["unstack_block"] = (11, [(on(t, "stacked_top") | on(u, "stacked_bottom") | free,
                                    {f"{t}_block": "table", f"{u}_block": "table"}) for t, u in pairs])
    for light in ("lightbulb", "led"):
        tasks[f"turn_on_{light}"] = (8, [({light: (0,)} | free, {light: 1})])
        tasks[f"turn_off_{light}"] = (8, [({light: (1,)} | free, {light: 0})])
    tasks["push_into_drawer"] = (9, [  # the other two blocks must sit in the sliding cabinet
        (on(b, "table") | {f"{o}_block": ("slider_right", "slider_left") for o in CALVIN_BLOCKS if o != b}
         | {"drawer": ("open",)} | free, {f"{b}_block": "drawer", "grasped": 0}) for b in CALVIN_BLOCKS])
    return tasks


CALVIN_TASKS = calvin_tasks()


def calvin_initial_states():
    """The 192 symbolic start scenes of get_sequences: LED, light bulb, sliding door and drawer in either state,
    one or two blocks on the table, the others in the sliding cabinet, at most one per side. Key order and
    value types matter: str(state.values()) seeds the scene reset."""
    values = {"led": [0, 1], "lightbulb": [0, 1], "slider": ["right", "left"], "drawer": ["closed", "open"],
              **{f"{b}_block": ["table", "slider_right", "slider_left"] for b in CALVIN_BLOCKS}, "grasped": [0]}
    ok = lambda v: v.count("table") in (1, 2) and v.count("slider_right") < 2 and v.count("slider_left") < 2
    return [dict(zip(values, v)) for v in itertools.product(*values.values()) if ok(v)]


def calvin_next_state(state, task):
    """The symbolic scene after `task`, or None unless exactly one of its rules applies (check_sequence)."""
    outcomes = [state | effect for condition, effect in CALVIN_TASKS[task][1]
                if all(state[key] in allowed for key, allowed in condition.items())]
    return outcomes[0] if len(outcomes) == 1 else None


@functools.lru_cache
def calvin_scene_graph():
    """Every symbolic scene reachable from the 192 start scenes (they come first, 2160 in all) and
    table[scene, task]: the index of the scene after the task, or -1 where calvin_next_state gives None.
    An extra last row of -1 keeps a failed chain failed (index -1 reads it). Built once; callers only read it."""
    scenes = calvin_initial_states()
    index = {tuple(scene.values()): i for i, scene in enumerate(scenes)}
    table = []
    for scene in scenes:  # the list grows while it is read: breadth first
        row = []
        for task in CALVIN_TASKS:
            after = calvin_next_state(scene, task)
            if after is not None and tuple(after.values()) not in index:
                index[tuple(after.values())] = len(scenes)
                scenes.append(after)
            row.append(-1 if after is None else index[tuple(after.values())])
        table.append(row)
    return np.array(table + [[-1] * len(CALVIN_TASKS)])  # (2161, 34)


def calvin_chains_for_state(i, n, batch=4096):
    """get_sequences_for_state2 for start scene i: the first n valid chains among 5-task draws from the
    legacy RNG seeded with i (the official np.random.seed(i) in a worker process; RandomState(i) is the same
    stream). A chain is valid when every task's precondition holds with a unique outcome in turn and the 5
    categories differ. Most draws fail (~46k per scene for 5 or 6 chains), so they are made `batch` at a time
    and checked at once; drawing past the n-th valid chain is harmless, the RNG is this scene's own."""
    names, table = list(CALVIN_TASKS), calvin_scene_graph()
    category = np.array([CALVIN_TASKS[task][0] for task in names])
    rng, chains = np.random.RandomState(i), []
    while len(chains) < n:
        draws = np.tile(np.arange(len(names)), (batch, 1))  # (batch, 34)
        for row in draws:  # np.random.choice(names, 5, replace=False) is permutation(34)[:5], i.e. these
            rng.shuffle(row)  # shuffles of arange(34), without choice's per-call overhead
        draws = draws[:, :CALVIN_CHAIN]  # (batch, 5) task indices
        scene = np.full(batch, i)
        for k in range(CALVIN_CHAIN):
            scene = table[scene, draws[:, k]]  # -1 once a precondition fails
        distinct = (np.diff(np.sort(category[draws], 1), axis=1) != 0).all(1)
        chains += [tuple(names[t] for t in row) for row in draws[(scene >= 0) & distinct]]
    return chains[:n]


@functools.lru_cache
def calvin_sequences(num_sequences=CALVIN_SEQUENCES):
    """get_sequences(num_sequences): [(start scene, chain of 5 task names)], the same list, in the same order,
    as the official generator. The chains are split as evenly as possible over the 192 scenes, then shuffled
    with the legacy RNG seeded 0. Pure NumPy and deterministic; ~10 s for 1000 chains on one core."""
    states = calvin_initial_states()
    counts = [len(part) for part in np.array_split(range(num_sequences), len(states))]
    sequences = [(state, chain) for i, (state, n) in enumerate(zip(states, counts))
                 for chain in calvin_chains_for_state(i, n)]
    np.random.RandomState(0).shuffle(sequences)
    return sequences


def fnv1_32(data, seed=2166136261):
    """32-bit FNV-1 (multiply by the FNV prime, then xor each byte) from `seed`, the FNV offset basis by
    default."""
    h = seed
    for byte in data:
        h = ((h * 16777619) & 0xFFFFFFFF) ^ byte
    return h


def calvin_reset_seed(state):
    """The seed of a start scene's reset: pyhash.fnv1_32()(str(state.values())) in utils.py. pyhash (0.9.3,
    Python 3 on Linux) starts from 0, not from the offset basis, and hashes a str as its UTF-16-LE code
    units; checked against a pyhash build."""
    return fnv1_32(str(state.values()).encode("utf-16-le"), seed=0)


CALVIN_ROBOT_START = np.array([  # robot_obs of every reset: tcp xyz, tcp euler xyz, gripper width, 7 joints, open
    0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
    -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])


def calvin_reset_state(state):
    """Start scene -> (robot_obs (15,), scene_obs (24,)) as get_env_state_for_initial_condition in utils.py:
    door, drawer and lights from the scene, blocks on their cabinet side or on one of two table spots (which
    block gets which spot is shuffled), block yaw uniform in pi/2 +- pi/8, all from the scene's own seed."""
    rng = np.random.RandomState(calvin_reset_seed(state))
    slider_left, slider_right = [-0.240851662, 0.0924044687, 0.460990009], [0.070341633, 0.0924044687, 0.460990009]
    table = [np.array([0.0500000896, -0.120000177, 0.459990009]), np.array([0.229995412, -0.11999514, 0.45999001])]
    rng.shuffle(table)
    spot = {"slider_left": slider_left, "slider_right": slider_right}
    scene = np.zeros(24)  # door, drawer, button, switch, lightbulb, LED, then each block's xyz + euler xyz
    scene[0] = 0.28 if state["slider"] == "left" else 0.0
    scene[1] = 0.22 if state["drawer"] == "open" else 0.0
    scene[3] = 0.088 if state["lightbulb"] == 1 else 0.0
    scene[4], scene[5] = state["lightbulb"], state["led"]
    # a block on the table: red on the first spot, pink on the second, blue on whichever red leaves free
    table_spot = {"red": table[0], "blue": table[1] if state["red_block"] == "table" else table[0], "pink": table[1]}
    for k, b in enumerate(CALVIN_BLOCKS):
        scene[6 + 6 * k:9 + 6 * k] = spot.get(state[f"{b}_block"], table_spot[b])
        scene[11 + 6 * k] = rng.uniform(np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
    return CALVIN_ROBOT_START.copy(), scene


def calvin_policy_obs(obs):
    """calvin_env observation -> the policy's obs dict for one environment."""
    rgb = obs["rgb_obs"]
    return {"image_primary": np.ascontiguousarray(rgb["rgb_static"].transpose(2, 0, 1)[None]),  # uint8 (1, 3, 200, 200)
            "image_wrist": np.ascontiguousarray(rgb["rgb_gripper"].transpose(2, 0, 1)[None]),  # uint8 (1, 3, 84, 84)
            "state": np.asarray(obs["robot_obs"], np.float32)[None]}  # (1, 15) robot_obs


def to_calvin_action(action):
    """Standard (7,) -> CALVIN's relative action: the 6 pose numbers as they are (rel_actions' scaling; calvin_env
    multiplies them by 0.02 m and 0.05 rad), gripper +1 open if above 0.5 else -1 closed."""
    return np.concatenate([action[:6], [1.0 if action[6] > 0.5 else -1.0]]).astype(np.float64)


def calvin_rollout(env, oracle, policy, task, ep_len, method):
    """One subtask from wherever the scene is (evaluate_policy.rollout) -> success. The policy is reset, the
    oracle compares every step's info with the info at the subtask's start."""
    obs, instruction = env.get_obs(), CALVIN_INSTRUCTIONS[task]
    policy.reset(1)
    start = env.get_info()
    for _ in range(ep_len):
        action = check_actions(act(policy, calvin_policy_obs(obs), [instruction]), 1, method)[0]
        obs, _, _, info = env.step(to_calvin_action(action))
        if oracle.get_task_info_for_set(start, info, {task}):
            return True
    return False


def calvin_chain(env, oracle, policy, state, chain, ep_len, method):
    """One chain (evaluate_sequence) -> number of subtasks done in a row, 0-5. Only the chain's start resets
    the scene; a subtask starts where the previous one ended."""
    robot_obs, scene_obs = calvin_reset_state(state)
    env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
    for done, task in enumerate(chain):
        if not calvin_rollout(env, oracle, policy, task, ep_len, method):
            return done
    return len(chain)


def calvin_metrics(sequences, completed):
    """The official metrics (count_success, print_and_save): the rate of chains with at least i subtasks
    done for i = 1..5, the average length (mean subtasks done = the sum of those five rates) and per task its
    successes out of its attempts (the subtasks done and the one that failed)."""
    completed = np.asarray(completed)
    tasks = {}
    for (_, chain), n in zip(sequences, completed):
        for k, task in enumerate(chain[:n + 1]):
            count = tasks.setdefault(task, {"success": 0, "total": 0})
            count["success"], count["total"] = count["success"] + int(k < n), count["total"] + 1
    return {"avg_len": float(completed.mean()),
            "chain_sr": {str(i): float((completed >= i).mean()) for i in range(1, CALVIN_CHAIN + 1)},
            "task_info": dict(sorted(tasks.items()))}


def run_calvin(env, oracle, policy, sequences, ep_len=CALVIN_EP_LEN, method="name"):
    """Every chain in turn on one environment -> subtasks done per chain; the bar shows the running rates."""
    completed = []
    with tqdm(sequences, desc=f"calvin {method}", unit="chain") as bar:
        for state, chain in bar:
            completed.append(calvin_chain(env, oracle, policy, state, chain, ep_len, method))
            bar.set_postfix_str(" ".join(f"{i}/5 {100 * np.mean(np.array(completed) >= i):.0f}%"
                                         for i in range(1, CALVIN_CHAIN + 1)))
    return completed


def calvin_validation_folder(calvin_data):
    """--calvin_data (a CALVIN dataset root, or its validation folder) -> the folder get_env reads."""
    for folder in (os.path.join(calvin_data, "validation"), calvin_data):
        if os.path.isfile(os.path.join(folder, ".hydra", "merged_config.yaml")):
            return folder
    raise EvalError(f"--calvin_data {calvin_data}: no validation/.hydra/merged_config.yaml there; expected a CALVIN "
                    f"dataset root such as task_ABC_D (the validation folder's config describes the scene, cameras "
                    f"and robot that calvin_env builds)")


def calvin_env_commit(package_dir):
    """The git commit calvin_env is installed from; an EvalError if it predates the LED reset fix."""
    git = lambda *args: subprocess.run(["git", "-C", package_dir, *args], capture_output=True, text=True)
    try:
        head, fixed = git("rev-parse", "HEAD"), git("merge-base", "--is-ancestor", CALVIN_ENV_FIX, "HEAD")
    except OSError:  # no git on this machine
        return "unknown"
    if head.returncode != 0:  # not installed from a git checkout
        return "unknown"
    if fixed.returncode == 1:
        raise EvalError(f"calvin_env at {package_dir} is at commit {head.stdout.strip()[:7]}, before {CALVIN_ENV_FIX} "
                        f"(the LED button reset fix, calvin issue 32); expected it at or after: git pull there")
    return head.stdout.strip()


def make_calvin_env(calvin_data):
    """calvin_env's simulator of the dataset's validation scene with the static and gripper cameras (as GR-1's
    evaluation builds it; the official make_env also renders the tactile sensors, which no policy here reads)
    and its task oracle (conf/tasks/new_playtable_tasks.yaml, the same file as calvin's rollout tasks)
    -> (env, oracle, calvin_env commit)."""
    try:
        import calvin_env
        from calvin_env.envs.play_table_env import get_env
        from calvin_env.envs.tasks import Tasks
        from omegaconf import OmegaConf
    except ImportError as e:
        raise EvalError(f"{CALVIN_INSTALL} (import failed: {e})")
    folder, root = calvin_validation_folder(calvin_data), os.path.dirname(os.path.dirname(calvin_env.__file__))
    tasks = os.path.join(root, "conf", "tasks", "new_playtable_tasks.yaml")
    if not os.path.isfile(tasks):
        raise EvalError(f"{CALVIN_INSTALL} (calvin_env at {root} has no conf/tasks/new_playtable_tasks.yaml: "
                        f"install it editable from the git checkout)")
    commit = calvin_env_commit(root)
    env = get_env(folder, obs_space={"rgb_obs": ["rgb_static", "rgb_gripper"], "depth_obs": []}, show_gui=False)
    oracle = Tasks(OmegaConf.load(tasks).tasks)
    return env, oracle, commit


def check_calvin_args(num_sequences, ep_len):
    if num_sequences < 1:
        raise EvalError(f"--num_sequences {num_sequences}: expected at least 1 (the benchmark is {CALVIN_SEQUENCES})")
    if ep_len < 1:
        raise EvalError(f"--ep_len {ep_len}: expected at least 1 step per subtask (the benchmark is {CALVIN_EP_LEN})")


def evaluate_calvin(policy, calvin_data, out_dir=None, num_sequences=CALVIN_SEQUENCES, ep_len=CALVIN_EP_LEN,
                    method="name"):
    """The CALVIN long-horizon benchmark: prints the chain success rates, average length and per-task
    successes, and returns them; with out_dir, writes results.json there (with every chain's outcome)."""
    check_calvin_args(num_sequences, ep_len)
    env, oracle, commit = make_calvin_env(calvin_data)
    sequences, start = calvin_sequences(num_sequences), time.time()
    completed = run_calvin(env, oracle, policy, sequences, ep_len, method)
    results = {"suite": "calvin", "method": method, "num_sequences": num_sequences, "ep_len": ep_len,
               "calvin_data": calvin_data, "calvin_env_commit": commit, **calvin_metrics(sequences, completed),
               "chains": [{"state": s, "tasks": list(c), "completed": n} for (s, c), n in zip(sequences, completed)],
               "seconds": round(time.time() - start, 1)}
    print_calvin_table(results)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def print_calvin_table(results):
    print(f"\nCALVIN, {results['num_sequences']} chains of {CALVIN_CHAIN}, {results['ep_len']} steps per subtask "
          f"({results['method']})")
    print("tasks done in a row: " + "  ".join(f"{i}: {100 * r:5.1f}%" for i, r in results["chain_sr"].items()))
    print(f"average length: {results['avg_len']:.3f} (of {CALVIN_CHAIN})\n")
    width = max(map(len, results["task_info"])) + 2
    for task, count in results["task_info"].items():
        success, total = count["success"], count["total"]
        print(f"{task:<{width}}{success:4d} / {total:<4d} {100 * success / total:5.1f}%")


def print_pixels(tasks, size, episodes):
    """`pixels`: object_pixels of every task, one line per task and camera, largest object first."""
    check_size(size)
    print(f"pixels of a {size} x {size} image ({size * size:,}) that show each object, mean of {episodes} "
          f"evaluation variations")
    tasks = parse_tasks(tasks)
    width = max(map(len, tasks)) + 2
    for task in tasks:
        for key, counts in object_pixels(task, size, episodes).items():
            shown = sorted(counts.items(), key=lambda kv: -kv[1])
            print(f"{task:<{width}}{key:<7}" + "  ".join(f"{name} {n:.1f}" for name, n in shown))


def device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="scripted-expert demonstrations -> RLDS")
    c.add_argument("--out", default=None, help="output folder (default data/metaworld/<tasks>_<episodes>)")
    c.add_argument("--episodes", type=int, default=50, help="successful episodes per task")
    e = sub.add_parser("evaluate", help="success rate of a checkpoint or a built-in policy")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--ckpt", help="checkpoint of any nanorobot method, or a folder that export wrote")
    who.add_argument("--policy", choices=["expert", "random"], help="a built-in policy")
    e.add_argument("--episodes", type=int, default=20, help="episodes per task")
    e.add_argument("--out", default=None, help="results.json and videos (default: beside the checkpoint)")
    e.add_argument("--seed_offset", type=int, default=0, help="evaluation seeds start at 1_000_000 + this")
    e.add_argument("--no_video", action="store_true", help="skip the per-task rollout videos")
    e.add_argument("--suite", choices=["metaworld", "calvin"], default="metaworld",
                   help="metaworld (--tasks, --episodes, ...) or the CALVIN long-horizon benchmark (needs calvin_env)")
    e.add_argument("--calvin_data", default=None, help="CALVIN dataset root whose validation/ folder configures the "
                                                       "simulator (calvin only)")
    e.add_argument("--num_sequences", type=int, default=CALVIN_SEQUENCES, help="chains of 5 subtasks (calvin only)")
    e.add_argument("--ep_len", type=int, default=CALVIN_EP_LEN, help="steps per subtask (calvin only)")
    x = sub.add_parser("export", help="a checkpoint's policy as model.safetensors, config.json and stats.json")
    x.add_argument("--ckpt", required=True, help="checkpoint of any nanorobot method")
    x.add_argument("--out", required=True, help="folder for the three files (evaluate --ckpt takes it)")
    px = sub.add_parser("pixels", help="pixels each task's objects cover in each camera image (what 64 px still shows)")
    px.add_argument("--episodes", type=int, default=5, help="evaluation variations to average over")
    for s in (c, e, px):
        s.add_argument("--tasks", default="mt10", help="mt10, mt50 or a comma list of task names")
        s.add_argument("--size", type=int, default=128, help="camera image height and width (pixels)")
    for s in (c, e):
        s.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    args = p.parse_args(argv)
    try:
        if args.command == "collect":
            out, start = args.out or data_dir(args.tasks, args.episodes), time.time()
            path = collect(args.tasks, args.episodes, out, args.size, args.workers)
            print(f"wrote {path} in {(time.time() - start) / 60:.1f} min")
        elif args.command == "pixels":
            print_pixels(args.tasks, args.size, args.episodes)
        elif args.command == "export":
            export(args.ckpt, args.out)
            print(f"wrote model.safetensors, config.json and stats.json to {args.out}")
        elif args.suite == "calvin":
            check_calvin_args(args.num_sequences, args.ep_len)
            if args.policy == "expert":
                raise EvalError("--policy expert: CALVIN has no scripted expert; expected --ckpt or --policy random")
            if args.calvin_data is None:
                raise EvalError(f"--calvin_data: required with --suite calvin; {CALVIN_INSTALL}")
            policy, method = load_policy(args.ckpt, device()) if args.ckpt else (RandomPolicy(), args.policy)
            out = args.out or (os.path.join(os.path.dirname(os.path.normpath(args.ckpt)), "eval_calvin") if args.ckpt
                               else os.path.join("runs", f"eval_calvin_{args.policy}"))
            evaluate_calvin(policy, args.calvin_data, out, args.num_sequences, args.ep_len, method)
            print(f"results.json in {out}")
        else:
            if args.ckpt:
                policy, method = load_policy(args.ckpt, device())
            else:
                policy, method = (ExpertPolicy() if args.policy == "expert" else RandomPolicy()), args.policy
            out = args.out or (os.path.join(os.path.dirname(os.path.normpath(args.ckpt)), "eval") if args.ckpt
                               else os.path.join("runs", f"eval_{args.policy}"))
            evaluate(policy, args.tasks, args.episodes, out, args.seed_offset, not args.no_video, method,
                     args.size, args.workers)
            print(f"results.json and videos in {out}")
    except EvalError as err:  # one line and exit status 2, as train.cli does for the method files
        print(f"eval_sim.py: {err}", file=sys.stderr)
        error = SystemExit(f"eval_sim.py: {err}")
        error.code = 2
        raise error


if __name__ == "__main__":
    main()

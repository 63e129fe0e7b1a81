"""eval_sim.py: MetaWorld (v3, MuJoCo) expert demonstrations as RLDS, and batched policy evaluation.

    python eval_sim.py collect --tasks mt10 --episodes 50 --out data/metaworld/mt10
    python eval_sim.py evaluate --ckpt runs/rt1/ckpt.pt --tasks mt10 --episodes 20
    python eval_sim.py evaluate --policy expert --tasks reach-v3,push-v3 --episodes 10

--tasks is mt10, mt50 or a comma list of MetaWorld task names (e.g. reach-v3,door-open-v3).

collect: MetaWorld's scripted experts (metaworld.policies) act from the simulator state; every step stores a
primary camera image ("corner4"), a gripper camera image ("gripperPOV"), the state (hand xyz + gripper
opening), MetaWorld's 4-d action [dx, dy, dz, grab effort (+1 closes)] and the task's instruction (the
INSTRUCTIONS table). Only successful episodes are kept, each ends at its first success. The result is an
RLDS dataset <out>/1.0.0/ (internal name "metaworld") that data.py reads like any Open X-Embodiment set.

evaluate: rebuilds a policy from any nanorobot checkpoint (`method` names the module, which has a
`Policy.from_checkpoint(ckpt, device)`), runs N episodes of every task at once in environments spread over
worker processes, asks the policy for one batched action per step, prints the success rate per task,
and writes results.json and one GIF per task (green border: success, red: failure) to --out.
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
"""
import argparse
import contextlib
import importlib
import io
import json
import multiprocessing as mp
import os
import shutil
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
    """Bad input: the message names the flag, file or method and what was expected."""


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
        obs = {"state": self.state[i][:4].astype(np.float32)}  # hand xyz, gripper opening
        if render:
            obs["image"], obs["wrist"] = self.render(i, PRIMARY_CAMERA), self.render(i, WRIST_CAMERA)
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
    """Worker process: owns a share of the environments; answers 'reset' and 'step' messages."""
    sim = None
    try:
        while (msg := conn.recv())[0] != "close":
            if msg[0] == "reset":
                _, task, seeds, goal = msg
                if sim is not None:
                    sim.close()
                sim = TaskSim(task, size, len(seeds))
                conn.send([_reset(sim, i, seed, goal) for i, seed in enumerate(seeds)])
            else:  # ("step", {local env index: standard action})
                conn.send({i: _step(sim, i, a) for i, a in msg[1].items()})
    except Exception:
        conn.send(RuntimeError(f"environment worker failed:\n{traceback.format_exc()}"))
    finally:
        if sim is not None:
            sim.close()


def _reset(sim, i, seed, goal):
    obs = {"success": False}
    if goal:  # the last primary frame of the expert's rollout of this very variation (it succeeds on ~99%)
        expert_rollout(sim, i, seed, render=False)
        obs["goal"] = sim.render(i, PRIMARY_CAMERA)
    return obs | sim.reset(i, seed) | {"expert_action": to_standard_action(sim.expert_action(i))}


def _step(sim, i, action):
    obs, _, success = sim.step(i, to_env_action(action))
    return obs | {"success": success, "expert_action": to_standard_action(sim.expert_action(i))}


class Workers:
    """Environment worker processes; env i of a batch lives in worker i % len(workers)."""

    def __init__(self, n, size):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(n):
            conn, child = ctx.Pipe()
            self.procs.append(ctx.Process(target=_env_worker, args=(child, size), daemon=True))
            self.procs[-1].start()
            self.conns.append(conn)

    def _call(self, msgs):
        for conn, msg in zip(self.conns, msgs):
            conn.send(msg)
        replies = [conn.recv() for conn in self.conns]
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def reset(self, task, seeds, goal):  # -> list of observation dicts, one per env
        W = len(self.conns)
        obs = [None] * len(seeds)
        for w, reply in enumerate(self._call([("reset", task, seeds[w::W], goal) for w in range(W)])):
            obs[w::W] = reply
        return obs

    def step(self, actions):  # {env index: standard action} -> {env index: observation dict}
        W = len(self.conns)
        replies = self._call([("step", {i // W: a for i, a in actions.items() if i % W == w}) for w in range(W)])
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


def batch(obs, policy):
    """List of per-env observation dicts -> the policy's obs dict, batched over envs (N first)."""
    chw = lambda key: np.ascontiguousarray(np.stack([o[key] for o in obs]).transpose(0, 3, 1, 2))
    out = {"image_primary": chw("image"), "image_wrist": chw("wrist"),  # uint8 (N, 3, H, W)
           "state": np.stack([o["state"] for o in obs])}  # float32 (N, 4)
    if getattr(policy, "wants_goal_image", False):
        out["goal_image_primary"] = chw("goal")  # uint8 (N, 3, H, W)
    if getattr(policy, "wants_expert_action", False):  # the built-in expert only
        out["expert_action"] = np.stack([o["expert_action"] for o in obs])  # (N, 7)
    return out


def check_actions(actions, n, method):
    ok = isinstance(actions, np.ndarray) and actions.shape == (n, 7) and np.issubdtype(actions.dtype, np.number)
    if not ok or not np.isfinite(actions).all():
        got = f"an array of shape {actions.shape}, dtype {actions.dtype}" if isinstance(actions, np.ndarray) \
            else type(actions).__name__
        raise EvalError(f"policy '{method}': act() returned {got}; expected a numpy array of shape ({n}, 7) of "
                        f"finite numbers [dx, dy, dz, droll, dpitch, dyaw, gripper]")
    return actions


def run_task(workers, policy, task, seeds, method, bar):
    """All episodes of one task at once -> (success per episode, frames of episode 0)."""
    n, instructions = len(seeds), [INSTRUCTIONS[task]] * len(seeds)
    obs = workers.reset(task, seeds, goal=getattr(policy, "wants_goal_image", False))
    policy.reset(n)
    success, done, frames = np.zeros(n, bool), np.zeros(n, bool), [obs[0]["image"]]
    for t in range(MAX_STEPS):
        actions = check_actions(policy.act(batch(obs, policy), instructions), n, method)
        for i, o in workers.step({i: actions[i] for i in np.flatnonzero(~done)}).items():
            obs[i], success[i] = obs[i] | o, o["success"]  # a step's reply updates; the reset's goal stays
        if not done[0]:
            frames.append(obs[0]["image"])
        finished = success | (t == MAX_STEPS - 1)
        if (finished & ~done).any():
            bar.update(int((finished & ~done).sum()))
        done = finished
        if done.all():
            break
    return success, frames


def save_video(frames, success, path, every=4):
    """GIF of one rollout; a green border and 'success' or a red border and 'failure' mark the outcome."""
    color, label = ((0, 200, 0), "success") if success else ((230, 0, 0), "failure")
    images = []
    for f in frames[::every] + frames[-1:]:
        img = Image.fromarray(f)
        draw = ImageDraw.Draw(img)
        draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=color, width=max(2, img.width // 40))
        draw.text((6, 4), label, fill=color)
        images.append(img)
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0)


def evaluate(policy, tasks, episodes, out_dir=None, seed_offset=0, video=True, method="name", size=128,
             workers=None):
    """Success rate of `policy` on `episodes` seeded episodes per task; prints a table and returns
    {"success": {task: rate}, "mean": rate, ...}; with out_dir, writes results.json and <task>.gif there."""
    tasks, seeds = parse_tasks(tasks), eval_seeds(episodes, seed_offset)
    check_size(size)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    pool = Workers(min(workers or os.cpu_count(), episodes), size)
    bar = tqdm(total=len(tasks) * episodes, desc=f"evaluate {method}", unit="episode")
    per_task, start = {}, time.time()
    try:
        for task in tasks:
            success, frames = run_task(pool, policy, task, seeds, method, bar)
            per_task[task] = success.tolist()
            if video and out_dir:
                save_video(frames, success[0], os.path.join(out_dir, f"{task}.gif"))
    finally:
        bar.close()
        pool.close()
    seconds = time.time() - start
    rates = {task: float(np.mean(s)) for task, s in per_task.items()}
    results = {"method": method, "episodes": episodes, "seeds": [seeds[0], seeds[-1]], "success": rates,
               "mean": float(np.mean(list(rates.values()))), "per_episode": per_task, "seconds": round(seconds, 1),
               "episodes_per_minute": round(60 * len(tasks) * episodes / seconds, 1)}
    print_table(results)
    if out_dir:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def print_table(results):
    width = max(len(t) for t in results["success"]) + 2
    print(f"\n{'task':<{width}}success ({results['episodes']} episodes each, {results['method']})")
    for task, rate in results["success"].items():
        print(f"{task:<{width}}{100 * rate:6.1f}%")
    print(f"{'mean':<{width}}{100 * results['mean']:6.1f}%   ({results['episodes_per_minute']} episodes/min)")


# ---------------------------------------------------------------------------------------------------
# Policies: built-in ones and the ones rebuilt from checkpoints

class ExpertPolicy:
    """MetaWorld's scripted expert, through the standard-action path that learned policies take."""
    wants_expert_action = True

    def reset(self, num_envs):
        pass

    def act(self, obs, instructions):
        return obs["expert_action"]


class RandomPolicy:
    """Uniform random standard actions (no rotation): the floor any policy should beat."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def reset(self, num_envs):
        pass

    def act(self, obs, instructions):
        n = len(instructions)
        return np.concatenate([self.rng.uniform(-1, 1, (n, 3)), np.zeros((n, 3)), self.rng.uniform(0, 1, (n, 1))], 1)


def load_policy(path, device="cpu"):
    """Checkpoint -> (policy, method name); one clear EvalError for a missing, corrupt or unknown one."""
    import torch
    expected = "a checkpoint written by a nanorobot method (a dict with method, config, model, stats, step)"
    if not os.path.isfile(path):
        raise EvalError(f"--ckpt {path}: no such file; expected {expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"--ckpt {path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); expected {expected}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("method"), str):
        raise EvalError(f"--ckpt {path}: has no 'method' string; expected {expected}")
    method = ckpt["method"]
    try:
        module = importlib.import_module(method)
    except ModuleNotFoundError as e:
        if e.name != method:
            raise
        raise EvalError(f"--ckpt {path}: method '{method}' is unknown (no module {method}.py); expected the "
                        f"name of a nanorobot method file such as rt1, gcbc, hpt, gr1 or mcr")
    if not hasattr(module, "Policy"):
        raise EvalError(f"--ckpt {path}: module '{method}' has no Policy class; expected a nanorobot method file")
    return module.Policy.from_checkpoint(ckpt, device), method


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="scripted-expert demonstrations -> RLDS")
    c.add_argument("--out", default=None, help="output folder (default data/metaworld/<tasks>_<episodes>)")
    c.add_argument("--episodes", type=int, default=50, help="successful episodes per task")
    e = sub.add_parser("evaluate", help="success rate of a checkpoint or a built-in policy")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--ckpt", help="checkpoint of any nanorobot method")
    who.add_argument("--policy", choices=["expert", "random"], help="a built-in policy")
    e.add_argument("--episodes", type=int, default=20, help="episodes per task")
    e.add_argument("--out", default=None, help="results.json and videos (default: beside the checkpoint)")
    e.add_argument("--seed_offset", type=int, default=0, help="evaluation seeds start at 1_000_000 + this")
    e.add_argument("--no_video", action="store_true", help="skip the per-task rollout GIFs")
    for s in (c, e):
        s.add_argument("--tasks", default="mt10", help="mt10, mt50 or a comma list of task names")
        s.add_argument("--size", type=int, default=128, help="camera image height and width (pixels)")
        s.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    args = p.parse_args(argv)
    try:
        if args.command == "collect":
            out, start = args.out or data_dir(args.tasks, args.episodes), time.time()
            path = collect(args.tasks, args.episodes, out, args.size, args.workers)
            print(f"wrote {path} in {(time.time() - start) / 60:.1f} min")
        else:
            if args.ckpt:
                import torch
                policy, method = load_policy(args.ckpt, "cuda" if torch.cuda.is_available() else "cpu")
            else:
                policy, method = (ExpertPolicy() if args.policy == "expert" else RandomPolicy()), args.policy
            out = args.out or (os.path.join(os.path.dirname(args.ckpt), "eval") if args.ckpt
                               else os.path.join("runs", f"eval_{args.policy}"))
            evaluate(policy, args.tasks, args.episodes, out, args.seed_offset, not args.no_video, method,
                     args.size, args.workers)
            print(f"results.json and videos in {out}")
    except EvalError as err:
        sys.exit(f"eval_sim.py: {err}")


if __name__ == "__main__":
    main()

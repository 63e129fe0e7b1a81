"""Tiny robot-learning datasets written in the exact released on-disk layouts, for tests.

Every ``write_*`` function writes one small, deterministic dataset (numpy RNG with a fixed seed) and
returns its path. RLDS datasets are written with TFDS itself
(``tfds.dataset_builders.store_as_tfds_dataset``) under the real *internal* name and version, then moved
from ``<tmp>/<name>/<version>`` to ``<root>/<dir_name>/<version>``; feature paths, shapes, dtypes,
tensor encodings (zlib) and image encodings follow the released ``features.json`` files. CALVIN is
written as one ``np.savez_compressed`` file per frame, as ``calvin_env/datarenderer.py`` does.

Images are smooth (gradients, low-frequency texture, moving shaded discs/boxes, a little sensor noise),
so JPEGs have photo-like sizes and decode like camera frames, not like pure noise.

``tfds_episodes`` is the TFDS reference reader the TF-free parser in ``data.py`` is compared against.

TensorFlow is imported lazily (inside the functions that need it), always after torch and torchvision:
importing torchvision/triton after TensorFlow aborts the process with an LLVM error.

Sources of the schemas (see the docstring of each writer): shared/specs/data_formats.md (sections 1-3, 5,
7), the TFDS catalog pages (tensorflow/datasets docs/catalog/{fractal20220817_data,kuka,taco_play}.md),
google-research/language-table (README, input_pipeline_rlds.py), mees/calvin_env datarenderer.py and
utils.py, mees/calvin automatic_lang_annotator_mp.py, EDiRobotics/GR1-Training fake_dataset/statistics.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "write_droid",
    "write_bad_droid",
    "write_fractal",
    "write_kuka",
    "write_language_table",
    "write_taco_play",
    "write_calvin",
    "write_lerobot_v30",
    "write_lerobot_v21",
    "lerobot_frame",
    "lerobot_frame_id",
    "lerobot_content",
    "tfds_episodes",
    "flatten",
    "CALVIN_NPZ_KEYS",
]

# ----------------------------------------------------------------------------------------------------
# TensorFlow / TFDS, imported lazily and in the safe order
# ----------------------------------------------------------------------------------------------------

_TF = None
TF_IMPORT_SECONDS = None  #: wall time of the first ``_tf()`` call in this process (torch + TF + TFDS)


def _tf():
    """Return ``(tf, tfds)``; torch and torchvision are imported first (LLVM option clash otherwise)."""
    global _TF, TF_IMPORT_SECONDS
    if _TF is None:
        import time

        t0 = time.perf_counter()
        import torch  # noqa: F401  (must be loaded before TensorFlow)

        try:
            import torchvision  # noqa: F401  (likewise)
        except ImportError:
            pass

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")  # TF never touches a GPU
        except RuntimeError:  # devices already initialised by someone else in this process
            pass
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        _TF = (tf, tfds)
        TF_IMPORT_SECONDS = time.perf_counter() - t0
    return _TF


def _store(name, version, features, splits, root, dir_name, num_shards, **info):
    """Write ``splits`` ({split: [episode dict]}) as TFDS ``name``/``version`` into ``root/dir_name/version``.

    Keys ``{split}_{i:05d}`` fix the written order (TFDS orders records by a hash of the key). The
    ``disable_shuffling`` flag is *not* set (real releases do not set it; it would make
    ``shuffle_files=True`` raise).
    """
    _, tfds = _tf()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{name}_", dir=root))
    try:
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version=version,
            features=features,
            data_dir=tmp,
            split_datasets={s: [(f"{s}_{i:05d}", ep) for i, ep in enumerate(eps)] for s, eps in splits.items()},
            download_config=tfds.download.DownloadConfig(num_shards=num_shards),
            **info,
        )
        dst = root / dir_name / version
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / name / version), str(dst))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ----------------------------------------------------------------------------------------------------
# Deterministic content
# ----------------------------------------------------------------------------------------------------


def _f32(x):
    """float32 values (as stored on disk), returned as float32."""
    return np.asarray(x, dtype=np.float32)


def _f64(x):
    """float64 values that are exactly float32-representable: TFDS stores float64 as float32 on disk,
    so the values read back are bit-identical to the ones written."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _frames(rng, T, shape, noise=3.0):
    """``T`` smooth photo-like frames of ``shape`` (H, W, C) uint8: a colour gradient, low-frequency
    texture and 2-4 shaded objects that move smoothly over the episode, plus a little sensor noise."""
    H, W, C = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy /= H
    xx /= W
    c0, c1 = rng.uniform(30, 225, size=(2, C)).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    g = np.cos(ang) * xx + np.sin(ang) * yy
    g = (g - g.min()) / (g.max() - g.min() + 1e-6)
    bg = c0 * (1 - g)[..., None] + c1 * g[..., None]
    fx, fy, px, py = rng.uniform(1.5, 5.0), rng.uniform(1.5, 5.0), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
    bg += (10.0 * np.sin(2 * np.pi * fx * xx + px) * np.cos(2 * np.pi * fy * yy + py))[..., None]
    for _ in range(4):  # mid-frequency "surface texture" (wood grain, cloth), as in real photos
        f = rng.uniform(8.0, 40.0)
        a = rng.uniform(0, np.pi)
        tex = np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy * H / W) + rng.uniform(0, 6.3))
        bg += (rng.uniform(2.0, 5.0) * tex)[..., None] * rng.uniform(0.6, 1.0, C).astype(np.float32)
    objs = []
    for _ in range(int(rng.integers(2, 5))):
        objs.append(
            dict(
                p0=rng.uniform(0.15, 0.85, 2),
                p1=rng.uniform(0.15, 0.85, 2),
                r=rng.uniform(0.06, 0.16),
                color=rng.uniform(0, 255, C).astype(np.float32),
                box=bool(rng.integers(0, 2)),
            )
        )
    out = np.empty((T, H, W, C), np.uint8)
    aspect = W / H
    for t in range(T):
        img = bg.copy()
        s = t / max(T - 1, 1)
        s = 0.5 - 0.5 * np.cos(np.pi * s)  # smooth start/stop
        for o in objs:
            cy, cx = o["p0"] + (o["p1"] - o["p0"]) * s
            dy, dx = (yy - cy), (xx - cx) * aspect
            if o["box"]:
                d = np.maximum(np.abs(dy), np.abs(dx))
            else:
                d = np.sqrt(dy * dy + dx * dx)
            m = d < o["r"]
            shade = (1.0 - 0.35 * d[m] / o["r"])[:, None]
            img[m] = o["color"] * shade
        if noise:
            img += rng.standard_normal(img.shape, dtype=np.float32) * noise
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _depth(rng, T, hw, near, far):
    """``T`` smooth float32 depth maps (metres) of size ``hw``: a tilted plane plus moving bumps."""
    H, W = hw
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy /= H
    xx /= W
    plane = near + (far - near) * (0.3 + 0.5 * yy + 0.2 * xx * rng.uniform(-1, 1))
    c0, c1 = rng.uniform(0.2, 0.8, size=(2, 2))
    out = np.empty((T, H, W), np.float32)
    for t in range(T):
        s = t / max(T - 1, 1)
        cy, cx = c0 + (c1 - c0) * s
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        out[t] = plane - 0.15 * (far - near) * bump
    return out.astype(np.float32)


def _smooth_walk(rng, T, dim, scale, start=None):
    """A smooth random trajectory (T, dim) as float64: cumulative sum of low-pass filtered steps."""
    steps = rng.standard_normal((T + 4, dim)) * scale
    steps = (steps[:-4] + steps[1:-3] + steps[2:-2] + steps[3:-1] + steps[4:]) / 5.0
    x0 = np.zeros(dim) if start is None else np.asarray(start, dtype=np.float64)
    return x0 + np.cumsum(steps, axis=0)


def _unit(rng, n, dim=512):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _quat(rng, T):
    """Smoothly varying unit quaternions (T, 4) float64 (x, y, z, w)."""
    q = _smooth_walk(rng, T, 4, 0.02, start=rng.standard_normal(4))
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def _rlds_flags(T, terminal=True):
    return (
        [i == 0 for i in range(T)],
        [i == T - 1 for i in range(T)],
        [terminal and i == T - 1 for i in range(T)],
    )


def _lengths(rng, n, length):
    lo, hi = (length, length) if np.isscalar(length) else length
    lens = [int(rng.integers(lo, hi + 1)) for _ in range(n)]
    if n > 1 and lo != hi and len(set(lens)) == 1:  # guarantee varying lengths
        lens[-1] = lo if lens[-1] != lo else hi
    return lens


# ----------------------------------------------------------------------------------------------------
# DROID (droid_100 / droid 1.0.0 RLDS release)
# ----------------------------------------------------------------------------------------------------

_DROID_LABS = ["AUTOLab", "ILIAD", "IRIS", "RAIL", "REAL", "TRI", "IPRL", "GuptaLab", "CLVR", "PennPAL"]
_DROID_TASKS = [
    ("Put the marker in the cup", "Place the marker inside the cup", "Move the marker into the mug"),
    ("Close the top drawer", "Push the drawer shut", "Close the drawer"),
    ("Pick up the towel and fold it", "Fold the towel", "Fold the cloth on the table"),
    ("Move the bowl to the left", "Slide the bowl to the left side", "Put the bowl on the left"),
    ("Open the cabinet door", "Pull the cabinet open", "Open the door of the cabinet"),
    ("Turn the faucet off", "Turn off the tap", "Close the faucet"),
]


def write_droid(root, num_episodes=5, length=(12, 20), num_shards=3, image_shape=(180, 320, 3), seed=0,
                _mutate=None):
    """DROID RLDS (droid_100 layout): internal name ``r2d2_faceblur`` 1.0.0 in ``<root>/droid_100/1.0.0``.

    Schema (spec data_formats.md 3.1 / 5.1): 3 JPEG cameras (exterior_image_1_left, exterior_image_2_left,
    wrist_image_left) 180x320x3; float64 observation cartesian_position (6), gripper_position (1),
    joint_position (7); ``action_dict`` with 6 float64 keys; ``action`` float64 (7) =
    action_dict.cartesian_position ++ action_dict.gripper_position (as the real builder does);
    discount/reward float32 Scalars; is_first/is_last/is_terminal bool Scalars; Text
    language_instruction, _2, _3 (repeated on every step); episode_metadata file_path, recording_folderpath.

    Content: episode ``i`` is a success iff ``i % 3 != 1`` (``/success/`` vs ``/failure/`` in file_path;
    reward 1.0 on the last step of successful episodes only); episode 1 has all three instructions empty;
    episodes with ``i % 2 == 0 and i > 0`` have an empty ``language_instruction_3``. Lengths vary in
    ``length`` (inclusive). Returns the version directory.
    """
    _, tfds = _tf()
    F = tfds.features
    cam = lambda: F.Image(shape=tuple(image_shape), dtype=np.uint8, encoding_format="jpeg")  # noqa: E731
    f64 = lambda n: F.Tensor(shape=(n,), dtype=np.float64)  # noqa: E731
    features = F.FeaturesDict(
        {
            "episode_metadata": F.FeaturesDict({"file_path": F.Text(), "recording_folderpath": F.Text()}),
            "steps": F.Dataset(
                {
                    "observation": F.FeaturesDict(
                        {
                            "exterior_image_1_left": cam(),
                            "exterior_image_2_left": cam(),
                            "wrist_image_left": cam(),
                            "cartesian_position": f64(6),
                            "gripper_position": f64(1),
                            "joint_position": f64(7),
                        }
                    ),
                    "action_dict": F.FeaturesDict(
                        {
                            "cartesian_position": f64(6),
                            "cartesian_velocity": f64(6),
                            "gripper_position": f64(1),
                            "gripper_velocity": f64(1),
                            "joint_position": f64(7),
                            "joint_velocity": f64(7),
                        }
                    ),
                    "action": f64(7),
                    "discount": F.Scalar(dtype=np.float32),
                    "reward": F.Scalar(dtype=np.float32),
                    "is_first": F.Scalar(dtype=np.bool_),
                    "is_last": F.Scalar(dtype=np.bool_),
                    "is_terminal": F.Scalar(dtype=np.bool_),
                    "language_instruction": F.Text(),
                    "language_instruction_2": F.Text(),
                    "language_instruction_3": F.Text(),
                }
            ),
        }
    )
    rng = np.random.default_rng(seed)
    episodes = []
    for i, T in enumerate(_lengths(rng, num_episodes, length)):
        success = i % 3 != 1
        lab = _DROID_LABS[i % len(_DROID_LABS)]
        day = 3 + i
        dow = ["Sat", "Sun", "Mon", "Tue", "Wed", "Thu", "Fri"][day % 7]  # July 2023 calendar
        stamp = f"{dow} Jul {day:2d} 1{i}:{(7 * i) % 60:02d}:{(13 * i) % 60:02d} 2023".replace(" ", "_")
        ep_dir = f"/nfs/droid_raw/1.0.1/{lab}/{'success' if success else 'failure'}/2023-07-{day:02d}/{stamp}"
        instr = list(_DROID_TASKS[i % len(_DROID_TASKS)])
        if i == 1:
            instr = ["", "", ""]
        elif i % 2 == 0 and i > 0:
            instr[2] = ""
        imgs = [_frames(rng, T, image_shape) for _ in range(3)]
        cart_cmd = _smooth_walk(rng, T, 6, 0.01, start=[0.45, 0.0, 0.35, np.pi, 0.0, 0.0])
        cart_vel = np.clip(np.gradient(cart_cmd, axis=0) * 15.0, -1, 1)
        grip_cmd = np.clip(np.cumsum(rng.uniform(-0.15, 0.25, T)), 0, 1)[:, None]
        grip_vel = np.gradient(grip_cmd, axis=0)
        joint_cmd = _smooth_walk(rng, T, 7, 0.01, start=[0.0, -0.6, 0.0, -2.2, 0.0, 1.6, 0.8])
        joint_vel = np.clip(np.gradient(joint_cmd, axis=0) * 15.0, -1, 1)
        # observed state lags the commands by one step
        cart_obs = np.concatenate([cart_cmd[:1], cart_cmd[:-1]]) + rng.normal(0, 1e-3, (T, 6))
        grip_obs = np.concatenate([grip_cmd[:1], grip_cmd[:-1]])
        joint_obs = np.concatenate([joint_cmd[:1], joint_cmd[:-1]]) + rng.normal(0, 1e-3, (T, 7))
        first, last, term = _rlds_flags(T)
        steps = []
        for t in range(T):
            ad = {
                "cartesian_position": _f64(cart_cmd[t]),
                "cartesian_velocity": _f64(cart_vel[t]),
                "gripper_position": _f64(grip_cmd[t]),
                "gripper_velocity": _f64(grip_vel[t]),
                "joint_position": _f64(joint_cmd[t]),
                "joint_velocity": _f64(joint_vel[t]),
            }
            steps.append(
                {
                    "observation": {
                        "exterior_image_1_left": imgs[0][t],
                        "exterior_image_2_left": imgs[1][t],
                        "wrist_image_left": imgs[2][t],
                        "cartesian_position": _f64(cart_obs[t]),
                        "gripper_position": _f64(grip_obs[t]),
                        "joint_position": _f64(joint_obs[t]),
                    },
                    "action_dict": ad,
                    "action": np.concatenate([ad["cartesian_position"], ad["gripper_position"]]),
                    "discount": np.float32(1.0),
                    "reward": np.float32(1.0 if (success and t == T - 1) else 0.0),
                    "is_first": first[t],
                    "is_last": last[t],
                    "is_terminal": term[t],
                    "language_instruction": instr[0],
                    "language_instruction_2": instr[1],
                    "language_instruction_3": instr[2],
                }
            )
        episodes.append(
            {
                "steps": steps,
                "episode_metadata": {
                    "file_path": f"{ep_dir}/trajectory.h5",
                    "recording_folderpath": f"{ep_dir}/recordings/MP4",
                },
            }
        )
    if _mutate is not None:
        _mutate(episodes)
    return _store("r2d2_faceblur", "1.0.0", features, {"train": episodes}, root, "droid_100", num_shards)


def write_bad_droid(root, problem, num_episodes=3, num_shards=1, bad_episode=1, seed=0):
    """A DROID-layout dataset (as ``write_droid``, smaller) with one broken episode ``bad_episode``, for
    error-message tests. ``problem="empty"``: that episode has zero steps (is_first etc. are empty lists);
    ``problem="nan"``: NaN at step 2 in action_dict.cartesian_position and cartesian_velocity, hence in
    ``action`` (all other fields stay finite). Returns the version directory."""
    if problem not in ("empty", "nan"):
        raise ValueError("problem must be 'empty' or 'nan'")

    def mutate(episodes):
        ep = episodes[bad_episode]
        if problem == "empty":
            ep["steps"] = []
        else:
            step = ep["steps"][2]
            for k in ("cartesian_position", "cartesian_velocity"):
                step["action_dict"][k] = step["action_dict"][k].copy()
                step["action_dict"][k][0] = np.nan
            step["action"] = np.concatenate(
                [step["action_dict"]["cartesian_position"], step["action_dict"]["gripper_position"]]
            )

    return write_droid(root, num_episodes=num_episodes, length=(6, 9), num_shards=num_shards, seed=seed,
                       _mutate=mutate)


# ----------------------------------------------------------------------------------------------------
# Google RT-1 style datasets: fractal20220817_data and kuka
# ----------------------------------------------------------------------------------------------------

_FRACTAL_TASKS = [
    "pick rxbar chocolate from bottom drawer and place on counter",
    "move blue plastic bottle near pepsi can",
    "open middle drawer",
    "place coke can upright",
    "knock redbull can over",
    "close top drawer",
]


def _rt1_action_features(F):
    return F.FeaturesDict(
        {
            "base_displacement_vector": F.Tensor(shape=(2,), dtype=np.float32),
            "base_displacement_vertical_rotation": F.Tensor(shape=(1,), dtype=np.float32),
            "gripper_closedness_action": F.Tensor(
                shape=(1,), dtype=np.float32, doc="continuous gripper position"
            ),
            "rotation_delta": F.Tensor(
                shape=(3,), dtype=np.float32, doc="rpy commanded orientation displacement, in base-relative frame"
            ),
            "terminate_episode": F.Tensor(shape=(3,), dtype=np.int32),
            "world_vector": F.Tensor(
                shape=(3,), dtype=np.float32, doc="commanded end-effector displacement, in base-relative frame"
            ),
        }
    )


def _rt1_actions(rng, T):
    """RT-1 dict actions: small deltas, relative gripper command (+1 close, -1 open, 0 no change: a close
    in the first half and an open later), terminate_episode one-hot int32 ([0, 1, 0] continue,
    [1, 0, 0] on the last step)."""
    g = np.zeros(T, np.float32)
    g[int(rng.integers(1, max(2, T // 2)))] = 1.0
    if T > 4:
        g[int(rng.integers(T // 2 + 1, T - 1))] = -1.0
    out = []
    for t in range(T):
        out.append(
            {
                "base_displacement_vector": _f32([0.0, 0.0]),
                "base_displacement_vertical_rotation": _f32([0.0]),
                "gripper_closedness_action": _f32([g[t]]),
                "rotation_delta": _f32(rng.normal(0, 0.05, 3)),
                "terminate_episode": np.array([1, 0, 0] if t == T - 1 else [0, 1, 0], np.int32),
                "world_vector": _f32(rng.normal(0, 0.02, 3)),
            }
        )
    return out, g


def write_fractal(root, num_episodes=4, length=(8, 14), num_shards=2, image_shape=(256, 320, 3), seed=1):
    """RT-1 ``fractal20220817_data`` 0.1.0 in ``<root>/fractal20220817_data/0.1.0``.

    Full schema of the TFDS catalog page (tensorflow/datasets docs/catalog/fractal20220817_data.md):
    episode-level ``aspects`` (5 bools) and ``attributes`` (int64 + string pairs); steps: dict ``action``
    (world_vector 3, rotation_delta 3, gripper_closedness_action 1 float32 relative +1 close / -1 open / 0,
    terminate_episode 3 int32 one-hot, base_displacement_vector 2, base_displacement_vertical_rotation 1),
    is_first/is_last/is_terminal bool Tensors, reward float32 Scalar, and ``observation`` with image
    256x320 JPEG, natural_language_instruction (string Tensor), natural_language_embedding (512,) and 12
    float32 state tensors (base_pose_tool_reached 7 = xyz + quaternion, gripper_closed 1, ...).
    """
    _, tfds = _tf()
    F = tfds.features
    t32 = lambda *s, doc=None: F.Tensor(shape=tuple(s), dtype=np.float32, doc=doc)  # noqa: E731
    features = F.FeaturesDict(
        {
            "aspects": F.FeaturesDict(
                {k: F.Tensor(shape=(), dtype=np.bool_) for k in
                 ["already_success", "feasible", "has_aspects", "success", "undesirable"]},
                doc="Session Aspects for crowdcompute ratings",
            ),
            "attributes": F.FeaturesDict(
                {
                    k: F.Tensor(shape=(), dtype=(np.str_ if k.endswith("_name") else np.int64))
                    for b in ["collection_mode", "data_type", "env", "location", "objects_family", "task_family"]
                    for k in (b, b + "_name")
                }
            ),
            "steps": F.Dataset(
                {
                    "action": _rt1_action_features(F),
                    "is_first": F.Tensor(shape=(), dtype=np.bool_),
                    "is_last": F.Tensor(shape=(), dtype=np.bool_),
                    "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
                    "observation": F.FeaturesDict(
                        {
                            "base_pose_tool_reached": t32(
                                7, doc="end-effector base-relative position+quaternion pose"
                            ),
                            "gripper_closed": t32(1),
                            "gripper_closedness_commanded": t32(1, doc="continuous gripper position"),
                            "height_to_bottom": t32(1, doc="height of end-effector from ground"),
                            "image": F.Image(shape=tuple(image_shape), dtype=np.uint8, encoding_format="jpeg"),
                            "natural_language_embedding": t32(512),
                            "natural_language_instruction": F.Tensor(shape=(), dtype=np.str_),
                            "orientation_box": t32(2, 3),
                            "orientation_start": t32(4),
                            "robot_orientation_positions_box": t32(3, 3),
                            "rotation_delta_to_go": t32(
                                3, doc="rotational displacement from current orientation to target"
                            ),
                            "src_rotation": t32(4),
                            "vector_to_go": t32(
                                3, doc="displacement from current end-effector position to target"
                            ),
                            "workspace_bounds": t32(3, 3),
                        }
                    ),
                    "reward": F.Scalar(dtype=np.float32),
                }
            ),
        }
    )
    rng = np.random.default_rng(seed)
    embs = _unit(rng, len(_FRACTAL_TASKS))
    episodes = []
    for i, T in enumerate(_lengths(rng, num_episodes, length)):
        k = i % len(_FRACTAL_TASKS)
        success = i % 4 != 3
        imgs = _frames(rng, T, image_shape)
        xyz = _smooth_walk(rng, T, 3, 0.01, start=[0.55, -0.05, 0.85])
        quat = _quat(rng, T)
        actions, g = _rt1_actions(rng, T)
        closed = np.clip(np.cumsum(g), 0, 1)  # absolute gripper state from the relative commands
        ws = _f32([[0.3, -0.4, 0.6], [0.9, 0.4, 1.2], [0.0, 0.0, 0.0]])
        first, last, term = _rlds_flags(T)
        steps = []
        for t in range(T):
            steps.append(
                {
                    "action": actions[t],
                    "is_first": first[t],
                    "is_last": last[t],
                    "is_terminal": term[t],
                    "observation": {
                        "base_pose_tool_reached": _f32(np.concatenate([xyz[t], quat[t]])),
                        "gripper_closed": _f32([closed[t]]),
                        "gripper_closedness_commanded": _f32([closed[t]]),
                        "height_to_bottom": _f32([xyz[t, 2] - 0.75]),
                        "image": imgs[t],
                        "natural_language_embedding": embs[k],
                        "natural_language_instruction": _FRACTAL_TASKS[k],
                        "orientation_box": _f32(rng.normal(0, 0.1, (2, 3))),
                        "orientation_start": _f32(quat[0]),
                        "robot_orientation_positions_box": _f32(rng.normal(0, 0.1, (3, 3))),
                        "rotation_delta_to_go": _f32(rng.normal(0, 0.05, 3)),
                        "src_rotation": _f32(quat[0]),
                        "vector_to_go": _f32(xyz[-1] - xyz[t]),
                        "workspace_bounds": ws,
                    },
                    "reward": np.float32(1.0 if (success and t == T - 1) else 0.0),
                }
            )
        episodes.append(
            {
                "aspects": {
                    "already_success": False,
                    "feasible": True,
                    "has_aspects": i % 2 == 0,
                    "success": success,
                    "undesirable": False,
                },
                "attributes": {
                    "collection_mode": 1,
                    "collection_mode_name": "TELEOP",
                    "data_type": 1,
                    "data_type_name": "REAL_ROBOT",
                    "env": 2,
                    "env_name": "mk1_kitchen",
                    "location": 3,
                    "location_name": "mountain_view",
                    "objects_family": 4,
                    "objects_family_name": "17_objects",
                    "task_family": k,
                    "task_family_name": _FRACTAL_TASKS[k].split(" ")[0],
                },
                "steps": steps,
            }
        )
    return _store(
        "fractal20220817_data",
        "0.1.0",
        features,
        {"train": episodes},
        root,
        "fractal20220817_data",
        num_shards,
        description="Table-top manipulation with 17 objects",
        homepage="https://ai.googleblog.com/2022/12/rt-1-robotics-transformer-for-real.html",
    )


def write_kuka(root, num_episodes=3, length=(6, 10), num_shards=2, image_shape=(512, 640, 3), seed=2):
    """QT-Opt ``kuka`` 0.1.0 in ``<root>/kuka/0.1.0``.

    Schema of the TFDS catalog page (docs/catalog/kuka.md): steps with the RT-1 dict ``action``,
    is_first/is_last/is_terminal bool Tensors, reward float32 Scalar, ``observation`` with
    ``clip_function_input/base_pose_tool_reached`` (7) and ``gripper_closed`` (1) **zlib-encoded**
    float32 Tensors (Octo/OpenVLA decode these two with ``tf.io.decode_compressed(..., "ZLIB")``),
    clip_function_input/workspace_bounds (3, 3), height_to_bottom (1), task_id (1), image 512x640 JPEG,
    natural_language_instruction (string Tensor, "pick anything"), natural_language_embedding (512,);
    and an **episode-level** ``success`` bool (a sibling of ``steps``, not a step feature).
    The other three float tensors are stored unencoded (their encoding is not documented; assumption).
    """
    _, tfds = _tf()
    F = tfds.features
    t32 = lambda *s, enc="none": F.Tensor(shape=tuple(s), dtype=np.float32, encoding=enc)  # noqa: E731
    features = F.FeaturesDict(
        {
            "steps": F.Dataset(
                {
                    "action": _rt1_action_features(F),
                    "is_first": F.Tensor(shape=(), dtype=np.bool_),
                    "is_last": F.Tensor(shape=(), dtype=np.bool_),
                    "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
                    "observation": F.FeaturesDict(
                        {
                            "clip_function_input/base_pose_tool_reached": t32(7, enc="zlib"),
                            "clip_function_input/workspace_bounds": t32(3, 3),
                            "gripper_closed": t32(1, enc="zlib"),
                            "height_to_bottom": t32(1),
                            "image": F.Image(shape=tuple(image_shape), dtype=np.uint8, encoding_format="jpeg"),
                            "natural_language_embedding": t32(512),
                            "natural_language_instruction": F.Tensor(shape=(), dtype=np.str_),
                            "task_id": t32(1),
                        }
                    ),
                    "reward": F.Scalar(dtype=np.float32),
                }
            ),
            "success": F.Tensor(shape=(), dtype=np.bool_),
        }
    )
    rng = np.random.default_rng(seed)
    emb = _unit(rng, 1)[0]
    episodes = []
    for i, T in enumerate(_lengths(rng, num_episodes, length)):
        success = i % 2 == 0
        imgs = _frames(rng, T, image_shape)
        xyz = _smooth_walk(rng, T, 3, 0.01, start=[0.6, 0.0, 0.3])
        quat = _quat(rng, T)
        actions, g = _rt1_actions(rng, T)
        closed = np.clip(np.cumsum(g), 0, 1)
        first, last, term = _rlds_flags(T)
        steps = []
        for t in range(T):
            steps.append(
                {
                    "action": actions[t],
                    "is_first": first[t],
                    "is_last": last[t],
                    "is_terminal": term[t],
                    "observation": {
                        "clip_function_input/base_pose_tool_reached": _f32(np.concatenate([xyz[t], quat[t]])),
                        "clip_function_input/workspace_bounds": _f32(
                            [[0.4, -0.2, 0.05], [0.8, 0.2, 0.5], [0.0, 0.0, 0.0]]
                        ),
                        "gripper_closed": _f32([closed[t]]),
                        "height_to_bottom": _f32([xyz[t, 2]]),
                        "image": imgs[t],
                        "natural_language_embedding": emb,
                        "natural_language_instruction": "pick anything",
                        "task_id": _f32([float(i % 3)]),
                    },
                    "reward": np.float32(1.0 if (success and t == T - 1) else 0.0),
                }
            )
        episodes.append({"steps": steps, "success": success})
    return _store(
        "kuka",
        "0.1.0",
        features,
        {"train": episodes},
        root,
        "kuka",
        num_shards,
        description="Bin picking and rearrangement tasks",
        homepage="https://arxiv.org/abs/1806.10293",
    )


# ----------------------------------------------------------------------------------------------------
# Language-Table
# ----------------------------------------------------------------------------------------------------

_LT_INSTRUCTIONS = [
    "push the blue cube to the top left corner",
    "slide the red star next to the green circle",
    "move the yellow heart slightly down ↓ and to the right",  # non-ASCII code point on purpose
    "put the green star in the center of the board",
]


def encode_language_table_instruction(text, length=512):
    """Language-Table ``observation/instruction``: int32[512] of unicode code points, NUL-padded
    (decoded upstream with ``tf.strings.unicode_encode(x, "UTF-8")`` and split at ``\\x00``)."""
    cps = [ord(c) for c in text]
    if len(cps) > length:
        raise ValueError("instruction too long")
    out = np.zeros(length, np.int32)
    out[: len(cps)] = cps
    return out


def write_language_table(root, num_episodes=3, length=(8, 12), num_shards=2, image_shape=(360, 640, 3), seed=3):
    """``language_table`` 0.0.1 (gs://gresearch/robotics/language_table/0.0.1) in
    ``<root>/language_table/0.0.1``; internal name ``language_table`` (shards
    ``language_table-train.tfrecord-*``).

    Schema (google-research/language-table README + input_pipeline_rlds.py; an OXE mirror's features.json):
    steps: action (2,) float32, is_first/is_last/is_terminal bool Tensors, reward float32 Scalar,
    observation/effector_translation (2,), observation/effector_target_translation (2,) float32,
    observation/instruction int32[512] (unicode code points, NUL-padded), observation/rgb 360x640 JPEG;
    episode-level ``episode_id`` string (from one element_spec printout; unverified in features.json).
    """
    _, tfds = _tf()
    F = tfds.features
    features = F.FeaturesDict(
        {
            "episode_id": F.Text(),
            "steps": F.Dataset(
                {
                    "action": F.Tensor(shape=(2,), dtype=np.float32),
                    "is_first": F.Tensor(shape=(), dtype=np.bool_),
                    "is_last": F.Tensor(shape=(), dtype=np.bool_),
                    "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
                    "observation": F.FeaturesDict(
                        {
                            "effector_target_translation": F.Tensor(
                                shape=(2,),
                                dtype=np.float32,
                                doc="The target location for the end effector as a 2D cartesian setpoint.",
                            ),
                            "effector_translation": F.Tensor(shape=(2,), dtype=np.float32),
                            "instruction": F.Tensor(
                                shape=(512,), dtype=np.int32, doc="A UTF-8 encoded string as bytes."
                            ),
                            "rgb": F.Image(shape=tuple(image_shape), dtype=np.uint8, encoding_format="jpeg"),
                        }
                    ),
                    "reward": F.Scalar(dtype=np.float32),
                }
            ),
        }
    )
    rng = np.random.default_rng(seed)
    episodes = []
    for i, T in enumerate(_lengths(rng, num_episodes, length)):
        instr = encode_language_table_instruction(_LT_INSTRUCTIONS[i % len(_LT_INSTRUCTIONS)])
        imgs = _frames(rng, T, image_shape)
        target = _smooth_walk(rng, T, 2, 0.01, start=[0.35, 0.0])
        eff = np.concatenate([target[:1], target[:-1]]) + rng.normal(0, 0.002, (T, 2))
        act = np.clip(np.diff(np.concatenate([target, target[-1:]]), axis=0), -0.03, 0.03)
        first, last, term = _rlds_flags(T)
        steps = [
            {
                "action": _f32(act[t]),
                "is_first": first[t],
                "is_last": last[t],
                "is_terminal": term[t],
                "observation": {
                    "effector_target_translation": _f32(target[t]),
                    "effector_translation": _f32(eff[t]),
                    "instruction": instr,
                    "rgb": imgs[t],
                },
                "reward": np.float32(1.0 if t == T - 1 else 0.0),
            }
            for t in range(T)
        ]
        episodes.append({"episode_id": f"{1_700_000_000_000 + 7919 * i}_{i:06d}", "steps": steps})
    return _store("language_table", "0.0.1", features, {"train": episodes}, root, "language_table", num_shards)


# ----------------------------------------------------------------------------------------------------
# TACO-Play
# ----------------------------------------------------------------------------------------------------

_TACO_TASKS = [
    ("rotate_blue_block_right", "rotate the blue block to the right"),
    ("open_drawer", "pull the handle to open the drawer"),
    ("turn_on_led", "switch on the green light"),
    ("move_slider_left", "push the sliding door to the left"),
]


def write_taco_play(root, num_episodes=3, num_test_episodes=2, length=(8, 12), num_shards=2, seed=4):
    """``taco_play`` 0.1.0 in ``<root>/taco_play/0.1.0`` with ``train`` and ``test`` splits.

    Schema of the TFDS catalog page (docs/catalog/taco_play.md): steps with dict ``action`` (actions 7
    absolute, rel_actions_world 7, rel_actions_gripper 7, all float32, gripper last dim -1/+1, and
    terminate_episode a float32 scalar), is_first/is_last/is_terminal bool Tensors, reward float32 Scalar,
    ``observation`` with rgb_static 150x200x3 and rgb_gripper 84x84x3 Images, depth_static (150, 200) and
    depth_gripper (84, 84) float32 Tensors, robot_obs (15,) float32 (CALVIN layout),
    natural_language_instruction, structured_language_instruction (string Tensors),
    natural_language_embedding (512,).

    The released features.json gives **no encodingFormat** for the two Images (an OXE mirror inventory
    lists "84x84x3 uint8" without an encoding, unlike fractal/kuka/droid); the fixture reproduces that and
    stores ready-made JPEG bytes (quality 95). Whether the real bytes are JPEG or PNG is not verified.
    TFDS writes ``num_shards`` shards per split, so each non-empty split needs >= ``num_shards`` episodes.
    """
    if min(num_episodes, num_test_episodes or num_shards) < num_shards:
        raise ValueError("each non-empty split needs at least num_shards episodes")
    tf, tfds = _tf()
    F = tfds.features
    g_doc = "last dimension is open_gripper (-1 is open gripper, 1 is close)"
    features = F.FeaturesDict(
        {
            "steps": F.Dataset(
                {
                    "action": F.FeaturesDict(
                        {
                            "actions": F.Tensor(
                                shape=(7,),
                                dtype=np.float32,
                                doc="absolute desired values for gripper pose (first 6 dimensions are x, y, "
                                f"z, yaw, pitch, roll), {g_doc}",
                            ),
                            "rel_actions_gripper": F.Tensor(
                                shape=(7,),
                                dtype=np.float32,
                                doc="relative actions for gripper pose in the gripper camera frame (first 6 "
                                f"dimensions are x, y, z, yaw, pitch, roll), {g_doc}",
                            ),
                            "rel_actions_world": F.Tensor(
                                shape=(7,),
                                dtype=np.float32,
                                doc="relative actions for gripper pose in the robot base frame (first 6 "
                                f"dimensions are x, y, z, yaw, pitch, roll), {g_doc}",
                            ),
                            "terminate_episode": F.Tensor(shape=(), dtype=np.float32),
                        }
                    ),
                    "is_first": F.Tensor(shape=(), dtype=np.bool_),
                    "is_last": F.Tensor(shape=(), dtype=np.bool_),
                    "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
                    "observation": F.FeaturesDict(
                        {
                            "depth_gripper": F.Tensor(shape=(84, 84), dtype=np.float32),
                            "depth_static": F.Tensor(shape=(150, 200), dtype=np.float32),
                            "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
                            "natural_language_instruction": F.Tensor(shape=(), dtype=np.str_),
                            "rgb_gripper": F.Image(shape=(84, 84, 3), dtype=np.uint8),
                            "rgb_static": F.Image(
                                shape=(150, 200, 3),
                                dtype=np.uint8,
                                doc="RGB static image of shape. (150, 200, 3). Subsampled from (200,200, 3) image.",
                            ),
                            "robot_obs": F.Tensor(
                                shape=(15,),
                                dtype=np.float32,
                                doc="EE position (3), EE orientation in euler angles (3), gripper width (1), "
                                "joint positions (7), gripper action (1)",
                            ),
                            "structured_language_instruction": F.Tensor(shape=(), dtype=np.str_),
                        }
                    ),
                    "reward": F.Scalar(dtype=np.float32),
                }
            ),
        }
    )

    def jpeg(frames):
        return [tf.io.encode_jpeg(f, quality=95).numpy() for f in frames]

    rng = np.random.default_rng(seed)
    embs = _unit(rng, len(_TACO_TASKS))

    def episode(i, T):
        k = i % len(_TACO_TASKS)
        rgb_s = jpeg(_frames(rng, T, (150, 200, 3)))
        rgb_g = jpeg(_frames(rng, T, (84, 84, 3)))
        d_s = _depth(rng, T, (150, 200), 1.2, 2.2)
        d_g = _depth(rng, T, (84, 84), 0.05, 0.6)
        pos = _smooth_walk(rng, T + 1, 3, 0.004, start=[0.05, -0.12, 0.5])
        eul = _smooth_walk(rng, T + 1, 3, 0.01, start=[np.pi - 0.05, -0.08, 1.58])
        grip_act = np.where(np.arange(T + 1) < (T + 1) // 2, 1.0, -1.0)  # CALVIN convention in robot_obs
        width = np.where(grip_act > 0, 0.08, 0.02)
        joints = _smooth_walk(rng, T + 1, 7, 0.01, start=[-0.7, 1.0, 1.8, -2.1, -1.0, 1.8, 0.6])
        robot_obs = np.concatenate([pos, eul, width[:, None], joints, grip_act[:, None]], axis=1)
        first, last, term = _rlds_flags(T)
        steps = []
        for t in range(T):
            absa = np.concatenate([pos[t + 1], eul[t + 1], [grip_act[t + 1]]])
            rel = np.concatenate(
                [np.clip((pos[t + 1] - pos[t]) * 50, -1, 1), np.clip((eul[t + 1] - eul[t]) * 20, -1, 1),
                 [grip_act[t + 1]]]
            )
            steps.append(
                {
                    "action": {
                        "actions": _f32(absa),
                        "rel_actions_gripper": _f32(rel[[1, 0, 2, 4, 3, 5, 6]] * [1, -1, 1, 1, -1, 1, 1]),
                        "rel_actions_world": _f32(rel),
                        "terminate_episode": np.float32(1.0 if t == T - 1 else 0.0),
                    },
                    "is_first": first[t],
                    "is_last": last[t],
                    "is_terminal": term[t],
                    "observation": {
                        "depth_gripper": d_g[t],
                        "depth_static": d_s[t],
                        "natural_language_embedding": embs[k],
                        "natural_language_instruction": _TACO_TASKS[k][1],
                        "rgb_gripper": rgb_g[t],
                        "rgb_static": rgb_s[t],
                        "robot_obs": _f32(robot_obs[t]),
                        "structured_language_instruction": _TACO_TASKS[k][0],
                    },
                    "reward": np.float32(1.0 if t == T - 1 else 0.0),
                }
            )
        return {"steps": steps}

    lens = _lengths(rng, num_episodes + num_test_episodes, length)
    train = [episode(i, T) for i, T in enumerate(lens[:num_episodes])]
    test = [episode(num_episodes + i, T) for i, T in enumerate(lens[num_episodes:])]
    splits = {"train": train}
    if test:
        splits["test"] = test
    return _store(
        "taco_play",
        "0.1.0",
        features,
        splits,
        root,
        "taco_play",
        num_shards,
        description="Franka arm interacting with kitchen",
        homepage="https://www.kaggle.com/datasets/oiermees/taco-robot",
    )


# ----------------------------------------------------------------------------------------------------
# CALVIN (raw npz release)
# ----------------------------------------------------------------------------------------------------

#: keys of one CALVIN frame, in the order ``calvin_env/datarenderer.py::save_step`` writes them
CALVIN_NPZ_KEYS = {
    "actions": ((7,), np.float64),
    "rel_actions": ((7,), np.float64),
    "robot_obs": ((15,), np.float64),
    "scene_obs": ((24,), np.float64),
    "rgb_static": ((200, 200, 3), np.uint8),
    "rgb_gripper": ((84, 84, 3), np.uint8),
    "rgb_tactile": ((160, 120, 6), np.uint8),
    "depth_static": ((200, 200), np.float32),
    "depth_gripper": ((84, 84), np.float32),
    "depth_tactile": ((160, 120, 2), np.float32),
}

_CALVIN_TASKS = [
    ("open_drawer", "pull the handle to open the drawer"),
    ("move_slider_left", "push the sliding door to the left side"),
    ("turn_on_lightbulb", "use the switch to turn on the light bulb"),
    ("lift_blue_block_table", "grasp and lift the blue block"),
    ("push_red_block_right", "slide the red block to the right"),
    ("turn_off_led", "press the button to turn off the led light"),
    ("rotate_pink_block_left", "take the pink block and rotate it to the left"),
    ("close_drawer", "push the handle to close the drawer"),
]

# robot_obs / scene_obs means and stds of the real data (GR1-Training fake_dataset/statistics.yaml)
_CALVIN_ROBOT_MEAN = [0.039233, -0.118554, 0.507826, 1.079174, -0.083069, 1.579753, 0.054622, -0.736859,
                      1.017769, 1.792879, -2.099604, -0.993738, 1.790842, 0.586534, 0.095367]
_CALVIN_SCENE_MEAN = [0.150934, 0.119917, 0.000239, 0.042049, 0.487755, 0.47448, 0.057482, -0.088074,
                      0.431237, 0.046034, 0.030599, 0.027333, 0.062103, -0.092833, 0.430236, -0.054962,
                      0.019381, 0.096546, 0.064944, -0.093058, 0.428381, 0.024941, 0.002746, -0.031589]


def _wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def _calvin_segment(rng, L):
    """One recorded segment of ``L`` consecutive CALVIN frames as a dict of stacked arrays."""
    tcp = _smooth_walk(rng, L + 1, 3, 0.004, start=np.array(_CALVIN_ROBOT_MEAN[:3]) + rng.normal(0, 0.05, 3))
    eul = _smooth_walk(rng, L + 1, 3, 0.01, start=[np.pi - 0.02, -0.08, 1.58])
    eul = _wrap(eul)  # robot_obs[3] sits near +-pi and wraps, as in the real data
    n_toggle = int(rng.integers(1, 4))
    toggles = np.sort(rng.choice(np.arange(2, L), size=n_toggle, replace=False))
    grip = np.ones(L + 1)
    for k, t0 in enumerate(toggles):
        grip[t0:] = -1.0 if k % 2 == 0 else 1.0
    width = np.where(grip > 0, 0.078, 0.012) + rng.normal(0, 5e-4, L + 1)
    joints = _smooth_walk(rng, L + 1, 7, 0.01, start=_CALVIN_ROBOT_MEAN[7:14])
    # robot_obs[14] is the last gripper command, actions[6] the next one (datarenderer: action = next state)
    robot_obs = np.concatenate([tcp, eul, width[:, None], joints, np.roll(grip, 1)[:, None]], axis=1)[:L]
    robot_obs[0, 14] = grip[0]
    actions = np.concatenate([tcp[1:], eul[1:], grip[1:, None]], axis=1)
    rel = np.concatenate(
        [
            np.clip(actions[:, :3] - robot_obs[:, :3], -0.02, 0.02) / 0.02,
            np.clip(_wrap(actions[:, 3:6] - robot_obs[:, 3:6]), -0.05, 0.05) / 0.05,
            actions[:, 6:],
        ],
        axis=1,
    )
    scene = np.array(_CALVIN_SCENE_MEAN) + np.zeros((L, 24))
    scene[:, :4] = np.clip(_smooth_walk(rng, L, 4, 0.002, start=[0.1, 0.1, 0.0, 0.03]), 0, 0.3)
    scene[:, 4:6] = (rng.random(2) > 0.5).astype(np.float64)  # lightbulb, green led on/off
    scene[:, 6:] += _smooth_walk(rng, L, 18, 0.001)
    return {
        "actions": actions,
        "rel_actions": rel,
        "robot_obs": robot_obs,
        "scene_obs": scene,
        # simulator renders: smooth, noise-free (they compress well, as the real npz files do)
        "rgb_static": _frames(rng, L, (200, 200, 3), noise=0),
        "rgb_gripper": _frames(rng, L, (84, 84, 3), noise=0),
        "rgb_tactile": _frames(rng, L, (160, 120, 6), noise=0),
        "depth_static": _depth(rng, L, (200, 200), 3.5, 4.6),
        "depth_gripper": _depth(rng, L, (84, 84), 0.05, 0.9),
        "depth_tactile": _tactile_depth(grip[:L]),
    }


def _tactile_depth(grip):
    """DIGIT depth (T, 160, 120, 2) float32: the flat gel surface, with a contact dent while the gripper
    is closed (real tactile depth is mostly constant and compresses very well)."""
    yy, xx = np.mgrid[0:160, 0:120].astype(np.float32)
    dent = (0.002 * np.exp(-((yy - 80) ** 2 + (xx - 60) ** 2) / 300.0)).astype(np.float32)
    out = np.full((len(grip), 160, 120, 2), 0.0215, np.float32)
    out[grip < 0] -= dent[None, :, :, None]
    return out


def _fmt_list(v):
    return "[" + ", ".join(f"{x:.6f}" for x in v) + "]"


def write_calvin(root, num_frames=130, split="training", start_id=None, gap=None, seed=5):
    """Write the CALVIN raw split folder ``<root>/<split>`` (``training`` or ``validation``) and return
    ``root``, the dataset root (as in ``task_D_D/``: call twice to get both splits).

    Layout (mees/calvin dataset README, calvin_env datarenderer.py, automatic_lang_annotator_mp.py):

    * ``episode_XXXXXXX.npz`` — one ``np.savez_compressed`` file per frame, 7-digit global frame id, keys
      and dtypes of ``CALVIN_NPZ_KEYS`` (actions abs tcp xyz + euler + gripper -1 close/+1 open,
      rel_actions = clip(delta xyz, 0.02)/0.02, clip(wrapped delta euler, 0.05)/0.05, gripper; robot_obs 15,
      scene_obs 24 float64; rgb_static 200x200x3, rgb_gripper 84x84x3, rgb_tactile 160x120x6 uint8;
      depth_static 200x200, depth_gripper 84x84, depth_tactile 160x120x2 float32).
    * two recorded segments (≈55 % / 45 % of ``num_frames``) with a gap of unused ids between them; ids do
      not start at 0 (training: from 360575, validation: from 53760 by default).
    * ``ep_start_end_ids.npy`` (N, 2) int64 inclusive [start, end]; ``ep_lens.npy`` (N,) int64.
    * ``scene_info.npy`` (training only): pickled dict ``{"calvin_scene_D": [first_id, last_id]}``.
    * ``statistics.yaml``: robot_obs / scene_obs NormalizeVector mean/std and act_min/max_bound.
    * ``lang_annotations/auto_lang_ann.npy``: pickled dict
      ``{"language": {"ann": [str], "task": [str], "emb": float32 (n, 1, 384)},
      "info": {"episodes": [], "indx": [(start, end), ...]}}`` with ``end = start + window`` (window 64 or
      33..48 as the annotator writes; readers treat ``end`` as inclusive); windows lie inside the segments,
      may overlap, and leave some frames unannotated. Validation also gets ``lang_annotations/embeddings.npy``
      (dict task -> {"emb": (k, 1, 384) float32, "ann": [str]}; inner shape assumed).
    """
    if split not in ("training", "validation"):
        raise ValueError("split must be 'training' or 'validation'")
    if num_frames < 124:
        raise ValueError("num_frames must be >= 124 (both segments must hold their annotation windows)")
    rng = np.random.default_rng(seed + (0 if split == "training" else 1000))
    start_id = (360575 if split == "training" else 53760) if start_id is None else start_id
    gap = 47 if gap is None else gap
    out = Path(root) / split
    if out.exists():
        shutil.rmtree(out)
    (out / "lang_annotations").mkdir(parents=True)

    L0 = int(round(num_frames * 0.55))
    lens = [L0, num_frames - L0]
    starts = [start_id, start_id + L0 + gap]
    segs = []
    for s0, L in zip(starts, lens):
        seg = _calvin_segment(rng, L)
        for t in range(L):
            np.savez_compressed(out / f"episode_{s0 + t:07d}.npz", **{k: seg[k][t] for k in CALVIN_NPZ_KEYS})
        segs.append(seg)
    ids = np.array([[s0, s0 + L - 1] for s0, L in zip(starts, lens)], dtype=np.int64)
    np.save(out / "ep_start_end_ids.npy", ids)
    np.save(out / "ep_lens.npy", np.array(lens, dtype=np.int64))
    if split == "training":
        np.save(out / "scene_info.npy", {"calvin_scene_D": [int(ids[0, 0]), int(ids[-1, 1])]}, allow_pickle=True)

    # statistics.yaml in the real format
    robot = np.concatenate([s["robot_obs"] for s in segs])
    scene = np.concatenate([s["scene_obs"] for s in segs])
    acts = np.concatenate([s["actions"] for s in segs])
    (out / "statistics.yaml").write_text(
        "robot_obs:\n  - _target_: calvin_agent.utils.transforms.NormalizeVector\n"
        f"    mean: {_fmt_list(robot.mean(0))}\n    std:  {_fmt_list(robot.std(0))}\n"
        "scene_obs:\n  - _target_: calvin_agent.utils.transforms.NormalizeVector\n"
        f"    mean: {_fmt_list(scene.mean(0))}\n    std:  {_fmt_list(scene.std(0))}\n\n"
        f"act_min_bound: {_fmt_list(acts.min(0))}\nact_max_bound: {_fmt_list(acts.max(0))}\n"
    )

    # language annotations: two windows per segment (spans as the annotator writes them)
    indx, ann, task = [], [], []
    for j, ((s0, e0), L) in enumerate(zip(ids, lens)):
        for span in ([64, 40] if j == 0 else [48, 33]):
            lo, hi = 1, L - span - 2  # keep a few frames at both ends unannotated
            st = int(s0 + rng.integers(lo, max(lo + 1, hi)))
            indx.append((np.int64(st), np.int64(st + span)))
            k = int(rng.integers(len(_CALVIN_TASKS)))
            task.append(_CALVIN_TASKS[k][0])
            ann.append(_CALVIN_TASKS[k][1])
    emb = _unit(rng, len(ann), 384)[:, None, :]
    lang = {"language": {"ann": ann, "task": task, "emb": emb}, "info": {"episodes": [], "indx": indx}}
    np.save(out / "lang_annotations" / "auto_lang_ann.npy", lang, allow_pickle=True)
    if split == "validation":
        embeddings = {
            t: {"emb": _unit(rng, 2, 384)[:, None, :], "ann": [a, a.replace("the ", "", 1)]} for t, a in _CALVIN_TASKS
        }
        np.save(out / "lang_annotations" / "embeddings.npy", embeddings, allow_pickle=True)
    return Path(root)


# ----------------------------------------------------------------------------------------------------
# LeRobot v3.0 and v2.1 (huggingface/lerobot)
# ----------------------------------------------------------------------------------------------------

LEROBOT_TASKS = ("pick up the red cube and place it in the bowl", "push the blue block to the left")
LEROBOT_CAMERAS = ("observation.images.top", "observation.images.wrist")
LEROBOT_SEEDS = {"v3.0": 6, "v2.1": 7}  # the writers' default seeds: lerobot_content(version) is what they wrote
_BLOCKS = 3  # base-8 digits of a frame's number, one grey block each


def lerobot_frame(camera, n, size=64):
    """Frame ``n`` (the frame's global ``index``) of camera 0 or 1, uint8 (size, size, 3): ``_BLOCKS`` flat 16x16
    blocks whose grey levels 16 + 32 d are the base-8 digits d of n (most significant first), over a smooth
    coloured texture (the camera's hue) that moves with n. Lossy video keeps the blocks' means within a few levels,
    so ``lerobot_frame_id`` tells which frame a decoder returned."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = np.array([(0.9, 0.6, 0.3), (0.3, 0.7, 0.9)][camera], np.float32)
    tex = 0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * xx + 0.07 * n + 0.5 * camera)) * np.cos(2 * np.pi * (yy - 0.05 * n))
    img = 40 + 180 * tex[..., None] * hue
    for k in range(_BLOCKS):
        img[4:20, 4 + 20 * k:20 + 20 * k] = 16 + 32 * (n // 8 ** (_BLOCKS - 1 - k) % 8)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def lerobot_frame_id(frame):
    """``n`` of a decoded ``lerobot_frame``; ``frame`` is uint8 (3, H, W) at the written size, as data.py decodes."""
    x = np.asarray(frame, np.float32).mean(0)
    digits = [int(round((x[8:16, 8 + 20 * k:16 + 20 * k].mean() - 16) / 32)) for k in range(_BLOCKS)]
    return sum(d * 8 ** (_BLOCKS - 1 - k) for k, d in enumerate(digits))


def lerobot_content(version, num_episodes=5, length=(8, 15), seed=None):
    """What ``write_lerobot_<version>`` writes with these arguments, per episode: index, length, state (T, 8),
    action (T, 7) (last dim a 0/1 gripper), task (an index into LEROBOT_TASKS), frames (global frame numbers)."""
    seed = LEROBOT_SEEDS[version] if seed is None else seed
    rng = np.random.default_rng(seed)
    episodes, start = [], 0
    for e, T in enumerate(_lengths(rng, num_episodes, length)):
        state = _smooth_walk(rng, T, 8, 0.02).astype(np.float32)
        grip = (np.arange(T) < int(rng.integers(2, T - 1))).astype(np.float32)  # open, then closed
        action = np.concatenate([_smooth_walk(rng, T, 6, 0.01), grip[:, None]], 1).astype(np.float32)
        episodes.append({"index": e, "length": T, "state": state, "action": action, "task": e % 2,
                         "frames": np.arange(start, start + T)})
        start += T
    return episodes


def _lerobot_codec():
    import av
    return "libsvtav1" if "libsvtav1" in av.codecs_available else "libx264"


def _encode_video(path, frames, fps, codec):
    """As lerobot's encode_video_frames (video_utils.py) with its default VideoEncoderConfig: yuv420p, GOP 2, crf 30
    (libsvtav1: preset 12, svtav1-params fast-decode=0). Returns the duration as get_video_duration_in_s reads it."""
    import av
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1's banner off (errors only)
    svt = {"preset": "12", "svtav1-params": "fast-decode=0"} if codec == "libsvtav1" else {}
    options = {"g": "2", "crf": "30", **svt}
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, fps, options=options)
        stream.pix_fmt, stream.width, stream.height = "yuv420p", frames.shape[2], frames.shape[1]
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as c:
        return float(c.streams.video[0].duration * c.streams.video[0].time_base)


def _concat_videos(paths, out_path):
    """As lerobot's concatenate_video_files: FFmpeg's concat demuxer, packets copied (no re-encoding)."""
    import av
    out_path.parent.mkdir(parents=True, exist_ok=True)
    listing = out_path.with_suffix(".ffconcat")
    listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p.resolve()}'\n" for p in paths))
    src = av.open(str(listing), "r", format="concat", options={"safe": "0"})
    dst = av.open(str(out_path), "w", options={"movflags": "faststart"})
    streams = {}
    for s in src.streams.video:
        streams[s.index] = dst.add_stream_from_template(template=s, opaque=True)
        streams[s.index].time_base = s.time_base
    for packet in src.demux():
        if packet.stream.index in streams and packet.dts is not None:
            packet.stream = streams[packet.stream.index]
            dst.mux(packet)
    src.close()
    dst.close()
    listing.unlink()


def _png(img):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _lerobot_features(fps, size, image_keys, codec):
    video_info = {"video.height": size, "video.width": size, "video.codec": "av1" if codec == "libsvtav1" else "h264",
                  "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps, "video.channels": 3,
                  "has_audio": False}
    cams = {k: {"dtype": "image" if k in image_keys else "video", "shape": [size, size, 3],
                "names": ["height", "width", "channels"], "info": None if k in image_keys else video_info}
            for k in LEROBOT_CAMERAS}
    scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
    return {"action": {"dtype": "float32", "shape": [7], "names": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]},
            "observation.state": {"dtype": "float32", "shape": [8], "names": [f"motor_{i}" for i in range(8)]},
            **cams, "timestamp": scalar("float32"), "frame_index": scalar("int64"), "episode_index": scalar("int64"),
            "index": scalar("int64"), "task_index": scalar("int64")}


def _lerobot_table(episodes, fps, size, image_keys, fixed):
    """One data parquet's rows (several episodes) as HF datasets writes them: action / observation.state as
    Sequence (v3.0: fixed-size lists; older datasets: lists), images as struct {bytes, path}."""
    import pyarrow as pa
    vec = (lambda n: pa.list_(pa.float32(), n)) if fixed else (lambda n: pa.list_(pa.float32()))
    cols = {"action": pa.array([r for e in episodes for r in e["action"].tolist()], vec(7)),
            "observation.state": pa.array([r for e in episodes for r in e["state"].tolist()], vec(8))}
    for cam, key in enumerate(LEROBOT_CAMERAS):
        if key in image_keys:
            cols[key] = pa.array([{"bytes": _png(lerobot_frame(cam, int(n), size)), "path": f"frame_{int(n):06d}.png"}
                                  for e in episodes for n in e["frames"]],
                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    cols["timestamp"] = pa.array(np.concatenate([np.arange(e["length"]) / fps for e in episodes]).astype(np.float32))
    cols["frame_index"] = pa.array(np.concatenate([np.arange(e["length"]) for e in episodes]).astype(np.int64))
    cols["episode_index"] = pa.array(np.concatenate([np.full(e["length"], e["index"]) for e in episodes])
                                     .astype(np.int64))
    cols["index"] = pa.array(np.concatenate([e["frames"] for e in episodes]).astype(np.int64))
    cols["task_index"] = pa.array(np.concatenate([np.full(e["length"], e["task"]) for e in episodes]).astype(np.int64))
    hf = {"info": {"features": {k: ({"_type": "Image"} if k in image_keys else {"dtype": "float32", "_type": "Value"})
                                for k in cols}}}
    return pa.table(cols).replace_schema_metadata({"huggingface": json.dumps(hf)})


def _stats(x):
    x = np.asarray(x, np.float64)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
            "count": [len(x)]}


def _lerobot_meta_stats(episodes):
    return {"action": _stats(np.concatenate([e["action"] for e in episodes])),
            "observation.state": _stats(np.concatenate([e["state"] for e in episodes]))}


def _lerobot_info(version, episodes, fps, size, image_keys, codec, **layout):
    return {"codebase_version": version, "robot_type": "so100", "total_episodes": len(episodes),
            "total_frames": int(sum(e["length"] for e in episodes)), "total_tasks": len(LEROBOT_TASKS), **layout,
            "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "features": _lerobot_features(fps, size, image_keys, codec)}


def write_lerobot_v30(root, num_episodes=5, length=(8, 15), episodes_per_data_file=3, episodes_per_video_file=2,
                      size=64, fps=10, image_keys=(), codec=None, seed=None):
    """A LeRobot v3.0 dataset in ``root`` (its folder), as lerobot's dataset_writer and dataset_metadata write it:

    * ``meta/info.json`` (codebase_version "v3.0", fps 10, features, data_path / video_path templates, chunks_size,
      data_files_size_in_mb, video_files_size_in_mb, splits), ``meta/stats.json``, ``meta/tasks.parquet`` (pandas:
      column task_index, the task strings as the index column ``task``, 2 tasks), ``meta/episodes/chunk-000/
      file-000.parquet`` (episode_index, tasks, length, data/chunk_index, data/file_index, dataset_from_index,
      dataset_to_index, videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}, meta/episodes/...,
      stats/<feature>/...).
    * ``data/chunk-000/file-XXX.parquet``: ``episodes_per_data_file`` episodes each (index, episode_index,
      frame_index, timestamp = frame_index / fps, task_index, observation.state 8-d, action 7-d with a 0/1 gripper).
    * ``videos/<camera>/chunk-000/file-XXX.mp4`` for ``observation.images.top`` and ``observation.images.wrist``:
      each episode encoded alone (AV1 with libsvtav1, else H.264: ``_encode_video``), then ``episodes_per_video_file``
      of them concatenated (``_concat_videos``); from_timestamp is the duration before the episode in its file.
      A camera in ``image_keys`` is dtype "image" instead: PNG bytes in the data parquet.

    Frame n of the dataset shows ``lerobot_frame(camera, n)``. Returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, codec = Path(root), codec or _lerobot_codec()
    episodes = lerobot_content("v3.0", num_episodes, length, seed)
    rows = [{"episode_index": e["index"], "tasks": [LEROBOT_TASKS[e["task"]]], "length": e["length"],
             "dataset_from_index": int(e["frames"][0]), "dataset_to_index": int(e["frames"][-1]) + 1,
             "data/chunk_index": 0, "data/file_index": e["index"] // episodes_per_data_file} for e in episodes]
    for f in range(0, num_episodes, episodes_per_data_file):
        path = root / "data" / "chunk-000" / f"file-{f // episodes_per_data_file:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_lerobot_table(episodes[f:f + episodes_per_data_file], fps, size, image_keys, True), path)
    for cam, key in enumerate(LEROBOT_CAMERAS):
        if key in image_keys:
            continue
        tmp = root / "tmp_videos"
        for f in range(0, num_episodes, episodes_per_video_file):
            group, t = episodes[f:f + episodes_per_video_file], 0.0
            paths = [tmp / f"episode_{e['index']:06d}.mp4" for e in group]
            for e, p in zip(group, paths):
                frames = np.stack([lerobot_frame(cam, int(n), size) for n in e["frames"]])
                duration = _encode_video(p, frames, fps, codec)
                rows[e["index"]].update({f"videos/{key}/chunk_index": 0,
                                         f"videos/{key}/file_index": f // episodes_per_video_file,
                                         f"videos/{key}/from_timestamp": t, f"videos/{key}/to_timestamp": t + duration})
                t += duration
            _concat_videos(paths, root / "videos" / key / "chunk-000" / f"file-{f // episodes_per_video_file:03d}.mp4")
        shutil.rmtree(tmp)
    for row, e in zip(rows, episodes):
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        for k, v in _lerobot_meta_stats([e]).items():
            row.update({f"stats/{k}/{s}": x for s, x in v.items()})
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pandas = {"index_columns": ["task"], "column_indexes": [],
              "creator": {"library": "pyarrow", "version": pa.__version__},
              "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                           "numpy_type": "int64", "metadata": None},
                          {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                           "metadata": None}]}
    tasks = pa.table({"task_index": pa.array(range(len(LEROBOT_TASKS)), pa.int64()), "task": list(LEROBOT_TASKS)})
    pq.write_table(tasks.replace_schema_metadata({"pandas": json.dumps(pandas)}), root / "meta" / "tasks.parquet")
    (root / "meta" / "stats.json").write_text(json.dumps(_lerobot_meta_stats(episodes), indent=4))
    info = _lerobot_info("v3.0", episodes, fps, size, image_keys, codec, chunks_size=1000, data_files_size_in_mb=100,
                         video_files_size_in_mb=200,
                         data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                         video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root


def write_lerobot_v21(root, num_episodes=5, length=(8, 15), chunks_size=3, size=64, fps=10, codec=None, seed=None):
    """A LeRobot v2.1 dataset in ``root``, as lerobot v2.1 wrote it (the layout convert_dataset_v21_to_v30 reads):
    ``meta/info.json`` (codebase_version "v2.1", total_chunks, total_videos, chunks_size, data_path
    "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet", video_path
    "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"), ``meta/episodes.jsonl``
    (episode_index, tasks, length), ``meta/tasks.jsonl`` (task_index, task), ``meta/episodes_stats.jsonl``; one
    parquet (lists, not fixed-size) and one mp4 per camera per episode, episode e in chunk e // chunks_size (3 here,
    so that episodes 3 and 4 lie in chunk-001). Frame n shows ``lerobot_frame(camera, n)``. Returns ``root``."""
    import pyarrow.parquet as pq
    root, codec = Path(root), codec or _lerobot_codec()
    episodes = lerobot_content("v2.1", num_episodes, length, seed)
    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    for e in episodes:
        chunk = e["index"] // chunks_size
        path = root / data_path.format(episode_chunk=chunk, episode_index=e["index"])
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_lerobot_table([e], fps, size, (), False), path)
        for cam, key in enumerate(LEROBOT_CAMERAS):
            _encode_video(root / video_path.format(episode_chunk=chunk, video_key=key, episode_index=e["index"]),
                          np.stack([lerobot_frame(cam, int(n), size) for n in e["frames"]]), fps, codec)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    (root / "meta" / "episodes.jsonl").write_text(jsonl(
        {"episode_index": e["index"], "tasks": [LEROBOT_TASKS[e["task"]]], "length": e["length"]} for e in episodes))
    (root / "meta" / "tasks.jsonl").write_text(jsonl({"task_index": i, "task": t} for i, t in enumerate(LEROBOT_TASKS)))
    (root / "meta" / "episodes_stats.jsonl").write_text(jsonl(
        {"episode_index": e["index"], "stats": _lerobot_meta_stats([e])} for e in episodes))
    info = _lerobot_info("v2.1", episodes, fps, size, (), codec, total_chunks=(num_episodes - 1) // chunks_size + 1,
                         total_videos=num_episodes * len(LEROBOT_CAMERAS), chunks_size=chunks_size,
                         data_path=data_path, video_path=video_path)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root


# ----------------------------------------------------------------------------------------------------
# TFDS reference reader
# ----------------------------------------------------------------------------------------------------


def flatten(tree, prefix=""):
    """Nested dict -> flat dict with "/"-joined keys (feature names containing "/" are kept verbatim,
    so ``steps/observation/clip_function_input/base_pose_tool_reached`` matches the tf.train.Example key)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def tfds_episodes(path, split="train", with_ids=False):
    """Read an RLDS/TFDS directory with TFDS itself and return one flat dict per episode.

    ``tfds.builder_from_directory(path).as_dataset(split, shuffle_files=False,
    decoders={"steps": SkipDecoding()})`` read with ``interleave_cycle_length=1``, i.e. shard by shard in
    file order and, within a shard, in record order (TFDS' default would interleave 16 shards).
    Values are exactly what ``tfds.as_numpy`` yields: under ``steps/`` images and zlib tensors stay
    encoded bytes (object arrays), strings are bytes, float64 stays float64, int32 stays int32;
    episode-level Text gives ``bytes`` and scalars numpy scalars. ``with_ids=True`` adds TFDS'
    ``tfds_id`` ("<file name>__<record index>") under the key ``"tfds_id"``.
    """
    tf, tfds = _tf()
    builder = tfds.builder_from_directory(str(path))
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"steps": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=with_ids),
    )
    return [flatten(ep) for ep in tfds.as_numpy(ds)]


def write_lerobot_copy(source, root, fps=10, codec="libsvtav1"):
    """A LeRobot v3.0 copy of a data.py source (RLDS, CALVIN or LeRobot) in ``root``, for comparing the two
    readers on the same frames (README, LeRobot speed): every frame as data.py decodes it, encoded as lerobot does
    (one mp4 per episode and camera, then concatenated per camera: one data file, one video file per camera)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import data
    s, root = data.Source(data.prepare(source)), Path(root)
    bounds = [(int(a), int(b)) for a, b in zip(s.start[:-1], s.start[1:])]
    keys = {v: f"observation.images.{v}" for v in s.views}
    rows = [{"episode_index": e, "tasks": [s.instructions[s.instruction[e]]], "length": b - a, "dataset_from_index": a,
             "dataset_to_index": b, "data/chunk_index": 0, "data/file_index": 0} for e, (a, b) in enumerate(bounds)]
    for view, key in keys.items():
        parts, t = [], 0.0
        for e, (a, b) in enumerate(bounds):
            frames = np.stack([f.permute(1, 2, 0).numpy() for f in s.images(view, list(range(a, b)))])
            parts.append(root / "tmp" / key / f"episode_{e:06d}.mp4")
            d = _encode_video(parts[-1], frames, fps, codec)
            rows[e].update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                            f"videos/{key}/from_timestamp": t, f"videos/{key}/to_timestamp": t + d})
            t += d
        _concat_videos(parts, root / "videos" / key / "chunk-000" / "file-000.mp4")
    shutil.rmtree(root / "tmp")
    lengths = np.diff(s.start)
    step = np.concatenate([np.arange(n) for n in lengths])
    S, A = s.state.shape[1], s.action.shape[1]
    table = pa.table({"action": pa.array(s.action.tolist(), pa.list_(pa.float32(), A)),
                      "observation.state": pa.array(s.state.tolist(), pa.list_(pa.float32(), S)),
                      "timestamp": pa.array((step / fps).astype(np.float32)),
                      "frame_index": pa.array(step.astype(np.int64)),
                      "episode_index": pa.array(np.repeat(np.arange(len(bounds)), lengths).astype(np.int64)),
                      "index": pa.array(np.arange(len(s), dtype=np.int64)),
                      "task_index": pa.array(np.repeat(s.instruction, lengths).astype(np.int64))})
    for folder in ("data/chunk-000", "meta/episodes/chunk-000"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.Table.from_pylist(rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array(range(len(s.instructions)), pa.int64()), "task": s.instructions}),
                   root / "meta" / "tasks.parquet")
    h, w = s.image(s.views[0], 0).shape[1:]
    video = {"video.height": h, "video.width": w, "video.codec": "av1" if codec == "libsvtav1" else "h264",
             "video.pix_fmt": "yuv420p", "video.fps": fps, "video.channels": 3, "has_audio": False}
    scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
    features = {"action": {"dtype": "float32", "shape": [A]}, "observation.state": {"dtype": "float32", "shape": [S]},
                **{k: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"], "info": video}
                   for k in keys.values()},
                "timestamp": scalar("float32"), **{k: scalar("int64") for k in
                                                  ("frame_index", "episode_index", "index", "task_index")}}
    info = {"codebase_version": "v3.0", "robot_type": s.name, "total_episodes": len(bounds), "total_frames": len(s),
            "total_tasks": len(s.instructions), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(bounds)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", "features": features}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root

"""Self-check of the dataset fixtures (tests/fixtures.py): they read back with TFDS / numpy with the
released keys, shapes and dtypes."""

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

from tests import fixtures

JPEG = "jpeg"  # marker: a (T,) object array of JPEG bytes


def check_episode(ep, expected):
    """``expected``: flat key -> (dtype, per-step shape) for ``steps/...``; JPEG -> (JPEG, HWC);
    episode-level keys -> python type or numpy dtype. Returns the number of steps."""
    assert set(ep) == set(expected), (sorted(set(ep) - set(expected)), sorted(set(expected) - set(ep)))
    T = len(ep["steps/is_first"])
    assert T > 0 and ep["steps/is_first"][0] and ep["steps/is_last"][-1] and ep["steps/is_last"].sum() == 1
    for key, spec in expected.items():
        v = ep[key]
        if not key.startswith("steps/"):
            if isinstance(spec, type) and not issubclass(spec, np.generic):
                assert isinstance(v, spec), (key, type(v))
            else:
                assert np.asarray(v).dtype == spec and np.ndim(v) == 0, (key, v)
            continue
        dtype, shape = spec
        if dtype == JPEG:
            assert v.dtype == object and v.shape == (T,), key
            assert all(isinstance(b, bytes) and b[:3] == b"\xff\xd8\xff" for b in v), key
            img = decode_jpeg(torch.frombuffer(bytearray(v[T // 2]), dtype=torch.uint8))
            assert tuple(img.shape) == (shape[2], shape[0], shape[1]), key
        elif dtype is bytes:
            assert v.dtype == object and v.shape == (T,) and all(isinstance(b, bytes) for b in v), key
        else:
            assert v.dtype == dtype and v.shape == (T, *shape), (key, v.dtype, v.shape)
    return T


def rlds_files(path, name, version, shards):
    info = json.loads((Path(path) / "dataset_info.json").read_text())
    assert info["name"] == name and info["version"] == version and not info.get("disableShuffling")
    assert (Path(path) / "features.json").is_file()
    for split, n in shards.items():
        names = sorted(p.name for p in Path(path).glob(f"{name}-{split}.tfrecord-*"))
        assert names == [f"{name}-{split}.tfrecord-{i:05d}-of-{n:05d}" for i in range(n)]
    return info


FLAGS = {"steps/is_first": (np.bool_, ()), "steps/is_last": (np.bool_, ()), "steps/is_terminal": (np.bool_, ())}


# --- RLDS -------------------------------------------------------------------------------------------

def test_bridge_sample(bridge_path):
    pytest.importorskip("tensorflow_datasets")  # torchvision is already imported (module top)
    for split in ("train", "val"):
        eps = fixtures.tfds_episodes(bridge_path, split)
        assert len(eps) == 25
        ep = eps[0]
        assert {f"steps/observation/image_{i}" for i in range(4)} <= set(ep)
        assert ep["steps/action"].dtype == np.float32 and ep["steps/action"].shape[1] == 7
        assert ep["steps/language_embedding"].shape[1] == 512


DROID = {
    "episode_metadata/file_path": bytes,
    "episode_metadata/recording_folderpath": bytes,
    **{f"steps/observation/{c}": (JPEG, (180, 320, 3))
       for c in ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")},
    "steps/observation/cartesian_position": (np.float64, (6,)),
    "steps/observation/gripper_position": (np.float64, (1,)),
    "steps/observation/joint_position": (np.float64, (7,)),
    **{f"steps/action_dict/{k}": (np.float64, (n,)) for k, n in
       [("cartesian_position", 6), ("cartesian_velocity", 6), ("gripper_position", 1),
        ("gripper_velocity", 1), ("joint_position", 7), ("joint_velocity", 7)]},
    "steps/action": (np.float64, (7,)),
    "steps/discount": (np.float32, ()),
    "steps/reward": (np.float32, ()),
    **FLAGS,
    **{f"steps/language_instruction{s}": (bytes, ()) for s in ("", "_2", "_3")},
}


def test_droid(droid_path):
    assert droid_path.parent.name == "droid_100" and droid_path.name == "1.0.0"
    rlds_files(droid_path, "r2d2_faceblur", "1.0.0", {"train": 3})
    eps = fixtures.tfds_episodes(droid_path)
    assert len(eps) == 5
    lengths, outcomes, empty_all, empty_3 = set(), set(), 0, 0
    for ep in eps:
        T = check_episode(ep, DROID)
        lengths.add(T)
        a = ep["steps/action"]
        assert np.array_equal(a, np.concatenate([ep["steps/action_dict/cartesian_position"],
                                                 ep["steps/action_dict/gripper_position"]], 1))
        path = ep["episode_metadata/file_path"].decode()
        success = "/success/" in path
        assert success or "/failure/" in path
        assert path.endswith("/trajectory.h5")
        assert ep["episode_metadata/recording_folderpath"].decode().endswith("/recordings/MP4")
        outcomes.add(success)
        assert ep["steps/reward"].tolist() == [0.0] * (T - 1) + [float(success)]
        assert ep["steps/is_terminal"][-1] and ep["steps/discount"].min() == 1.0
        instr = [ep[f"steps/language_instruction{s}"] for s in ("", "_2", "_3")]
        assert all(len(set(x)) == 1 for x in instr)  # repeated on every step
        empty_all += all(x[0] == b"" for x in instr)
        empty_3 += instr[0][0] != b"" and instr[2][0] == b""
    assert len(lengths) > 1 and outcomes == {True, False} and empty_all == 1 and empty_3 >= 1


RT1_ACTION = {
    "steps/action/base_displacement_vector": (np.float32, (2,)),
    "steps/action/base_displacement_vertical_rotation": (np.float32, (1,)),
    "steps/action/gripper_closedness_action": (np.float32, (1,)),
    "steps/action/rotation_delta": (np.float32, (3,)),
    "steps/action/terminate_episode": (np.int32, (3,)),
    "steps/action/world_vector": (np.float32, (3,)),
}

FRACTAL = {
    **{f"aspects/{k}": np.bool_ for k in ["already_success", "feasible", "has_aspects", "success", "undesirable"]},
    **{f"attributes/{b}{s}": (bytes if s else np.int64)
       for b in ["collection_mode", "data_type", "env", "location", "objects_family", "task_family"]
       for s in ("", "_name")},
    **RT1_ACTION,
    **FLAGS,
    "steps/reward": (np.float32, ()),
    "steps/observation/image": (JPEG, (256, 320, 3)),
    "steps/observation/natural_language_instruction": (bytes, ()),
    "steps/observation/natural_language_embedding": (np.float32, (512,)),
    **{f"steps/observation/{k}": (np.float32, s) for k, s in [
        ("base_pose_tool_reached", (7,)), ("gripper_closed", (1,)), ("gripper_closedness_commanded", (1,)),
        ("height_to_bottom", (1,)), ("orientation_box", (2, 3)), ("orientation_start", (4,)),
        ("robot_orientation_positions_box", (3, 3)), ("rotation_delta_to_go", (3,)), ("src_rotation", (4,)),
        ("vector_to_go", (3,)), ("workspace_bounds", (3, 3))]},
}


def check_rt1_action(ep, T):
    g = ep["steps/action/gripper_closedness_action"][:, 0]
    assert set(g.tolist()) <= {-1.0, 0.0, 1.0} and 1.0 in g
    term = ep["steps/action/terminate_episode"]
    assert (term.sum(1) == 1).all() and term[-1].tolist() == [1, 0, 0] and (term[:-1, 1] == 1).all()


def test_fractal(fractal_path):
    rlds_files(fractal_path, "fractal20220817_data", "0.1.0", {"train": 2})
    eps = fixtures.tfds_episodes(fractal_path)
    assert len(eps) == 4
    for ep in eps:
        T = check_episode(ep, FRACTAL)
        check_rt1_action(ep, T)
        q = ep["steps/observation/base_pose_tool_reached"][:, 3:]
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)


KUKA = {
    **RT1_ACTION,
    **FLAGS,
    "steps/reward": (np.float32, ()),
    "steps/observation/clip_function_input/base_pose_tool_reached": (bytes, ()),  # zlib, left encoded
    "steps/observation/gripper_closed": (bytes, ()),  # zlib, left encoded
    "steps/observation/clip_function_input/workspace_bounds": (np.float32, (3, 3)),
    "steps/observation/height_to_bottom": (np.float32, (1,)),
    "steps/observation/task_id": (np.float32, (1,)),
    "steps/observation/image": (JPEG, (512, 640, 3)),
    "steps/observation/natural_language_instruction": (bytes, ()),
    "steps/observation/natural_language_embedding": (np.float32, (512,)),
    "success": np.bool_,
}


def test_kuka(kuka_path):
    rlds_files(kuka_path, "kuka", "0.1.0", {"train": 2})
    feats = (kuka_path / "features.json").read_text()
    assert feats.count('"zlib"') == 2
    eps = fixtures.tfds_episodes(kuka_path)
    assert len(eps) == 3 and {bool(ep["success"]) for ep in eps} == {True, False}
    for ep in eps:
        T = check_episode(ep, KUKA)
        check_rt1_action(ep, T)
        pose = np.stack([np.frombuffer(zlib.decompress(b), np.float32)
                         for b in ep["steps/observation/clip_function_input/base_pose_tool_reached"]])
        grip = np.stack([np.frombuffer(zlib.decompress(b), np.float32) for b in ep["steps/observation/gripper_closed"]])
        assert pose.shape == (T, 7) and grip.shape == (T, 1) and set(grip[:, 0].tolist()) <= {0.0, 1.0}
        assert ep["steps/observation/natural_language_instruction"][0] == b"pick anything"


LANGUAGE_TABLE = {
    "episode_id": bytes,
    "steps/action": (np.float32, (2,)),
    **FLAGS,
    "steps/reward": (np.float32, ()),
    "steps/observation/effector_translation": (np.float32, (2,)),
    "steps/observation/effector_target_translation": (np.float32, (2,)),
    "steps/observation/instruction": (np.int32, (512,)),
    "steps/observation/rgb": (JPEG, (360, 640, 3)),
}


def test_language_table(language_table_path):
    rlds_files(language_table_path, "language_table", "0.0.1", {"train": 2})
    eps = fixtures.tfds_episodes(language_table_path)
    assert len(eps) == 3
    texts = set()
    for ep in eps:
        check_episode(ep, LANGUAGE_TABLE)
        row = ep["steps/observation/instruction"][0]
        n = int((row != 0).sum())
        assert (row[:n] != 0).all() and (row[n:] == 0).all()  # NUL-padded at the end
        texts.add("".join(map(chr, row[:n])))
    assert texts <= set(fixtures._LT_INSTRUCTIONS) and any(ord(c) > 127 for t in texts for c in t)


TACO = {
    "steps/action/actions": (np.float32, (7,)),
    "steps/action/rel_actions_world": (np.float32, (7,)),
    "steps/action/rel_actions_gripper": (np.float32, (7,)),
    "steps/action/terminate_episode": (np.float32, ()),
    **FLAGS,
    "steps/reward": (np.float32, ()),
    "steps/observation/rgb_static": (JPEG, (150, 200, 3)),
    "steps/observation/rgb_gripper": (JPEG, (84, 84, 3)),
    "steps/observation/depth_static": (np.float32, (150, 200)),
    "steps/observation/depth_gripper": (np.float32, (84, 84)),
    "steps/observation/robot_obs": (np.float32, (15,)),
    "steps/observation/natural_language_instruction": (bytes, ()),
    "steps/observation/structured_language_instruction": (bytes, ()),
    "steps/observation/natural_language_embedding": (np.float32, (512,)),
}


def test_taco_play(taco_path):
    rlds_files(taco_path, "taco_play", "0.1.0", {"train": 2, "test": 2})
    assert "encodingFormat" not in (taco_path / "features.json").read_text()  # as released
    for split, n in (("train", 3), ("test", 2)):
        eps = fixtures.tfds_episodes(taco_path, split)
        assert len(eps) == n
        for ep in eps:
            check_episode(ep, TACO)
            for k in ("actions", "rel_actions_world", "rel_actions_gripper"):
                assert set(ep[f"steps/action/{k}"][:, 6].tolist()) <= {-1.0, 1.0}
            assert np.abs(ep["steps/action/rel_actions_world"]).max() <= 1


def test_fixtures_are_deterministic(fractal_path, tmp_path):
    again = fixtures.write_fractal(tmp_path)
    for f in sorted(fractal_path.glob("*.tfrecord-*")):
        assert (again / f.name).read_bytes() == f.read_bytes()


# --- CALVIN -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["training", "validation"])
def test_calvin(calvin_path, split):
    d = calvin_path / split
    files = sorted(d.glob("episode_*.npz"))
    ids = np.array([int(f.stem.split("_")[1]) for f in files])
    assert all(len(f.stem) == len("episode_") + 7 for f in files) and ids.min() > 0
    se = np.load(d / "ep_start_end_ids.npy")
    lens = np.load(d / "ep_lens.npy")
    assert se.dtype == np.int64 and se.shape == (2, 2) and lens.tolist() == (se[:, 1] - se[:, 0] + 1).tolist()
    assert se[1, 0] > se[0, 1] + 1  # a gap of unused ids between the two segments
    assert ids.tolist() == [i for b, e in se for i in range(b, e + 1)]
    for f in files:
        with np.load(f) as z:
            assert list(z.keys()) == list(fixtures.CALVIN_NPZ_KEYS)
            for k, (shape, dtype) in fixtures.CALVIN_NPZ_KEYS.items():
                assert z[k].shape == shape and z[k].dtype == dtype, (f.name, k)
            assert np.abs(z["rel_actions"]).max() <= 1 and z["actions"][6] in (-1.0, 1.0)
            assert z["robot_obs"][14] in (-1.0, 1.0)
    with zipfile.ZipFile(files[0]) as z:  # np.savez_compressed, as calvin_env writes them
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    ann = np.load(d / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
    assert set(ann) == {"language", "info"} and ann["info"]["episodes"] == []
    n = len(ann["info"]["indx"])
    assert n >= 2 and len(ann["language"]["ann"]) == n and len(ann["language"]["task"]) == n
    emb = ann["language"]["emb"]
    assert emb.dtype == np.float32 and emb.shape == (n, 1, 384)
    covered = set()
    for b, e in ann["info"]["indx"]:
        assert any(s0 <= b and e <= s1 for s0, s1 in se) and (e - b == 64 or 33 <= e - b <= 48)
        covered |= set(range(b, e + 1))
    assert set(ids) - covered  # some frames carry no annotation
    assert (d / "scene_info.npy").exists() == (split == "training")
    if split == "training":
        info = np.load(d / "scene_info.npy", allow_pickle=True).item()
        assert info == {"calvin_scene_D": [int(se[0, 0]), int(se[-1, 1])]}
    else:
        assert (d / "lang_annotations" / "embeddings.npy").exists()
    assert "act_min_bound" in (d / "statistics.yaml").read_text()


@pytest.mark.parametrize("problem", ["empty", "nan"])
def test_bad_droid(problem, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    path = fixtures.write_bad_droid(tmp_path, problem=problem)
    eps = fixtures.tfds_episodes(path)
    assert len(eps) == 3
    lengths = sorted(len(ep["steps/is_first"]) for ep in eps)
    if problem == "empty":
        assert lengths[0] == 0 and lengths[1] > 0
    else:
        bad = [ep for ep in eps if not np.isfinite(ep["steps/action"]).all()]
        assert len(bad) == 1 and np.isnan(bad[0]["steps/action"][2, 0]) and np.isfinite(bad[0]["steps/action"][3]).all()
        assert np.isnan(bad[0]["steps/action_dict/cartesian_velocity"][2, 0])

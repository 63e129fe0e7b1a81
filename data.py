"""data.py: real robot datasets in, windows of tensors out.

Reads, without TensorFlow:
  * RLDS as TFDS writes it (Open X-Embodiment, DROID, and what eval_sim.py collects from MetaWorld):
    <dir>/<version>/{dataset_info.json, features.json, <name>-<split>.tfrecord-*}
  * CALVIN: <root>/{training,validation}/episode_XXXXXXX.npz + ep_start_end_ids.npy + lang_annotations/
  * LeRobot v3.0 and v2.1 (huggingface/lerobot): <root>/meta/info.json, parquet frames, mp4 videos read by
    timestamp (or hf:ORG/NAME, a dataset already in the local Hugging Face cache)

Two stages, as nanoGPT's prepare.py + memmap (see ../shared/DESIGN.md):
  1. prepare(): one pass over the files (checking every record's CRC-32C and every shard's length, as
     TFDS does) maps every episode to the standard keys (7-d end-effector delta action [dx, dy, dz, droll,
     dpitch, dyaw, gripper], gripper 1 = open / 0 = closed, as Octo does) and caches numeric arrays,
     normalisation statistics and a pointer (shard, offset, length, CRC-32C) to every JPEG.
  2. Mixture (a map-style torch Dataset) cuts windows (history T, action chunk K, goal / future frames)
     and decodes only the JPEGs it needs, with torchvision, in DataLoader workers; or, for small data
     (cache_frames, section 7), reads the frames from a uint8 memmap into which each was decoded once at the
     training size. A seeded sampler makes the order exact, the same on any number of ranks, and resumable
     at any step.

    python data.py PATH            # summary: episodes, steps, keys, shapes, instructions, statistics
    python data.py PATH --bench    # samples/s and decoded frames/s
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

CACHE_VERSION = 2  # bump when the cache layout or a mapping changes
VIEWS = ("primary", "secondary", "wrist")


class DataError(ValueError):
    """Bad input data: the message names the file or key and what was expected."""


# ---------------------------------------------------------------------------------------------------
# 1. TFRecord framing and the tf.train.Example wire format (specs/data_formats.md, section 4.2)

def masked_crc32c(data):
    """TFRecord's checksum: the CRC-32C of the bytes, rotated right by 15 bits plus a constant
    (tensorflow/core/lib/hash/crc32c.h, Mask)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(path):
    """Yield (offset, payload) for every record, each checked as TensorFlow's reader does (DataLossError).
    Frame: u64 length, u32 masked CRC-32C of the length, payload, u32 masked CRC-32C of the payload."""
    pos, size = 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f"{path}: truncated tfrecord header at byte {pos}")
            (n,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != crc:
                raise DataError(f"{path}: corrupted record at byte {pos}: its length field fails the CRC-32C check; "
                                f"expected an intact TFRecord (copy this shard again)")
            if pos + 16 + n > size:
                raise DataError(f"{path}: record at byte {pos} claims {n} bytes, past the end of the file")
            payload = f.read(n)
            (crc,) = struct.unpack("<I", f.read(4))
            if masked_crc32c(payload) != crc:
                raise DataError(f"{path}: corrupted record at byte {pos}: its {n} bytes fail the CRC-32C check; "
                                f"expected an intact TFRecord (copy this shard again)")
            yield pos + 12, payload
            pos += 16 + n


def _varint(buf, i):
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _fields(buf, start, end):
    """Protobuf fields in buf[start:end] as (field number, wire type, value); value is a (start, end)
    span for length-delimited and fixed-width fields and an int for varints."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = (i, i + n), i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = (i, i + n), i + n
        else:
            raise DataError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, value


def _int64s(buf, start, end):
    values = []
    for _, wire, value in _fields(buf, start, end):
        if wire == 2:  # packed varints
            i, end = value
            while i < end:
                v, i = _varint(buf, i)
                values.append(v)
        else:
            values.append(value)
    return np.array([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=np.int64)


def _floats(buf, start, end):
    parts = [np.frombuffer(buf[s:e], "<f4") for _, _, (s, e) in _fields(buf, start, end)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def parse_example(buf):
    """tf.train.Example -> {key: ("bytes", [spans]) | ("float", array) | ("int64", array)}.
    Example{1: Features{1: map<key, Feature{1: BytesList | 2: FloatList | 3: Int64List}>}}"""
    out = {}
    for _, _, (s0, e0) in _fields(buf, 0, len(buf)):
        for _, _, (s1, e1) in _fields(buf, s0, e0):  # one map entry
            key, feature = None, ("bytes", [])
            for no, _, (s2, e2) in _fields(buf, s1, e1):
                if no == 1:
                    key = bytes(buf[s2:e2]).decode()
                    continue
                for kind, _, (s3, e3) in _fields(buf, s2, e2):
                    if kind == 1:
                        feature = ("bytes", [span for _, _, span in _fields(buf, s3, e3)])
                    elif kind == 2:
                        feature = ("float", _floats(buf, s3, e3))
                    else:
                        feature = ("int64", _int64s(buf, s3, e3))
            out[key] = feature
    return out


# ---------------------------------------------------------------------------------------------------
# 2. features.json: which key holds what, per step or per episode

@dataclass(frozen=True)
class Feature:
    kind: str  # "tensor" (numbers), "bytes" (image, text, string, zlib: kept encoded, as TFDS SkipDecoding)
    shape: tuple
    dtype: str
    per_step: bool
    encoding: str = "none"

    @property
    def image(self):  # an encoded image (text is dtype "string", kuka's zlib tensors have an encoding)
        return self.kind == "bytes" and self.dtype != "string" and self.encoding == "none"


def read_features(rlds_dir):
    """Flatten features.json into {"steps/observation/image": Feature, ...}."""
    path = Path(rlds_dir) / "features.json"
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the TFDS feature spec ({e})") from e
    out = {}

    def walk(node, prefix, per_step):
        try:
            cls = node["pythonClassName"].rsplit(".", 1)[-1]
            if cls == "FeaturesDict":
                for name, child in node["featuresDict"]["features"].items():
                    walk(child, f"{prefix}{name}/", per_step)
            elif cls == "Dataset":
                walk(node["sequence"]["feature"], prefix, True)
            elif cls in ("Tensor", "Scalar", "ClassLabel", "Image", "Text"):
                spec = node.get("tensor") or node.get("image") or {}
                shape = tuple(int(d) for d in spec.get("shape", {}).get("dimensions", []))
                dtype = {"Text": "string", "ClassLabel": "int64"}.get(cls, spec.get("dtype", "string"))
                dtype = "uint8" if cls == "Image" and dtype == "string" else dtype
                encoded = cls == "Image" or dtype == "string" or spec.get("encoding", "none") != "none"
                out[prefix[:-1]] = Feature("bytes" if encoded else "tensor", shape, dtype, per_step,
                                           spec.get("encoding", "none"))
            else:
                raise DataError(f"{path}: feature class {cls} at {prefix[:-1]} is not supported")
        except DataError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a node of another shape
            raise DataError(f"{path}: feature '{prefix[:-1] or '(root)'}' does not follow the TFDS feature spec "
                            f"({type(e).__name__}: {e}); expected an object with pythonClassName and that "
                            f"class's fields (featuresDict, sequence, tensor or image)") from e

    walk(tree, "", False)
    if not any(f.per_step for f in out.values()):
        raise DataError(f"{path}: no per-step features; expected an RLDS episode spec (a FeaturesDict with a "
                        f"'steps' Dataset)")
    return out


def decode_feature(buf, parsed, key, feature):
    """One key of a parsed episode as TFDS (SkipDecoding) returns it: bytes stay bytes, numbers get
    their dtype back (float64 is stored as float32 on disk, bools and ints as int64)."""
    if key not in parsed:
        raise KeyError(key)
    kind, payload = parsed[key]
    if feature.kind == "bytes":
        values = np.empty(len(payload), dtype=object)
        values[:] = [bytes(buf[s:e]) for s, e in payload]
        shape = feature.shape if feature.dtype == "string" else ()  # an image or zlib blob is one value
        if not feature.per_step:
            return values.reshape(shape)[()] if values.size else b""
        return values.reshape((-1, *shape))
    dtype = np.bool_ if feature.dtype == "bool" else np.dtype(feature.dtype)
    values = np.asarray(payload).astype(dtype)
    return values.reshape((-1, *feature.shape)) if feature.per_step else values.reshape(feature.shape)


class Episode:
    """One RLDS episode, decoded key by key on demand. ep["action/world_vector"] reads steps/..."""

    def __init__(self, buf, parsed, features, where):
        self.buf, self.parsed, self.features, self.where = buf, parsed, features, where

    def __getitem__(self, key):
        full = key if key.startswith(("steps/", "episode_metadata/")) else f"steps/{key}"
        if full not in self.features:
            raise DataError(f"{self.where}: no key '{full}'; the dataset has: {', '.join(sorted(self.features))}")
        value = decode_feature(self.buf, self.parsed, full, self.features[full])
        if self.features[full].encoding == "zlib":  # kuka's compressed tensors
            shape, dtype = self.features[full].shape, np.dtype(self.features[full].dtype)
            value = np.stack([np.frombuffer(zlib.decompress(b), dtype).reshape(shape) for b in value])
        return value

    def spans(self, key):
        """(start, end) of each step's encoded bytes (an image) inside the record."""
        if f"steps/{key}" not in self.parsed:
            self[key]  # raises the DataError that lists the keys
        return self.parsed[f"steps/{key}"][1]

    def raw(self):
        """Every key as TFDS returns it (the parity test compares this with TFDS, byte for byte)."""
        return {k: decode_feature(self.buf, self.parsed, k, f) for k, f in self.features.items()}


def read_info(rlds_dir):
    """dataset_info.json, checked for what is read from it: a 'name' and a list of 'splits'."""
    path = Path(rlds_dir) / "dataset_info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the TFDS dataset info ({e}); expected a JSON object") from e
    if not isinstance(info, dict):
        raise DataError(f"{path}: a JSON {type(info).__name__}; expected an object with 'name' and 'splits'")
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise DataError(f"{path}: no 'name'; expected the dataset's name (the prefix of its shard files)")
    splits = info.get("splits", [])
    if not isinstance(splits, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in splits):
        raise DataError(f"{path}: 'splits' is {json.dumps(splits)[:80]}; expected a list of objects with a 'name'")
    return info


def rlds_shards(rlds_dir, split):
    """(dataset name, shard files in order, records in each as shardLengths says, or None where it says nothing)."""
    info, path = read_info(rlds_dir), Path(rlds_dir) / "dataset_info.json"
    splits = {s["name"]: s for s in info["splits"]}
    if split not in splits:
        raise DataError(f"{path}: no split '{split}'; it has {sorted(splits)}")
    name = info["name"]
    shards = sorted(Path(rlds_dir).glob(f"{name}-{split}.tfrecord-*"))
    if not shards:
        raise DataError(f"{rlds_dir}: no files {name}-{split}.tfrecord-* for split '{split}'")
    if "shardLengths" not in splits[split]:
        return name, shards, [None] * len(shards)
    try:
        lengths = [int(n) for n in splits[split]["shardLengths"]]
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: split '{split}': shardLengths is not a list of record counts ({e})") from e
    if len(lengths) != len(shards):  # TFDS names shards <name>-<split>.tfrecord-<i>-of-<n>
        found = {s.name for s in shards}
        missing = [f for i in range(len(lengths)) if (f := f"{name}-{split}.tfrecord-{i:05d}-of-{len(lengths):05d}")
                   not in found]
        raise DataError(f"{path}: split '{split}' has {len(lengths)} shards (shardLengths) but {len(shards)} files "
                        f"{name}-{split}.tfrecord-* are here" + (f"; missing {', '.join(missing)}" if missing else ""))
    return name, shards, lengths


def check_shard_length(shard, records, expected):
    """TFDS's check: a shard holds the number of records dataset_info.json lists (a shard cut at a record
    boundary passes every CRC and would silently lose its last episodes)."""
    if expected is not None and records != expected:
        raise DataError(f"{shard}: {records} records, but dataset_info.json's shardLengths says {expected}; "
                        f"the shard is cut or was replaced (copy it again)")


def rlds_episodes(rlds_dir, split="train"):
    """Yield every episode of a split in file order (the order TFDS reads with shuffle_files=False)."""
    features = read_features(rlds_dir)
    _, shards, lengths = rlds_shards(rlds_dir, split)
    for shard, expected in zip(shards, lengths):
        n = 0
        for _, buf in tfrecords(shard):
            yield Episode(buf, parse_example(buf), features, f"{shard.name} episode {n}")
            n += 1
        check_shard_length(shard, n, expected)


# ---------------------------------------------------------------------------------------------------
# 3. The standard keys: one mapping per known dataset (Octo's oxe_standardization_transforms)

def rel2abs_gripper(rel):
    """Relative gripper (+1 close, -1 open, 0 keep) -> absolute (1 open, 0 closed). Starts in the state
    opposite to the first command, or open if there is none (Octo's rel2abs_gripper_actions)."""
    cmd = np.where(rel < -0.1, 1, np.where(rel > 0.1, -1, 0))
    nonzero = np.flatnonzero(cmd)
    state = -cmd[nonzero[0]] if len(nonzero) else 1
    out = np.empty(len(cmd), np.float32)
    for t, c in enumerate(cmd):
        state = c if c != 0 else state
        out[t] = state / 2 + 0.5
    return out


def binarize_gripper(g):
    """Continuous gripper (1 open) -> 0/1; in-between values take the next decided state (Octo)."""
    out, carry = np.empty(len(g), np.float32), g[-1]
    for t in range(len(g) - 1, -1, -1):
        if g[t] > 0.95 or g[t] < 0.05:
            carry = float(g[t] > 0.95)
        out[t] = carry
    return out


def _wv_rd(ep, gripper):
    """world_vector ++ rotation_delta ++ gripper, the RT-1 style dict action."""
    return np.concatenate([ep["action/world_vector"], ep["action/rotation_delta"], gripper[:, None]], 1)


def _bridge_action(ep):
    # Octo's bridge_dataset_transform: binarise the gripper, then relabel the motion with the reached
    # state: a_t = state_{t+1} - state_t; the last step has no successor and is dropped (trim below).
    state, action = ep["observation/state"], ep["action"]
    moved = np.concatenate([state[1:, :6] - state[:-1, :6], np.full((1, 6), np.nan, np.float32)])
    return np.concatenate([moved, binarize_gripper(action[:, 6])[:, None]], 1)


def _bridge_oxe_action(ep):  # the OXE bucket copy "bridge" had a dict action in older snapshots
    if "steps/action/world_vector" in ep.features:
        return _wv_rd(ep, ep["action/open_gripper"].astype(np.float32))
    return _bridge_action(ep)


def _language_table_text(ep):  # int32[512] unicode code points, NUL-padded
    codes = ep["observation/instruction"][0]
    return "".join(map(chr, codes[: np.argmax(codes == 0) if (codes == 0).any() else len(codes)]))


def _droid_text(ep):  # three annotations per episode, any may be empty: take the first one given
    texts = [ep[f"language_instruction{s}"][0].decode() for s in ("", "_2", "_3")]
    return next((t for t in texts if t), "")


@dataclass(frozen=True)
class Mapping:
    """How one dataset's keys (relative to steps/) become the standard keys."""
    primary: str | None
    action: Callable  # Episode -> (T, 7) float
    state: tuple = ()
    wrist: str | None = None
    secondary: str | None = None
    instruction: str | Callable | None = None
    embedding: str | None = None
    trim_end: int = 0  # steps dropped at the end (actions relabelled from the next state)


_RT1 = dict(instruction="observation/natural_language_instruction",
            embedding="observation/natural_language_embedding")
STANDARD = {
    "fractal20220817_data": Mapping(
        "observation/image", lambda ep: _wv_rd(ep, rel2abs_gripper(ep["action/gripper_closedness_action"][:, 0])),
        state=("observation/base_pose_tool_reached", "observation/gripper_closed"), **_RT1),
    "kuka": Mapping(
        "observation/image", lambda ep: _wv_rd(ep, rel2abs_gripper(ep["action/gripper_closedness_action"][:, 0])),
        state=("observation/clip_function_input/base_pose_tool_reached", "observation/gripper_closed"), **_RT1),
    "bridge_dataset": Mapping(
        "observation/image_0", _bridge_action, state=("observation/state",), secondary="observation/image_1",
        instruction="language_instruction", embedding="language_embedding", trim_end=1),
    "bridge": Mapping(
        "observation/image_0", _bridge_oxe_action, state=("observation/state",), secondary="observation/image_1",
        instruction="language_instruction", embedding="language_embedding", trim_end=1),
    "taco_play": Mapping(
        "observation/rgb_static", lambda ep: np.concatenate([ep["action/rel_actions_world"][:, :6],
                                                             np.clip(ep["action/rel_actions_world"][:, 6:], 0, 1)], 1),
        state=("observation/robot_obs",), wrist="observation/rgb_gripper", **_RT1),
    "jaco_play": Mapping(
        "observation/image", lambda ep: np.concatenate([
            ep["action/world_vector"], np.zeros_like(ep["action/world_vector"]),
            rel2abs_gripper(ep["action/gripper_closedness_action"][:, 0])[:, None]], 1),
        state=("observation/end_effector_cartesian_pos",), wrist="observation/image_wrist", **_RT1),
    "berkeley_cable_routing": Mapping(
        "observation/image", lambda ep: _wv_rd(ep, np.zeros(len(ep["action/world_vector"]), np.float32)),
        state=("observation/robot_state",), wrist="observation/wrist45_image", secondary="observation/top_image",
        instruction="observation/natural_language_instruction"),
    "roboturk": Mapping(
        "observation/front_rgb", lambda ep: _wv_rd(ep, 1 - np.clip(ep["action/gripper_closedness_action"][:, 0], 0, 1)),
        instruction="observation/natural_language_instruction"),
    "viola": Mapping(
        "observation/agentview_rgb",
        lambda ep: _wv_rd(ep, 1 - np.clip(ep["action/gripper_closedness_action"][:, 0], 0, 1)),
        state=("observation/joint_states", "observation/gripper_states"), wrist="observation/eye_in_hand_rgb",
        instruction="observation/natural_language_instruction"),
    "berkeley_autolab_ur5": Mapping(
        "observation/image", lambda ep: _wv_rd(ep, rel2abs_gripper(ep["action/gripper_closedness_action"].reshape(-1))),
        state=("observation/robot_state",), wrist="observation/hand_image", **_RT1),
    "toto": Mapping(
        "observation/image", lambda ep: _wv_rd(ep, ep["action/open_gripper"].reshape(-1).astype(np.float32)),
        state=("observation/state",), instruction="observation/natural_language_instruction"),
    "language_table": Mapping(
        "observation/rgb", lambda ep: np.concatenate([ep["action"], np.zeros((len(ep["action"]), 4), np.float32),
                                                      np.ones((len(ep["action"]), 1), np.float32)], 1),
        state=("observation/effector_translation",), instruction=_language_table_text),
    # DROID (droid, droid_100; internal name r2d2_faceblur): `action` holds the absolute commanded pose, so
    # the delta action is rebuilt from action_dict as OpenVLA's droid_baseact_transform does.
    "r2d2_faceblur": Mapping(
        "observation/exterior_image_1_left", lambda ep: np.concatenate([
            ep["action_dict/cartesian_velocity"], 1 - ep["action_dict/gripper_position"]], 1),
        state=("observation/cartesian_position", "observation/gripper_position"),
        secondary="observation/exterior_image_2_left", wrist="observation/wrist_image_left", instruction=_droid_text),
    # MetaWorld as eval_sim.py collects it: action [dx, dy, dz, grab effort (+1 close)] -> standard 7-d.
    "metaworld": Mapping(
        "observation/image", lambda ep: np.concatenate([
            ep["action"][:, :3], np.zeros((len(ep["action"]), 3), np.float32), (1 - ep["action"][:, 3:]) / 2], 1),
        state=("observation/state",), wrist="observation/wrist_image", instruction="language_instruction"),
}
STANDARD["droid"] = STANDARD["r2d2_faceblur"]
STANDARD["fractal_20220817_data"] = STANDARD["fractal20220817_data"]
KEY_FLAGS = ("image_key", "secondary_key", "wrist_key", "state_key", "action_key", "instruction_key")


def mapping_for(name, features, keys=None):
    """The table's mapping, or one built from --image_key/--state_key/--action_key/... flags."""
    keys = {k: v for k, v in (keys or {}).items() if v}
    if not keys and name in STANDARD:
        return STANDARD[name]
    if "image_key" in keys and "action_key" in keys:
        check_keys(features, keys)
        act = keys["action_key"]
        return Mapping(keys["image_key"], lambda ep: ep[act].reshape(len(ep[act]), -1).astype(np.float32),
                       state=tuple(keys.get("state_key", "").split("+")) if keys.get("state_key") else (),
                       wrist=keys.get("wrist_key"), secondary=keys.get("secondary_key"),
                       instruction=keys.get("instruction_key"))
    obs = sorted(k[len("steps/"):] for k in features if k.startswith("steps/observation/"))
    act = sorted(k[len("steps/"):] for k in features if k.startswith("steps/action"))
    raise DataError(
        f"dataset '{name}' is not in data.STANDARD (known: {', '.join(sorted(STANDARD))}).\n"
        f"  observation keys: {', '.join(obs)}\n  action keys: {', '.join(act)}\n"
        f"Map it with --image_key KEY --action_key KEY [--secondary_key KEY] [--wrist_key KEY] "
        f"[--state_key KEY[+KEY]] [--instruction_key KEY] (keys relative to steps/; the action is then used as "
        f"stored).")


def check_keys(features, keys):
    """--image_key, --secondary_key, --wrist_key name per-step encoded images; --action_key and each
    --state_key part per-step numbers. A key the dataset lacks is named later, with the list of keys."""
    def what(f):
        if f.image or f.dtype == "string":
            return "an encoded image" if f.image else "text"
        return f"{f.dtype} numbers {list(f.shape)}" + ("" if f.per_step else " (once per episode)")

    def per_step(image):
        return ", ".join(k[len("steps/"):] for k, f in sorted(features.items())
                         if k.startswith("steps/") and f.per_step and f.image == image and f.dtype != "string")

    for flag, value in keys.items():
        if flag == "instruction_key":
            continue
        image = flag in ("image_key", "secondary_key", "wrist_key")
        for key in value.split("+") if flag == "state_key" else [value]:
            full = key if key.startswith(("steps/", "episode_metadata/")) else f"steps/{key}"
            f = features.get(full)
            if f is not None and (f.image != image or f.dtype == "string" or not f.per_step):
                raise DataError(f"--{flag} {key}: '{full}' holds {what(f)}; expected "
                                f"{'a per-step encoded image' if image else 'per-step numbers'}, such as: "
                                f"{per_step(image)}")


def _text(ep, spec):
    if spec is None:
        return ""
    if callable(spec):
        return spec(ep)
    value = ep[spec][0]
    return value.decode() if isinstance(value, bytes) else str(value)


def check_finite(where, **arrays):
    """Refuse NaN or infinite actions and states, naming the first bad step and dimension."""
    for name, arr in arrays.items():
        bad = np.argwhere(~np.isfinite(arr))
        if len(bad):
            raise DataError(f"{where}: {name} is not finite at step {bad[0][0]} (dim {bad[0][1]}); "
                            f"expected finite numbers")


def standardize(ep, m, where):
    """Episode -> dict of standard numpy arrays + image pointers, checked for the usual corruptions."""
    T = len(ep["is_first"]) if "steps/is_first" in ep.features else None
    action = np.asarray(m.action(ep), np.float32)
    T = len(action) if T is None else T
    if T == 0:
        raise DataError(f"{where}: empty episode (0 steps); expected at least one step")
    states = [ep[k].reshape(T, -1).astype(np.float32) for k in m.state]
    state = np.concatenate(states, 1) if states else np.zeros((T, 0), np.float32)
    keep = T - m.trim_end
    out = {"state": state[:keep], "action": action[:keep], "instruction": _text(ep, m.instruction),
           "embedding": ep[m.embedding][0].astype(np.float32) if m.embedding else None}
    check_finite(where, action=out["action"], state=out["state"])
    for view in VIEWS:
        key = getattr(m, view)
        if key is not None:
            out[view] = np.array(ep.spans(key)[:keep], np.int64).reshape(-1, 2)
    return out


# ---------------------------------------------------------------------------------------------------
# 4. prepare: one pass over the files, cached beside nothing (the data may be read-only)

def cache_root():
    return Path(os.environ.get("NANOROBOT_CACHE", Path.home() / ".cache" / "nanorobot"))


def detect(path):
    """('rlds', version dir), ('calvin', split root) or ('lerobot', root) for a path or hf:ORG/NAME, or a clear
    error."""
    if str(path).startswith(("gs://", "s3://", "http://", "https://")):
        raise DataError(f"{path}: remote paths are not read directly; copy the dataset to a local disk first "
                        f"(e.g. gsutil -m cp -r {path} ./data/) and pass the local folder")
    p = hf_snapshot(str(path)[3:]) if str(path).startswith("hf:") else Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (expected an RLDS dataset, a CALVIN folder or a LeRobot "
                        f"dataset)")
    if (p / "meta" / "info.json").exists():
        return "lerobot", p
    if (p / "dataset_info.json").exists():
        return "rlds", p
    versions = sorted((d for d in p.iterdir() if (d / "dataset_info.json").exists()),
                      key=lambda d: [int(x) if x.isdigit() else x for x in d.name.split(".")])
    if versions:
        return "rlds", versions[-1]
    if (p / "ep_start_end_ids.npy").exists() or (p / "training").is_dir() or (p / "validation").is_dir():
        return "calvin", p
    raise DataError(f"{p}: no known format. Expected RLDS (dataset_info.json + features.json + *.tfrecord-*, "
                    f"in this folder or a version folder below it), CALVIN (training/ or validation/ with "
                    f"episode_XXXXXXX.npz and ep_start_end_ids.npy) or LeRobot (meta/info.json, data/, videos/)")


def _prepare_shard(args):
    rlds_dir, shard, shard_id, name, keys, expected = args
    features = read_features(rlds_dir)
    m = mapping_for(name, features, keys)
    episodes = []
    for n, (offset, buf) in enumerate(tfrecords(shard)):
        where = f"{shard} (episode {n})"
        std = standardize(Episode(buf, parse_example(buf), features, where), m, where)
        raw = np.frombuffer(buf, np.uint8)
        for view in VIEWS:  # spans inside the record -> (shard, offset in file, length, CRC-32C of the bytes)
            if view in std:
                s = std[view]
                crc = np.array([google_crc32c.value(raw[a:b]) for a, b in s.tolist()], np.int64)
                std[view] = np.stack([np.full(len(s), shard_id), offset + s[:, 0], s[:, 1] - s[:, 0], crc], 1)
        episodes.append(std)
    check_shard_length(shard, len(episodes), expected)
    return episodes


# CALVIN's annotations are a pickle (np.save of a dict), and unpickling runs whatever the file names. Only
# what the real file holds is admitted: dicts, lists, tuples, strings and numbers are plain pickle opcodes;
# numpy arrays and scalars need these names (numpy >= 2 writes numpy._core, older numpy numpy.core).
_RECONSTRUCT, _SCALAR = np.zeros(0).__reduce__()[0], np.float32(0).__reduce__()[0]
SAFE_PICKLE_NAMES = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                     **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
                     **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")}}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_PICKLE_NAMES:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return SAFE_PICKLE_NAMES[(module, name)]


def load_pickled_npy(path):
    """np.load(path, allow_pickle=True).item() through SafeUnpickler: a crafted file cannot run code."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"npy format version {version}")
            shape, _, dtype = read_header[version](f)
            if dtype != object:
                raise ValueError(f"a {dtype} array of shape {shape}, not a pickled object")
            obj = SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}: only dicts, lists, strings, numbers and numpy arrays are read from this "
                        f"pickle (a crafted file can run code when unpickled)") from e
    except (OSError, ValueError, EOFError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{path}: cannot read the pickled .npy ({type(e).__name__}: {e})") from e
    return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj


def calvin_annotations(path):
    """auto_lang_ann.npy -> [(start, end, instruction, embedding)], end inclusive, checked for its layout
    {"language": {"ann": [str], "emb": (n, 1, D) floats, ...}, "info": {"indx": [(start, end)], ...}}."""
    ann = load_pickled_npy(path)
    try:
        indx, texts = ann["info"]["indx"], ann["language"]["ann"]
        emb = np.asarray(ann["language"]["emb"], np.float32).reshape(len(indx), -1)
        spans = [(int(s), int(e)) for s, e in indx]
        if len(texts) != len(spans) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"len(info.indx) = {len(spans)}, len(language.ann) = {len(texts)}; "
                             f"expected one instruction string per window")
        if any(s > e for s, e in spans):
            raise ValueError(f"window {next((s, e) for s, e in spans if s > e)} ends before it starts")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{path}: malformed annotation file ({type(e).__name__}: {e}); expected CALVIN's dict "
                        "{'language': {'ann': [str], 'emb': (n, 1, D) floats}, 'info': {'indx': [(start, end)]}}"
                        ) from e
    return [(s, e, t, emb[i]) for i, ((s, e), t) in enumerate(zip(spans, texts))]


def _calvin_frame(f, *keys):
    """Arrays of one CALVIN frame file (np.savez_compressed: zip checks each array's CRC-32)."""
    try:
        with np.load(f) as z:
            return [z[k] for k in keys]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{f}: cannot read {'/'.join(keys)} ({type(e).__name__}: {e}); expected an intact "
                        f"CALVIN frame (np.savez_compressed)") from e


def _calvin_episodes(root, split, all_frames):
    folder = Path(root) / {"train": "training", "val": "validation"}.get(split, split)
    if not (folder / "ep_start_end_ids.npy").exists():
        folder = Path(root) if (Path(root) / "ep_start_end_ids.npy").exists() else folder
    ids = folder / "ep_start_end_ids.npy"
    if not ids.exists():
        raise DataError(f"{ids}: missing (CALVIN needs ep_start_end_ids.npy in {folder})")
    if all_frames:
        segments = [(int(s), int(e), "", None) for s, e in np.load(ids)]
    else:
        ann_path = folder / "lang_annotations" / "auto_lang_ann.npy"
        if not ann_path.exists():
            raise DataError(f"{ann_path}: missing (CALVIN's language annotations; use all frames instead)")
        segments = calvin_annotations(ann_path)
    episodes = []
    for start, end, text, embedding in segments:
        frames = np.arange(start, end + 1)
        rows = [_calvin_frame(folder / f"episode_{i:07d}.npz", "rel_actions", "robot_obs") for i in frames]
        rel, obs = (np.stack(x).astype(np.float32) for x in zip(*rows))
        for name, arr in (("rel_actions", rel), ("robot_obs", obs)):  # as standardize() checks RLDS episodes
            bad = np.argwhere(~np.isfinite(arr))
            if len(bad):
                raise DataError(f"{folder / f'episode_{frames[bad[0][0]]:07d}.npz'}: {name} is not finite "
                                f"(dim {bad[0][1]}); expected finite numbers")
        # CALVIN's gripper is -1 close / +1 open -> 0 closed / 1 open
        action = np.concatenate([rel[:, :6], (rel[:, 6:] + 1) / 2], 1)
        episodes.append({"state": obs, "action": action, "instruction": text, "embedding": embedding,
                         "primary": frames, "wrist": frames})
    return folder, episodes


# LeRobot (huggingface/lerobot, src/lerobot/datasets/: utils.py, dataset_metadata.py, dataset_reader.py,
# video_utils.py). meta/info.json names the layout. v3.0: meta/episodes/chunk-*/file-*.parquet (per episode: its
# length, its data file and, per camera, its video file and from_timestamp), meta/tasks.parquet, several episodes per
# data/*.parquet and per videos/<camera>/*.mp4 (a frame lies at from_timestamp + timestamp in its file). v2.1:
# meta/episodes.jsonl, meta/tasks.jsonl, one parquet and one mp4 per episode. Frames stay in the videos: Source
# decodes them by timestamp.

LEROBOT_VERSIONS = ("v3.0", "v2.1")
CAMERA_DTYPES = ("video", "image")
TOLERANCE_S = 1e-4  # LeRobotDataset's tolerance_s (its default and lerobot-train's): the frame nearest a timestamp
                    # must lie within 0.1 ms of it (MultiLeRobotDataset alone allows 1 / fps - 1e-4)


def hf_snapshot(repo):
    """hf:ORG/NAME -> the dataset's snapshot folder in the local Hugging Face cache ($HF_HUB_CACHE, else
    $HF_HOME/hub, else ~/.cache/huggingface/hub; datasets--ORG--NAME/refs/main names the commit under snapshots/).
    Nothing is downloaded."""
    if len(repo.split("/")) != 2 or not all(repo.split("/")):
        raise DataError(f"hf:{repo}: expected hf:ORG/NAME, a dataset repository of the Hugging Face Hub")
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    folder = Path(os.environ.get("HF_HUB_CACHE") or home / "hub").expanduser() / f"datasets--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    snapshot = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if snapshot is None or not snapshot.is_dir():
        raise DataError(f"hf:{repo}: not in the local Hugging Face cache ({folder}); download it first with: "
                        f"hf download {repo} --repo-type dataset")
    return snapshot


def lerobot_info(root):
    """meta/info.json, checked for what is read from it."""
    path = Path(root) / "meta" / "info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read LeRobot's dataset info ({e}); expected a JSON object") from e
    version = info.get("codebase_version") if isinstance(info, dict) else None
    if version not in LEROBOT_VERSIONS:
        raise DataError(f"{path}: codebase_version {version!r}; data.py reads LeRobot datasets of codebase_version "
                        f"{' and '.join(LEROBOT_VERSIONS)}")
    features = info.get("features")
    if not isinstance(features, dict) or not all(isinstance(f, dict) and "dtype" in f for f in features.values()):
        raise DataError(f"{path}: 'features' is {json.dumps(features)[:80]}; expected {{key: {{dtype, shape, ...}}}}")
    need = ["fps", "data_path"] + ["chunks_size"] * (version == "v2.1")
    need += ["video_path"] * any(f["dtype"] == "video" for f in features.values())
    for key in need:
        if not info.get(key):
            raise DataError(f"{path}: no '{key}'; expected LeRobot {version}'s info.json (codebase_version, fps, "
                            f"features, data_path, video_path, chunks_size, ...)")
    return info


def _template(root, info, key, **fields):
    """root / info.json's data_path or video_path, filled in."""
    try:
        return root / info[key].format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"{root / 'meta' / 'info.json'}: {key} '{info[key]}' does not format with "
                        f"{', '.join(fields)} ({type(e).__name__}: {e}); expected LeRobot "
                        f"{info['codebase_version']}'s template") from e


def _jsonl(path, keys):
    """The rows of a JSON-lines file, each checked for `keys`."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected one JSON object per line") from e
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise DataError(f"{path}: line {n + 1} is {json.dumps(row)[:80]}; expected an object with "
                            f"{', '.join(keys)}")
    return rows


def _parquet(path, columns=None, hints=None):
    """The columns (default: all) of a parquet file; a missing one is named, with its flag (hints) and every column
    the file has."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns or () if c not in names]
        if not missing:
            return pq.read_table(path, columns=None if columns is None else list(dict.fromkeys(columns)))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read the parquet file ({type(e).__name__}: {e})") from e
    raise DataError(f"{path}: no column '{missing[0]}'{(hints or {}).get(missing[0], '')}; it has: {', '.join(names)}")


def _numbers(table, key, path):
    """A column of numbers or of equal-length lists of numbers (HF datasets' Value, Sequence) -> float32 (n, d)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    col, types = table.column(key).combine_chunks(), pa.types
    number = lambda t: types.is_integer(t) or types.is_floating(t) or types.is_boolean(t)
    if types.is_list(col.type) or types.is_large_list(col.type) or types.is_fixed_size_list(col.type):
        sizes = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if number(col.type.value_type) and len(np.unique(sizes)) <= 1:
            return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    elif number(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
    raise DataError(f"{path}: column '{key}' holds {col.type}; expected numbers or equal-length lists of numbers")


def lerobot_mapping(info, keys, path):
    """({view: camera key}, state keys, action key): the flags' choice, else LeRobot's names: observation.state,
    action, and the cameras (features of dtype video or image, not depth maps): one whose name contains 'wrist' or
    'hand' is the wrist view, the first other one (sorted) primary, the next secondary. Any camera flag names all
    the cameras read."""
    features = info["features"]
    depth = lambda f: (f.get("info") or {}).get("video.is_depth_map") or (f.get("info") or {}).get("is_depth_map")
    cameras = sorted(k for k, f in features.items() if f["dtype"] in CAMERA_DTYPES and not depth(f))
    numbers = sorted(k for k, f in features.items() if f["dtype"] not in (*CAMERA_DTYPES, "string"))
    keys = {k: v for k, v in (keys or {}).items() if v}
    if "instruction_key" in keys:
        raise DataError(f"--instruction_key {keys['instruction_key']}: a LeRobot episode's instruction is its task "
                        f"(meta/tasks); expected no --instruction_key for {path.parent.parent}")
    flags = {"image_key": "primary", "secondary_key": "secondary", "wrist_key": "wrist"}
    if any(flag in keys for flag in flags):
        views = {view: keys[flag] for flag, view in flags.items() if flag in keys}
    else:
        wrist = [c for c in cameras if "wrist" in c.lower() or "hand" in c.lower()][:1]
        views = {**dict(zip(("primary", "secondary"), [c for c in cameras if c not in wrist])),
                 **dict(zip(("wrist",), wrist))}
    for flag, view in flags.items():
        if view in views and views[view] not in cameras:
            f = features.get(views[view])
            what = "no such feature" if f is None else f"a {f['dtype']} feature"
            raise DataError(f"--{flag} {views[view]}: {what} in {path}; expected a camera (dtype video or image): "
                            f"{', '.join(cameras) or 'none'}")
    state = keys["state_key"].split("+") if "state_key" in keys else [k for k in ["observation.state"] if k in features]
    action = keys.get("action_key", "action")
    for flag, key in [("state_key", k) for k in state] + [("action_key", action)]:
        if features.get(key, {}).get("dtype") in (*CAMERA_DTYPES, "string"):
            raise DataError(f"--{flag} {key}: a {features[key]['dtype']} feature in {path}; expected numbers, such "
                            f"as: {', '.join(numbers)}")
    return views, state, action


def lerobot_episodes(root, info, split, video_keys):
    """The split's episodes in order: {index, length, data: parquet file, videos: {key: (mp4, from_timestamp)}}."""
    if info["codebase_version"] == "v3.0":
        files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DataError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet; expected LeRobot v3.0's "
                            f"episode metadata")
        where = [f"videos/{k}/{c}" for k in video_keys for c in ("chunk_index", "file_index", "from_timestamp")]
        rows = [r for f in files for r in _parquet(f, ["episode_index", "length", "data/chunk_index",
                                                       "data/file_index", *where]).to_pylist()]
        data = lambda r: _template(root, info, "data_path", chunk_index=r["data/chunk_index"],
                                   file_index=r["data/file_index"])
        video = lambda r, k: (_template(root, info, "video_path", video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                        file_index=r[f"videos/{k}/file_index"]), r[f"videos/{k}/from_timestamp"])
    else:  # v2.1: one file per episode, in chunk folders of chunks_size episodes
        rows = _jsonl(root / "meta" / "episodes.jsonl", ("episode_index", "length"))
        chunk = lambda r: r["episode_index"] // int(info["chunks_size"])
        data = lambda r: _template(root, info, "data_path", episode_chunk=chunk(r), episode_index=r["episode_index"])
        video = lambda r, k: (_template(root, info, "video_path", episode_chunk=chunk(r), video_key=k,
                                        episode_index=r["episode_index"]), 0.0)
    episodes = [{"index": r["episode_index"], "length": r["length"], "data": data(r),
                 "videos": {k: video(r, k) for k in video_keys}} for r in rows]
    splits = info.get("splits") or {"train": f"0:{max((e['index'] for e in episodes), default=-1) + 1}"}
    if split not in splits:
        raise DataError(f"{root / 'meta' / 'info.json'}: no split '{split}'; it has {sorted(splits)}")
    try:
        lo, hi = (int(x) for x in str(splits[split]).split(":"))
    except ValueError as e:
        raise DataError(f"{root / 'meta' / 'info.json'}: split '{split}' is {splits[split]!r}; expected 'FROM:TO' "
                        f"(episode indices)") from e
    return sorted((e for e in episodes if lo <= e["index"] < hi), key=lambda e: e["index"])


def lerobot_tasks(root, version):
    """{task_index: task}: meta/tasks.parquet (v3.0; pandas writes the task strings as its index column 'task') or
    meta/tasks.jsonl (v2.1)."""
    if version == "v2.1":
        rows = _jsonl(root / "meta" / "tasks.jsonl", ("task_index", "task"))
        return {int(r["task_index"]): str(r["task"]) for r in rows}
    path = root / "meta" / "tasks.parquet"
    names = _parquet(path).column_names
    text = "__index_level_0__" if "task" not in names and "__index_level_0__" in names else "task"  # unnamed index
    table = _parquet(path, ["task_index", text])
    return dict(zip(table.column("task_index").to_pylist(), map(str, table.column(text).to_pylist())))


def video_times(path):
    """Sorted presentation times (s) of every frame of a video, from its packets (demuxed, not decoded)."""
    import av
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return np.sort([float(p.pts * stream.time_base) for p in container.demux(stream) if p.pts is not None])
    except (OSError, av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot read the video ({type(e).__name__}: {e}); expected an mp4 as LeRobot "
                        f"writes it") from e


def nearest(times, queries):
    """Index of the entry of sorted `times` nearest each query, the earlier one on a tie (LeRobot's argmin)."""
    if len(times) == 1:
        return np.zeros(len(queries), np.int64)
    j = np.searchsorted(times, queries).clip(1, len(times) - 1)
    return np.where(queries - times[j - 1] <= times[j] - queries, j - 1, j)


def _video_pointers(files, times, video, start, timestamps, what):
    """An episode's frames in a video -> (n, 2) pointers (number of the video in `files`, time in it: from_timestamp
    + timestamp), each time checked against the video's frame times (demuxed once, kept in `times`) as training will
    decode it: a frame within LeRobot's tolerance."""
    if video not in times:
        if not video.is_file():
            raise DataError(f"{video}: missing ({what}, from info.json's video_path); expected every video of the "
                            f"dataset")
        times[video] = video_times(video)
    files.setdefault(str(video), len(files))
    t = float(start) + timestamps.astype(np.float64)
    pts = times[video][nearest(times[video], t)]
    bad = np.flatnonzero(np.abs(pts - t) > TOLERANCE_S)
    if len(bad):
        raise DataError(f"{video}: no frame within {TOLERANCE_S} s of {t[bad[0]]:.4f} s ({what}, frame {bad[0]}: "
                        f"from_timestamp {float(start):.4f} + timestamp {t[bad[0]] - float(start):.4f}; nearest frame "
                        f"at {pts[bad[0]]:.4f} s); expected a frame at every timestamp (LeRobot's tolerance_s)")
    return np.stack([np.full(len(t), files[str(video)], np.float64), t], 1)


def _blob_pointers(blob, column, where, key):
    """An episode's encoded images (LeRobot's struct {bytes, path}), appended to an open blob file -> (n, 4) pointers
    (file 0, offset, length, CRC-32C), as RLDS JPEGs are pointed to."""
    import pyarrow as pa
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise DataError(f"{where}: column '{key}' holds {column.type}; expected LeRobot's image struct {{bytes, path}}")
    pointers = []
    for n, data in enumerate(column.field("bytes").to_pylist()):
        if not data:
            raise DataError(f"{where}: frame {n} of '{key}' has no embedded image bytes; expected PNG or JPEG bytes "
                            f"in the parquet file, as LeRobot writes them")
        pointers.append((0, blob.tell(), len(data), google_crc32c.value(data)))
        blob.write(data)
    return np.array(pointers, np.int64).reshape(-1, 4)


def _episode_rows(column, ep, where):
    """The rows of an episode in its data file's columns, checked against the episode metadata."""
    rows = np.flatnonzero(column["episode_index"] == ep["index"])
    if len(rows) != ep["length"] or len(rows) == 0:
        raise DataError(f"{where}: {len(rows)} frames, but the episode metadata says length {ep['length']}; "
                        f"expected the same, at least 1")
    if not np.array_equal(column["frame_index"][rows], np.arange(len(rows))):
        raise DataError(f"{where}: frame_index is not 0..{len(rows) - 1} in order; expected LeRobot's frames")
    return rows


def _lerobot_episodes(root, split, keys, blobs):
    """LeRobot episodes as standard arrays + frame pointers, and the source's meta. A video frame's pointer is
    (file, time in the file); an image-dtype camera's PNG/JPEG bytes are copied once into blobs/blob_<view>.bin."""
    info = lerobot_info(root)
    views, state_keys, action_key = lerobot_mapping(info, keys, root / "meta" / "info.json")
    kinds = {v: info["features"][k]["dtype"] for v, k in views.items()}
    images = {v: k for v, k in views.items() if kinds[v] == "image"}
    episodes = lerobot_episodes(root, info, split, [k for v, k in views.items() if v not in images])
    if not episodes:
        raise DataError(f"{root}: split '{split}' has no episodes")
    tasks = lerobot_tasks(root, info["codebase_version"])
    hint = lambda flag: f" (--{flag})" if (keys or {}).get(flag) else f" (LeRobot's name; give another with --{flag})"
    hints = {**{k: hint("state_key") for k in state_keys}, action_key: hint("action_key")}
    files, times, out = {v: {} for v in views}, {}, []  # per view {video: its number}; {video: its frame times}
    with contextlib.ExitStack() as stack:
        blob = {v: stack.enter_context(open(Path(blobs) / f"blob_{v}.bin", "wb")) for v in images}
        for data, group in itertools.groupby(episodes, key=lambda e: e["data"]):
            table = _parquet(data, [*state_keys, action_key, "episode_index", "frame_index", "timestamp",
                                    "task_index", *images.values()], hints)
            numbers = {k: _numbers(table, k, data) for k in (*state_keys, action_key)}
            column = {k: table.column(k).to_numpy() for k in ("episode_index", "frame_index", "timestamp",
                                                               "task_index")}
            encoded = {v: table.column(k).combine_chunks() for v, k in images.items()}
            for ep in group:
                where = f"{data} (episode {ep['index']})"
                rows = _episode_rows(column, ep, where)
                task = int(column["task_index"][rows[0]])  # LeRobot's instruction: the task of the episode's start
                if task not in tasks:
                    raise DataError(f"{where}: task_index {task} is not in the dataset's tasks {sorted(tasks)}")
                state = [numbers[k][rows] for k in state_keys] or [np.zeros((len(rows), 0), np.float32)]
                std = {"state": np.concatenate(state, 1), "action": numbers[action_key][rows],
                       "instruction": tasks[task], "embedding": None}
                check_finite(where, action=std["action"], state=std["state"])
                for view, key in views.items():
                    std[view] = (_blob_pointers(blob[view], encoded[view].take(rows), where, key) if view in images
                                 else _video_pointers(files[view], times, *ep["videos"][key], column["timestamp"][rows],
                                                      f"the {key} video of episode {ep['index']}"))
                out.append(std)
    files = {v: [f"blob_{v}.bin"] if v in images else list(files[v]) for v in views}
    return out, {"format": "lerobot", "version": info["codebase_version"], "root": str(root), "fps": info["fps"],
                 "cameras": views, "kinds": kinds, "files": files}


def _lerobot_name(root):
    """hf snapshots (.../datasets--ORG--NAME/snapshots/<commit>) are named ORG--NAME, other folders by their name."""
    return root.parent.parent.name[len("datasets--"):] if root.parent.name == "snapshots" else root.name


def _fingerprint(files, *extra):
    h = hashlib.sha1(repr((CACHE_VERSION, extra)).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def statistics(x):
    """mean, std, min, max, q01, q99 per dimension, as lists (json- and checkpoint-friendly)."""
    x = np.asarray(x, np.float64)
    if len(x) == 0 or x.shape[1] == 0:
        return {k: [0.0] * x.shape[1] for k in ("mean", "std", "min", "max", "q01", "q99")}
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(),
            "max": x.max(0).tolist(), "q01": np.quantile(x, 0.01, 0).tolist(),
            "q99": np.quantile(x, 0.99, 0).tolist()}


def prepare(path, split="train", keys=None, calvin_all_frames=False, workers=None):
    """Index a source once; return its cache folder. Safe to run on many ranks at once: each writes a
    temporary folder and the first to rename it into place wins."""
    fmt, root = detect(path)
    if fmt == "rlds":
        name, shards, lengths = rlds_shards(root, split)
        files = [root / "dataset_info.json", root / "features.json", *shards]
    elif fmt == "lerobot":
        root, name = Path(os.path.abspath(root)), _lerobot_name(root)
        files = sorted(f for d in ("meta", "data", "videos") for f in (root / d).rglob("*") if f.is_file())
    else:
        name, shards = "calvin", []
        folder = root / {"train": "training", "val": "validation"}.get(split, split)
        files = sorted(Path(folder if folder.is_dir() else root).glob("*.npy"))
    key = _fingerprint(files, str(root.resolve()), split, sorted((keys or {}).items()), calvin_all_frames)
    out = cache_root() / f"{name}-{split}-{key}"
    if (out / "meta.json").exists():
        return out
    t0, tmp = time.time(), None
    if fmt == "rlds":
        jobs = [(str(root), str(s), i, name, keys, n) for i, (s, n) in enumerate(zip(shards, lengths))]
        workers = min(len(jobs), workers or os.cpu_count() or 1)
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                episodes = [e for part in pool.imap(_prepare_shard, jobs) for e in part]
        else:
            episodes = [e for job in jobs for e in _prepare_shard(job)]
        source = {"format": "rlds", "files": [str(s) for s in shards]}
    elif fmt == "lerobot":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))  # image blobs are written first
        try:
            episodes, source = _lerobot_episodes(root, split, keys, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        folder, episodes = _calvin_episodes(root, split, calvin_all_frames)
        source = {"format": "calvin", "folder": str(folder)}
    episodes = [e for e in episodes if len(e["action"])]
    if not episodes:
        raise DataError(f"{root}: split '{split}' has no usable episodes")
    _write_cache(out, name, source, episodes, time.time() - t0, tmp)
    return out


def _write_cache(out, name, source, episodes, seconds, tmp=None):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    lengths = np.array([len(e["action"]) for e in episodes])
    state = np.concatenate([e["state"] for e in episodes])
    action = np.concatenate([e["action"] for e in episodes])
    np.save(tmp / "state.npy", state)
    np.save(tmp / "action.npy", action)
    np.save(tmp / "episode_start.npy", np.concatenate([[0], np.cumsum(lengths)]))
    views = [v for v in VIEWS if v in episodes[0]]
    for v in views:
        np.save(tmp / f"image_{v}.npy", np.concatenate([e[v] for e in episodes]))
    instructions = sorted({e["instruction"] for e in episodes})
    np.save(tmp / "instruction.npy", np.array([instructions.index(e["instruction"]) for e in episodes]))
    if all(e["embedding"] is not None for e in episodes):
        np.save(tmp / "embedding.npy", np.stack([e["embedding"] for e in episodes]))
    stats = {"name": name, "num_episodes": len(episodes), "num_steps": int(lengths.sum()),
             "state": statistics(state), "action": statistics(action),
             **({"fps": source["fps"]} if "fps" in source else {})}  # LeRobot's frame rate, kept
    meta = {"name": name, "source": source, "views": views, "instructions": instructions,
            "stats": stats, "prepare_seconds": round(seconds, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(out)
    except OSError:  # another rank finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# 5. A prepared source: random access to steps and images

MAX_OPEN_VIDEOS = 64  # open containers kept per process (LeRobot keeps 100 decoders); the least recently used is closed
SEEK_GAP_S = 1.0      # wanted frames further apart than this are reached by another seek, not by decoding between them


def open_video(path):
    """(an open PyAV container with one decoding thread, a reformatter that keeps its conversion context) for a
    video. One thread: DataLoader workers are the parallelism, as for JPEGs. PyAV's wheels bundle FFmpeg with the
    dav1d AV1 decoder; torchcodec, LeRobot's default decoder, needs a system FFmpeg, which this machine and CI lack
    (LeRobot falls back to PyAV there too)."""
    import av
    from av.video.reformatter import VideoReformatter
    try:
        container = av.open(str(path))
        container.streams.video[0].codec_context.thread_count = 1
    except (OSError, av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot open the video ({type(e).__name__}: {e}); expected an mp4 as LeRobot "
                        f"writes it") from e
    return container, VideoReformatter()  # frame.to_ndarray(format=) would set up a new context each time (10x)


def video_frames(video, path, times, tolerance=TOLERANCE_S):
    """The frames of an open video (open_video) at `times` (s in the file), uint8 (3, H, W) each, by LeRobot's rule
    (video_utils.decode_video_frames_pyav): seek to the keyframe at or before the earliest time, decode forward once
    up to the first frame at or after the latest, and take for each time the decoded frame whose pts is nearest;
    one farther than `tolerance` is refused. LeRobot seeks one tick of the time base earlier, which returns the same
    frames (the nearest frame is never before a keyframe at or before the time rounded to ticks) but decodes a
    whole GOP more whenever the time is a keyframe's. Times more than SEEK_GAP_S apart get a seek each."""
    container, reformatter = video
    stream = container.streams.video[0]
    base = float(stream.time_base)
    times = np.asarray(times, np.float64)
    order = np.argsort(times, kind="stable")
    out = [None] * len(times)
    for group in np.split(order, np.flatnonzero(np.diff(times[order]) > SEEK_GAP_S) + 1):
        want = times[group]
        container.seek(round(want[0] / base), backward=True, any_frame=False, stream=stream)
        pts, frames = [], []
        for frame in container.decode(stream):
            if frame.pts is not None:
                pts.append(frame.pts * base)
                frames.append(frame)
                if pts[-1] >= want[-1]:
                    break
        if not frames:
            raise DataError(f"{path}: no frame decodes from {want[0]:.4f} s on; expected a frame at every timestamp")
        pts = np.array(pts)
        near = np.abs(want[:, None] - pts[None]).argmin(1)  # the first of equally near frames, as LeRobot's argmin
        far = np.flatnonzero(np.abs(pts[near] - want) > tolerance)
        if len(far):
            raise DataError(f"{path}: no frame within {tolerance} s of {want[far[0]]:.4f} s (the nearest decoded is at "
                            f"{pts[near[far[0]]]:.4f} s); expected a frame at every timestamp (LeRobot's tolerance_s)")
        rgb = {}
        for j, n in zip(group.tolist(), near.tolist()):
            if n not in rgb:  # converted once, only the frames asked for
                rgb[n] = torch.from_numpy(reformatter.reformat(frames[n], format="rgb24").to_ndarray()).permute(2, 0, 1)
            out[j] = rgb[n]
    return out


class Source:
    """Each RLDS image's bytes are checked, as they are read, against the CRC-32C that prepare() recorded (their
    record passed its CRC there), so a shard changed or damaged since then is refused, not decoded: ~1 us per
    JPEG, below the noise of its decode. CALVIN's npz frames are checked too: zip verifies each array's CRC-32.
    LeRobot: image-dtype cameras are read from the cache's blob files exactly as RLDS JPEGs (CRC-checked); video
    cameras are decoded from their mp4s by timestamp (video_frames), one open container per process and file."""

    def __init__(self, cache):
        self.cache = Path(cache)
        self.meta = json.loads((self.cache / "meta.json").read_text())
        self.name, self.stats, self.views = self.meta["name"], self.meta["stats"], self.meta["views"]
        self.instructions = self.meta["instructions"]
        load = lambda n: np.load(self.cache / f"{n}.npy", mmap_mode="r").view(np.ndarray)  # mapped, not read
        self.state, self.action, self.start = load("state"), load("action"), np.load(self.cache / "episode_start.npy")
        self.instruction = np.load(self.cache / "instruction.npy")
        self.embedding = load("embedding") if (self.cache / "embedding.npy").exists() else None
        self.pointers = {v: load(f"image_{v}") for v in self.views}
        self.kinds = self.meta["source"].get("kinds", {})  # LeRobot: view -> "video" or "image"
        self._files, self._videos = {}, {}

    def __getstate__(self):  # open videos do not pickle: workers started by spawn open their own
        return {**self.__dict__, "_videos": {}}

    def __len__(self):
        return int(self.start[-1])

    def locate(self, i):
        """Global step index -> (episode, step in episode, episode length)."""
        e = int(np.searchsorted(self.start, i, side="right")) - 1
        return e, i - int(self.start[e]), int(self.start[e + 1] - self.start[e])

    def file(self, view, n):
        """File n of a view's pointers: an RLDS shard, a LeRobot video or a blob in the cache folder."""
        files = self.meta["source"]["files"]
        return files[n] if isinstance(files, list) else str(self.cache / files[view][n])

    def image(self, view, i):
        """Decoded frame i of a view: uint8 (3, H, W)."""
        if self.kinds.get(view) == "video":
            return self.images(view, [i])[0]
        ptr = self.pointers[view][i]
        if self.meta["source"]["format"] == "calvin":
            f = Path(self.meta["source"]["folder"]) / f"episode_{int(ptr):07d}.npz"
            (rgb,) = _calvin_frame(f, f"rgb_{'static' if view == 'primary' else 'gripper'}")
            return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        shard, offset, length, crc = ptr.tolist()
        path = self.file(view, shard)
        key = (os.getpid(), path)  # one descriptor per worker process and file; pread needs no seek
        if key not in self._files:
            self._files[key] = os.open(path, os.O_RDONLY)
        data = os.pread(self._files[key], length, offset)
        if google_crc32c.value(data) != crc:
            raise DataError(f"{path}: the {view} image at byte {offset} ({length} "
                            f"bytes) fails the CRC-32C recorded by prepare; the file is damaged or changed since "
                            f"(copy it again; then delete the cache {self.cache})")
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def images(self, view, idx):
        """Decoded frames idx of a view, a list of uint8 (3, H, W): a video's frames of one file in one pass."""
        if self.kinds.get(view) != "video":
            return [self.image(view, i) for i in idx]
        ptr = self.pointers[view][np.asarray(idx, np.int64)]  # (n, 2): file, time in the file
        out = [None] * len(ptr)
        for n in np.unique(ptr[:, 0]).astype(np.int64).tolist():
            at = np.flatnonzero(ptr[:, 0] == n)
            for j, frame in zip(at.tolist(), video_frames(self._video(view, n), self.file(view, n), ptr[at, 1])):
                out[j] = frame
        return out

    def _video(self, view, n):
        key = (os.getpid(), self.file(view, n))
        video = self._videos.pop(key) if key in self._videos else open_video(key[1])
        self._videos[key] = video  # the most recently used last
        if len(self._videos) > MAX_OPEN_VIDEOS:
            self._videos.pop(next(iter(self._videos)))[0].close()
        return video


# ---------------------------------------------------------------------------------------------------
# 6. Windows: the standard training sample (DESIGN.md)

INTERPOLATIONS = ("bilinear", "bicubic", "bicubic_float")


def resize(x, size, interpolation="bilinear"):
    """uint8 (..., 3, h, w) -> uint8 (..., 3, *size), antialiased, as a method's official preprocessing resizes:
      bilinear       torchvision on uint8 (the default; the fast path)
      bicubic        torchvision on uint8 (Torch-X-Embodiment resizes the uint8 tensor so)
      bicubic_float  torchvision on float, rounded once (GR1-Training resizes float frames; we store uint8, so
                     within half a level of its float frames)"""
    size = [size, size] if isinstance(size, int) else list(size)
    if list(x.shape[-2:]) == size:
        return x
    if interpolation == "bilinear":
        return TF.resize(x, size, antialias=True)
    if interpolation == "bicubic":
        return TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    y = TF.resize(x.float(), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def planar(x):
    """uint8 (n, 3, H, W) of any strides (resize keeps channels last) -> contiguous; numpy's copy transposes
    uint8 about twice as fast as torch's."""
    return torch.from_numpy(np.ascontiguousarray(x.numpy()))


class Mixture(torch.utils.data.Dataset):
    """Windows over one or more sources. An item is (source id, step index, stream position), as the
    Sampler below yields them; the position seeds the sample's own randomness (goal choice).

    A sample (B is added by the DataLoader):
      image_<view>  uint8 (T, 3, H, W)  history t-T+1..t; before the episode start the first frame repeats
      obs_pad       bool  (T,)          True where the history reaches before the episode start
      state         float32 (T, S)      (zero-padded to the largest S in the mixture)
      action        float32 (T, K, A)   for every history step the next K actions; past the end the last
      action_pad    bool  (T, K)        action repeats and action_pad is True
      instruction   str; language_embedding float32 (D,) when every source has one
      goal_image_primary   uint8 (3, H, W)     if goal_last: uniform among the last goal_last frames, never before t
      future_image_<view>  uint8 (T, 3, H, W)  if future: frame t + future per history step (clamped to the end),
                                               for primary and every requested view
      future_pad    bool (T,)           True where t + future is past the episode end
      dataset_id, episode, step   int
      views_present bool (V,)           if missing_views="zeros": which of `views` the source has

    missing_views: "error" (default) refuses a source that lacks a requested view; "zeros" gives such a
    source all-zero frames for that view and marks it False in views_present (mixtures of embodiments
    with different cameras, e.g. HPT's per-embodiment stems).
    cache_frames: "off" (default here) decodes the JPEGs of each sample; "on" reads the frames from decoded-frame
    caches (section 7), built first where missing: the same pixels, so the same samples; "auto": "on" when they fit
    FRAME_CACHE_BUDGET.
    """

    def __init__(self, sources, weights=None, history=1, chunk=1, image_size=224, views=("primary",),
                 goal_last=0, future=0, seed=0, missing_views="error", interpolation="bilinear", cache_frames="off"):
        self.sources = sources
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation='{interpolation}': expected one of {list(INTERPOLATIONS)}")
        self.interpolation = interpolation
        if missing_views not in ("error", "zeros"):
            raise DataError(f"missing_views='{missing_views}': expected 'error' or 'zeros'")
        for s in sources:
            missing = [v for v in views if v not in s.views]
            if missing and missing_views == "error":
                raise DataError(f"{s.name}: no {missing} camera; it has {s.views} (views asked: {list(views)}; "
                                f"missing_views='zeros' gives zero frames instead)")
        self.missing_views = missing_views
        sizes = np.array([len(s) for s in sources], np.float64)
        w = sizes if weights is None else np.asarray(weights, np.float64)
        if len(w) != len(sources) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise DataError(f"mixture weights {w.tolist()}: expected {len(sources)} finite numbers >= 0, not all 0")
        self.weights = (w / w.sum()).tolist()
        self.history, self.chunk, self.views, self.goal_last, self.future = history, chunk, views, goal_last, future
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.seed = seed
        self.state_dim = max(s.state.shape[1] for s in sources)
        self.action_dim = max(s.action.shape[1] for s in sources)
        self.stats = [dict(s.stats, dataset_id=i) for i, s in enumerate(sources)]
        self.instructions = sorted({t for s in sources for t in s.instructions})
        self.has_embedding = all(s.embedding is not None for s in sources)
        cameras = tuple(dict.fromkeys(views + (("primary",) if goal_last or future else ())))
        # (sid, view) -> path of its decoded-frame cache
        self.frame_caches = frame_caches(sources, cameras, self.size, interpolation, cache_frames)
        self._maps = {}  # (process id, sid, view) -> the cache's memmap, opened lazily in each DataLoader worker

    def __getstate__(self):  # a memmap pickles as its whole array: workers started by spawn reopen their own
        return {**self.__dict__, "_maps": {}}

    def __len__(self):
        return sum(len(s) for s in self.sources)

    def _cached(self, sid, view, idx):  # (n,) step indices -> uint8 (n, 3, H, W) from the decoded-frame cache
        key = (os.getpid(), sid, view)
        if key not in self._maps:
            self._maps[key] = np.load(self.frame_caches[sid, view], mmap_mode="r").view(np.ndarray)  # mapped
        return torch.from_numpy(self._maps[key][idx])  # a copy of the rows

    def _frames(self, sid, wanted):  # {key: (view, (n,) global step indices)} -> {key: uint8 (n, 3, H, W)}
        """From the decoded-frame cache where there is one; else each distinct frame of a window is decoded and
        resized once (histories repeat the first frame at an episode start; future and goal frames overlap the
        history), a camera's frames in one Source.images call (a video's in one pass), and the frames of one native
        size are resized in one call, stacked as decoded (channels last: no copy into planes)."""
        src = self.sources[sid]
        frames = {k: self._cached(sid, v, idx) for k, (v, idx) in wanted.items() if (sid, v) in self.frame_caches}
        wanted = {k: w for k, w in wanted.items() if k not in frames}  # the JPEG / video path for the rest
        distinct = {}  # view -> its distinct step indices, in order of first use
        for v, idx in wanted.values():
            if v in src.views:
                distinct.setdefault(v, {}).update(dict.fromkeys(idx.tolist()))
        raw = {(v, i): x for v, idx in distinct.items() for i, x in zip(idx, src.images(v, list(idx)))}
        out = {}
        for shape in {x.shape for x in raw.values()}:
            group = [vi for vi, x in raw.items() if x.shape == shape]
            stacked = torch.stack([raw[vi].permute(1, 2, 0) for vi in group]).permute(0, 3, 1, 2)  # (n, 3, h, w)
            out.update(zip(group, planar(resize(stacked, self.size, self.interpolation))))
        for k, (v, idx) in wanted.items():
            frames[k] = (torch.stack([out[v, i] for i in idx.tolist()]) if v in src.views else  # missing_views="zeros":
                         torch.zeros((len(idx), 3) + self.size, dtype=torch.uint8))           # a camera it lacks
        return frames

    def __getitem__(self, item):
        sid, i, position = item
        src = self.sources[sid]
        e, t, length = src.locate(i)
        base = int(src.start[e])
        ts = t - self.history + 1 + np.arange(self.history)               # (T,) history steps
        obs_t = np.maximum(ts, 0)
        act_t = obs_t[:, None] + np.arange(self.chunk)[None]              # (T, K)
        state = np.zeros((self.history, self.state_dim), np.float32)
        state[:, : src.state.shape[1]] = src.state[base + obs_t]
        action = np.zeros((self.history, self.chunk, self.action_dim), np.float32)
        action[..., : src.action.shape[1]] = src.action[base + np.minimum(act_t, length - 1)]
        sample = {"obs_pad": torch.from_numpy(ts < 0), "state": torch.from_numpy(state),
                  "action": torch.from_numpy(action), "action_pad": torch.from_numpy(act_t >= length),
                  "instruction": src.instructions[src.instruction[e]], "dataset_id": sid, "episode": e, "step": t}
        wanted = {f"image_{view}": (view, base + obs_t) for view in self.views}  # key -> (view, step indices)
        if self.missing_views == "zeros":
            sample["views_present"] = torch.tensor([v in src.views for v in self.views])
        if self.has_embedding:
            sample["language_embedding"] = torch.from_numpy(np.array(src.embedding[e], np.float32))
        if self.goal_last:
            rng = np.random.default_rng([self.seed, position])
            goal = rng.integers(max(t, length - self.goal_last), length)
            wanted["goal_image_primary"] = ("primary", np.array([base + goal]))
        if self.future:
            fut = obs_t + self.future
            for view in dict.fromkeys(("primary",) + tuple(self.views)):
                wanted[f"future_image_{view}"] = (view, base + np.minimum(fut, length - 1))
            sample["future_pad"] = torch.from_numpy(fut >= length)
        sample.update(self._frames(sid, wanted))
        if self.goal_last:
            sample["goal_image_primary"] = sample["goal_image_primary"][0]
        return sample


class Sampler(torch.utils.data.Sampler):
    """An endless, seeded stream of (source id, step index, position) for one rank.

    The global stream is one sequence for all ranks; global batch s is positions [s*B, (s+1)*B), cut into
    per-rank pieces of `batch_size` in rank order. So the samples of a step do not depend on the number
    of ranks, workers or accumulation steps, and starting at position s*B resumes exactly.
    One source: a fresh permutation per epoch (every step once per epoch, as DistributedSampler).
    Several: the source drawn by weight and a uniform step within it, in seeded blocks of positions."""

    BLOCK = 1 << 16

    def __init__(self, dataset, batch_size, rank=0, world=1, seed=0, start=0):
        self.sizes = [len(s) for s in dataset.sources]
        self.weights, self.batch, self.rank, self.world, self.seed = dataset.weights, batch_size, rank, world, seed
        if start % (batch_size * world):
            raise ValueError(f"start position {start} must be a multiple of batch_size * world")
        self.start = start
        self._cache = (None, None)

    def _block(self, key, make):
        if self._cache[0] != key:
            self._cache = (key, make())
        return self._cache[1]

    def draw(self, p):
        if len(self.sizes) == 1:
            n = self.sizes[0]
            perm = self._block(p // n, lambda: np.random.default_rng([self.seed, p // n]).permutation(n))
            return 0, int(perm[p % n]), p
        b = p // self.BLOCK

        def make():
            rng = np.random.default_rng([self.seed, b])
            src = rng.choice(len(self.sizes), size=self.BLOCK, p=self.weights)
            return src, (rng.random(self.BLOCK) * np.array(self.sizes)[src]).astype(np.int64)
        src, idx = self._block(b, make)
        return int(src[p % self.BLOCK]), int(idx[p % self.BLOCK]), p

    def __iter__(self):
        chunk = self.start // self.batch + self.rank
        while True:
            for p in range(chunk * self.batch, (chunk + 1) * self.batch):
                yield self.draw(p)
            chunk += self.world


def loader(dataset, batch_size, rank=0, world=1, seed=0, start=0, num_workers=None, pin_memory=False):
    """DataLoader over the endless Sampler; batch_size is per rank. A private generator keeps the
    workers' seeding out of the global torch RNG (so resuming is exact)."""
    if num_workers is None:
        num_workers = max(1, (os.cpu_count() or 2) // max(1, world) - 1)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=Sampler(dataset, batch_size, rank, world, seed, start),
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed))


def parse_sources(spec):
    """'a_path:0.7,b_path:0.3' -> (paths, weights or None)."""
    paths, weights = [], []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, _, w = item.rpartition(":") if ":" in item and _is_number(item.rpartition(":")[2]) else (item, "", "")
        paths.append(path)
        weights.append(float(w) if w else None)
        if w and not (np.isfinite(weights[-1]) and weights[-1] >= 0):
            raise DataError(f"--data '{spec}': weight '{w}' of {path}: expected a finite number >= 0")
    if not paths:
        raise DataError(f"--data '{spec}': expected PATH or PATH:WEIGHT,PATH:WEIGHT,...")
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError(f"--data '{spec}': give a weight to every source or to none")
    return paths, (None if weights[0] is None else weights)


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def load(spec, split="train", keys=None, calvin_all_frames=False, weights=None, cache_frames="auto", **window):
    """--data string -> Mixture. window: history, chunk, image_size, views, goal_last, future, seed,
    missing_views, interpolation (see resize). cache_frames "auto" by default: a method's default run reads the
    small MetaWorld data, whose frames at the method's size fit FRAME_CACHE_BUDGET and so are decoded once (the
    first run builds the cache), while large data stays on the JPEG path (see Mixture)."""
    paths, given = parse_sources(spec)
    sources = [Source(prepare(p, split, keys, calvin_all_frames)) for p in paths]
    return Mixture(sources, weights=weights if weights is not None else given, cache_frames=cache_frames, **window)


def add_args(parser, cache_frames=True):
    """The data flags every method's main() shares; --cache_frames where its frames come from data.load."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="PATH or PATH:WEIGHT,... (RLDS, CALVIN, LeRobot or hf:ORG/NAME); "
                                                  "default: MetaWorld")
    g.add_argument("--split", default="train")
    g.add_argument("--calvin_all_frames", action="store_true", help="CALVIN: every frame, not only annotated windows")
    if cache_frames:
        g.add_argument("--cache_frames", default="auto", choices=CACHE_FRAMES,
                       help="decode every frame once at the training size into a uint8 memmap beside the index; "
                            f"auto: when it fits {FRAME_CACHE_BUDGET / 2**30:.0f} GiB (data.FRAME_CACHE_BUDGET)")
    for flag in KEY_FLAGS:
        g.add_argument(f"--{flag}", default=None, help="map a dataset that is not in data.STANDARD")
    return parser


def keys_from(args):
    return {k: getattr(args, k) for k in KEY_FLAGS if getattr(args, k, None)}


# ---------------------------------------------------------------------------------------------------
# 7. The decoded-frame cache (nanoGPT's .bin idea for small datasets): every frame of a camera decoded, checked
#    and resized once into a uint8 memmap beside the index, so training reads raw pixels instead of JPEGs

FRAME_CACHE_BUDGET = 16 * 2**30  # bytes; "auto" builds a Mixture's caches when they fit (every default MetaWorld run)
CACHE_FRAMES = ("auto", "on", "off")


def log(message):  # data.py's notes, once per job (rank 0 under torchrun)
    if os.environ.get("RANK", "0") == "0":
        print(f"data: {message}", flush=True)


def frame_cache_path(src, view, size, interpolation):
    """Keyed by camera, size and resize; it lives in the index folder, whose name is the dataset's fingerprint,
    so a changed dataset gets a new index and a new cache."""
    return src.cache / f"frames-{view}-{size[0]}x{size[1]}-{interpolation}.npy"


def frame_cache_ok(path, shape):
    """The cache is complete and intact: its sidecar names its shape and CRC-32C, and the file matches both."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # missing, truncated (mmap past the end) or not an .npy
        return False
    if frames.shape != tuple(shape) or frames.dtype != np.uint8 or meta.get("shape") != list(shape):
        return False
    return google_crc32c.value(frames.reshape(-1)) == meta.get("crc32c")


CACHE_RUN = 64  # consecutive steps decoded and resized together when a decoded-frame cache is built


def _frame_rows(frames, view, steps):  # (n,) consecutive steps -> uint8 (n, 3, H, W), as a Mixture's windows hold them
    return frames._frames(0, {"rows": (view, steps)})["rows"]


def build_frame_cache(src, view, size, interpolation, workers=None):
    """Decode (checking every JPEG's CRC-32C, as training does), resize and write every frame of a view in step
    order: uint8 (steps, 3, H, W), written to a temporary file and renamed, so ranks that race all write the same
    bytes and an interrupted build leaves nothing behind. Steps go in runs of CACHE_RUN through Mixture._frames, so
    a video is decoded sequentially, one seek per run, not per frame."""
    path, start = frame_cache_path(src, view, size, interpolation), time.time()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frames = Mixture([src], views=(view,), image_size=size, interpolation=interpolation)  # the JPEG / video path
    workers = max(0, (os.cpu_count() or 1) - 1) if workers is None else workers
    runs = [np.arange(a, min(a + CACHE_RUN, len(src))) for a in range(0, len(src), CACHE_RUN)]  # in step order
    batches = torch.utils.data.DataLoader(runs, batch_size=None, num_workers=workers,
                                          collate_fn=partial(_frame_rows, frames, view))
    try:
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(src), 3, *size))
        for run, x in zip(runs, batches):
            out[run[0]:run[-1] + 1] = x.numpy()  # (n, 3, H, W)
        out.flush()
        crc = google_crc32c.value(np.load(tmp, mmap_mode="r").reshape(-1))
        del out
        side = tmp.with_suffix(".json.tmp")
        side.write_text(json.dumps({"shape": [len(src), 3, *size], "crc32c": crc, "view": view,
                                    "interpolation": interpolation, "seconds": round(time.time() - start, 1)}))
        os.replace(tmp, path)
        os.replace(side, path.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json.tmp").unlink(missing_ok=True)
    log(f"decoded-frame cache: {len(src):,} {view} frames of {src.name} at {size[0]}x{size[1]} ({interpolation}) "
        f"in {time.time() - start:.0f} s -> {path}")
    return path


def frame_caches(sources, views, size, interpolation, mode):
    """{(source id, view): cache path} for every camera a Mixture reads, built where missing or damaged.
    mode: "on", "off", or "auto": on when all of them fit FRAME_CACHE_BUDGET and the disk (the decision is logged)."""
    if mode not in CACHE_FRAMES:
        raise DataError(f"cache_frames='{mode}': expected one of {list(CACHE_FRAMES)}")
    wanted = [(sid, v) for sid, s in enumerate(sources) for v in views if v in s.views]
    if mode == "off" or not wanted:
        return {}
    need = sum(len(sources[sid]) * 3 * size[0] * size[1] for sid, _ in wanted)
    caches = {(sid, v): frame_cache_path(sources[sid], v, size, interpolation) for sid, v in wanted}
    missing = [k for k, p in caches.items() if not frame_cache_ok(p, (len(sources[k[0]]), 3, *size))]
    new = sum(len(sources[sid]) * 3 * size[0] * size[1] for sid, _ in missing)
    free = shutil.disk_usage(sources[0].cache.parent).free
    what = (f"{len(wanted)} camera(s), {sum(len(sources[sid]) for sid, _ in wanted):,} frames at {size[0]}x{size[1]} "
            f"= {need / 2**30:.2f} GiB ({new / 2**30:.2f} GiB to build, {free / 2**30:.0f} GiB free)")
    if new > free:
        if mode == "on":
            raise DataError(f"cache_frames='on': {what}: not enough free disk in {sources[0].cache.parent}")
        log(f"decoded-frame cache off (auto: {what}: not enough disk); frames are decoded from their files")
        return {}
    if mode == "auto" and need > FRAME_CACHE_BUDGET:
        log(f"decoded-frame cache off (auto: {what} > FRAME_CACHE_BUDGET {FRAME_CACHE_BUDGET / 2**30:.0f} GiB); "
            f"frames are decoded from their files")
        return {}
    log(f"decoded-frame cache on ({mode}: {what}" + (f" <= FRAME_CACHE_BUDGET {FRAME_CACHE_BUDGET / 2**30:.0f} GiB"
                                                     if mode == "auto" else "") + ")")
    for sid, v in missing:
        build_frame_cache(sources[sid], v, size, interpolation)
    return caches


# ---------------------------------------------------------------------------------------------------
# 8. Command line: summary and benchmark

def summary(ds):
    for sid, s in enumerate(ds.sources):
        st = s.stats
        print(f"[{sid}] {s.name}  ({s.meta['source']['format']}, cache {s.cache})")
        print(f"    episodes {st['num_episodes']:,}  steps {st['num_steps']:,}  "
              f"mean length {st['num_steps'] / st['num_episodes']:.1f}  weight {ds.weights[sid]:.3f}"
              + (f"  fps {st['fps']}" if "fps" in st else ""))
        shapes = {v: tuple(s.image(v, 0).shape) for v in s.views}
        print(f"    cameras {shapes}  state {s.state.shape[1]}-d  action {s.action.shape[1]}-d  "
              f"language embedding {'%d-d' % s.embedding.shape[1] if s.embedding is not None else 'none'}")
        if "cameras" in s.meta["source"]:
            print(f"    LeRobot {s.meta['source']['version']}: "
                  + ", ".join(f"{v} = {k}" for v, k in s.meta["source"]["cameras"].items()))
        print(f"    {len(s.instructions)} instruction(s): " + "; ".join(repr(t) for t in s.instructions[:5])
              + (" ..." if len(s.instructions) > 5 else ""))
        for key in ("action", "state"):
            for stat in ("mean", "std", "q01", "q99"):
                print(f"    {key:6s} {stat:4s} " + " ".join(f"{v:+8.3f}" for v in st[key][stat]))


def bench(ds, batch_size=32, batches=30, workers=None):
    """Read speed through the DataLoader -> (samples/s, decoded+resized frames/s, workers used)."""
    dl = loader(ds, batch_size, num_workers=workers)
    it = iter(dl)
    next(it)  # start the workers
    t0 = time.time()
    for _ in range(batches):
        next(it)
    dt = time.time() - t0
    frames = batch_size * batches * ds.history * len(ds.views)
    return batch_size * batches / dt, frames / dt, dl.num_workers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="PATH or PATH:WEIGHT,...")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--history", type=int, default=1)
    p.add_argument("--views", default="primary")
    p.add_argument("--workers", type=int, default=None)
    add_args(p)
    args = p.parse_args(argv)
    try:
        ds = load(args.path, args.split, keys_from(args), args.calvin_all_frames, cache_frames=args.cache_frames,
                  image_size=args.image_size, history=args.history, views=tuple(args.views.split(",")))
    except DataError as e:  # one line and status 2, as the method command lines (train.cli)
        print(f"data.py: {e}", file=sys.stderr)
        error = SystemExit(f"data.py: {e}")
        error.code = 2
        raise error from None
    if not args.bench:
        return summary(ds)
    samples, frames, workers = bench(ds, workers=args.workers)
    print(f"{samples:,.0f} samples/s, {frames:,.0f} decoded+resized frames/s ({workers} workers, "
          f"{ds.size[0]}x{ds.size[1]}, history {ds.history}, views {list(ds.views)}, frames from "
          f"{'the decoded-frame cache' if ds.frame_caches else 'the encoded files (JPEG, PNG or video)'})")


if __name__ == "__main__":
    main()

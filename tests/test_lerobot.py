"""data.py on LeRobot datasets: v3.0 and v2.1 fixtures written in the real layout with pyarrow and PyAV
(tests/fixtures.py write_lerobot_v30 / write_lerobot_v21), read without conversion; frames decoded from the mp4s
by timestamp with LeRobot's nearest-frame rule."""
import json
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import train
from tests import fixtures

VERSIONS = {"v3.0": "lerobot_v30_path", "v2.1": "lerobot_v21_path"}


@pytest.fixture(params=list(VERSIONS))
def lerobot(request):
    """(version, dataset root) for each fixture."""
    return request.param, request.getfixturevalue(VERSIONS[request.param])


def source(path, **keys):
    return data.Source(data.prepare(str(path), keys=keys or None))


def one_line_error(fn, match):
    with pytest.raises(data.DataError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and len(str(e.value)) < 600, str(e.value)
    return str(e.value)


def copy_of(path, tmp_path):
    return Path(shutil.copytree(path, tmp_path / "copy"))


def frame_times(version, root):
    """{camera: [(mp4, time in it)] per step}, from the dataset's own metadata (not data.py's pointers): v3.0 a
    frame lies at its episode's from_timestamp + its timestamp in the episode's file; v2.1 at its timestamp."""
    info = json.loads((root / "meta" / "info.json").read_text())
    out = {k: [] for k in fixtures.LEROBOT_CAMERAS}
    if version == "v3.0":
        episodes = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
        rows = pa.concat_tables([pq.read_table(f) for f in sorted((root / "data").glob("*/*.parquet"))]).to_pylist()
        for r in rows:
            ep = episodes[r["episode_index"]]
            for k in out:
                mp4 = root / info["video_path"].format(video_key=k, chunk_index=ep[f"videos/{k}/chunk_index"],
                                                       file_index=ep[f"videos/{k}/file_index"])
                out[k].append((mp4, ep[f"videos/{k}/from_timestamp"] + r["timestamp"]))
    else:
        for f in sorted((root / "data").glob("*/*.parquet")):
            for r in pq.read_table(f).to_pylist():
                for k in out:
                    mp4 = root / info["video_path"].format(episode_chunk=r["episode_index"] // info["chunks_size"],
                                                           video_key=k, episode_index=r["episode_index"])
                    out[k].append((mp4, r["timestamp"]))
    return out


def sequential_decode(mp4):
    """Every frame of a video, decoded in order from the start without seeking: (pts times (s), uint8 (3, H, W))."""
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        frames = [(float(f.pts * s.time_base), torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1))
                  for f in c.decode(s)]
    return np.array([t for t, _ in frames]), [x for _, x in frames]


def reference_frames(version, root, camera):
    """Per step, LeRobot's rule on a sequential decode: the frame whose pts is nearest the step's time (the first
    of equally near ones), which must lie within tolerance_s."""
    decoded, out = {}, []
    for mp4, t in frame_times(version, root)[camera]:
        pts, frames = decoded.setdefault(mp4, sequential_decode(mp4))
        n = int(np.abs(pts - t).argmin())
        assert abs(pts[n] - t) <= data.TOLERANCE_S, (mp4, t, pts[n])
        out.append(frames[n])
    return out


# --- detection, summary, the numbers -----------------------------------------------------------------

def test_detect_and_summary(lerobot, capsys):
    version, root = lerobot
    assert data.detect(str(root)) == ("lerobot", root)
    data.main([str(root), "--image_size", "32", "--cache_frames", "off"])
    out = capsys.readouterr().out
    assert "(lerobot," in out and "episodes 5" in out and "fps 10" in out and "state 8-d  action 7-d" in out
    assert "'primary': (3, 64, 64), 'wrist': (3, 64, 64)" in out and "2 instruction(s)" in out
    assert f"LeRobot {version}: primary = observation.images.top, wrist = observation.images.wrist" in out


def test_steps_state_action_instruction_and_episodes_are_what_was_written(lerobot):
    version, root = lerobot
    s, written = source(root), fixtures.lerobot_content(version)
    assert s.meta["source"]["format"] == "lerobot" and s.stats["fps"] == 10
    assert s.start.tolist() == np.cumsum([0] + [e["length"] for e in written]).tolist()
    np.testing.assert_array_equal(s.state, np.concatenate([e["state"] for e in written]))
    np.testing.assert_array_equal(s.action, np.concatenate([e["action"] for e in written]))  # used as stored
    assert set(np.unique(s.action[:, 6])) == {0.0, 1.0}
    assert [s.instructions[i] for i in s.instruction] == [fixtures.LEROBOT_TASKS[e["task"]] for e in written]
    assert s.stats["action"] == data.statistics(s.action) and s.stats["state"] == data.statistics(s.state)
    ds = data.load(str(root), history=3, chunk=4, views=("primary", "wrist"), image_size=32, cache_frames="off")
    e = written[1]
    x = ds[(0, int(e["frames"][0]) + 1, 0)]  # step 1 of episode 1: the history reaches back before its start
    assert x["obs_pad"].tolist() == [True, False, False] and x["episode"] == 1 and x["step"] == 1
    assert x["instruction"] == fixtures.LEROBOT_TASKS[e["task"]]
    np.testing.assert_array_equal(x["state"][1:].numpy(), e["state"][:2])
    np.testing.assert_array_equal(x["action"][-1].numpy(), e["action"][1:5])


# --- frames -------------------------------------------------------------------------------------------

def test_each_step_decodes_the_frame_written_there(lerobot):
    version, root = lerobot
    s = source(root)
    for view, camera in (("primary", 0), ("wrist", 1)):
        frames = s.images(view, list(range(len(s))))
        assert [fixtures.lerobot_frame_id(f) for f in frames] == list(range(len(s)))  # which frame: by content
        for n, f in enumerate(frames):  # its pixels: within what AV1 at crf 30 loses on 64 px frames
            error = np.abs(f.permute(1, 2, 0).numpy().astype(int) - fixtures.lerobot_frame(camera, n)).mean()
            assert error < 6, (view, n, error)


def test_seeking_reader_equals_a_sequential_decode_at_every_step(lerobot):
    """Our seek + decode-forward, per step, for all steps at once (across file boundaries) and for random windows,
    gives exactly the pixels of a from-the-start decode of each file under LeRobot's nearest-frame rule."""
    version, root = lerobot
    s, rng = source(root), np.random.default_rng(0)
    for view, camera in (("primary", fixtures.LEROBOT_CAMERAS[0]), ("wrist", fixtures.LEROBOT_CAMERAS[1])):
        ref = reference_frames(version, root, camera)
        assert all(torch.equal(s.image(view, i), ref[i]) for i in range(len(s)))
        assert all(torch.equal(a, b) for a, b in zip(s.images(view, list(range(len(s)))[::-1]), ref[::-1]))
        for _ in range(20):
            idx = rng.choice(len(s), size=int(rng.integers(1, 8))).tolist()
            assert all(torch.equal(a, ref[i]) for a, i in zip(s.images(view, idx), idx))


def test_h264_videos_read_too(tmp_path):
    """The fixtures' fallback codec, H.264 (libx264, GOP 2: its dts run a frame behind its pts): the same rule and
    pixels."""
    root = fixtures.write_lerobot_v30(tmp_path / "h264", num_episodes=3, codec="libx264")
    s, ref = source(root), reference_frames("v3.0", root, fixtures.LEROBOT_CAMERAS[0])
    assert [fixtures.lerobot_frame_id(f) for f in s.images("primary", list(range(len(s))))] == list(range(len(s)))
    assert all(torch.equal(s.image("primary", i), ref[i]) for i in range(len(s)))


def test_windows_equal_frame_by_frame_decoding(lerobot_v30_path):
    ds = data.load(str(lerobot_v30_path), history=4, views=("primary", "wrist"), image_size=24, future=3,
                   cache_frames="off")
    src = ds.sources[0]
    for i in range(0, len(src), 7):
        x, (e, t, length) = ds[(0, i, i)], src.locate(i)
        hist = src.start[e] + np.maximum(t - 3 + np.arange(4), 0)
        for view in ("primary", "wrist"):
            ref = torch.stack([data.resize(src.image(view, int(j)), ds.size) for j in hist])
            assert torch.equal(x[f"image_{view}"], ref), (i, view)


def test_frame_cache_gives_the_live_batches(lerobot):
    _, root = lerobot
    window = dict(history=2, views=("primary", "wrist"), image_size=32, future=1)
    live, cached = (data.load(str(root), cache_frames=mode, **window) for mode in ("off", "on"))
    assert cached.frame_caches and not live.frame_caches
    batches = zip(data.loader(live, 8, seed=1, num_workers=0), data.loader(cached, 8, seed=1, num_workers=0))
    for _, (a, b) in zip(range(8), batches):  # 64 samples of an endless stream: every step about once
        for k in ("image_primary", "image_wrist", "future_image_primary", "future_image_wrist", "action", "state"):
            assert torch.equal(a[k], b[k]), k


def test_frame_cache_decodes_each_file_sequentially(lerobot_v30_path, monkeypatch):
    """Building the cache seeks once per run of consecutive steps within a file, not once per frame."""
    seeks = []
    decode = data.video_frames
    monkeypatch.setattr(data, "video_frames", lambda c, path, times, **kw: seeks.append(len(times)) or
                        decode(c, path, times, **kw))
    src = source(lerobot_v30_path)
    data.build_frame_cache(src, "primary", (16, 16), "bilinear", workers=0)
    assert sum(seeks) == len(src) and len(seeks) == len(src.meta["source"]["files"]["primary"])  # 3 files, 1 run


def test_image_dtype_cameras_are_copied_once_and_crc_checked(tmp_path):
    root = fixtures.write_lerobot_v30(tmp_path / "images", num_episodes=3, image_keys=("observation.images.wrist",))
    s = source(root)
    assert s.kinds == {"primary": "video", "wrist": "image"}
    for i in range(len(s)):  # PNG: exactly the frames written
        assert np.array_equal(s.image("wrist", i).permute(1, 2, 0).numpy(), fixtures.lerobot_frame(1, i))
    ds = data.load(str(root), views=("wrist",), image_size=16, cache_frames="on")
    assert ds.frame_caches
    blob, (_, offset, length, _) = s.cache / "blob_wrist.bin", s.pointers["wrist"][5].tolist()
    raw = bytearray(blob.read_bytes())
    raw[offset + length // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    one_line_error(lambda: data.Source(s.cache).image("wrist", 5), r"blob_wrist.bin: the wrist image at byte .* fails")


# --- mixtures, hf: ----------------------------------------------------------------------------------

def test_a_lerobot_copy_of_the_bridge_sample_reads_back_as_the_original(bridge_path, tmp_path):
    # ~1 s: the README's speed comparison reads such a copy (fixtures.write_lerobot_copy: 225 steps x 2 cameras, AV1)
    copy = data.Source(data.prepare(fixtures.write_lerobot_copy(bridge_path, tmp_path / "copy")))
    original = data.Source(data.prepare(bridge_path))
    assert np.array_equal(copy.start, original.start) and copy.instructions == original.instructions
    assert np.array_equal(copy.state, original.state) and np.array_equal(copy.action, original.action)
    for view in original.views:
        steps = list(range(0, len(original), 37))
        decoded, frames = (torch.stack(x.images(view, steps)).float() for x in (copy, original))
        error = (decoded - frames).abs().mean((1, 2, 3))  # AV1 at crf 30: the same picture, not the same bytes
        assert error.max() < 6 and error.max() < (decoded - frames.roll(1, 0)).abs().mean((1, 2, 3)).min() / 2


def test_lerobot_and_rlds_mix(lerobot_v30_path, lerobot_v21_path, bridge_path):
    ds = data.load(f"{lerobot_v30_path}:0.4,{bridge_path}:0.4,{lerobot_v21_path}:0.2", history=2, image_size=32,
                   cache_frames="off")
    assert ds.state_dim == 8 and ds.action_dim == 7  # LeRobot 8-d state, Bridge 7-d: padded to the largest
    batch = next(iter(data.loader(ds, 24, num_workers=0)))
    assert batch["image_primary"].shape == (24, 2, 3, 32, 32) and set(batch["dataset_id"].tolist()) == {0, 1, 2}
    bridge = batch["dataset_id"] == 1
    assert (batch["state"][bridge][..., 7] == 0).all()


def fake_hub(tmp_path, root, repo="lerobot/tiny_v30", commit="5f3c9d1e0a"):
    folder = tmp_path / "hub" / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(root, folder / "snapshots" / commit)
    return tmp_path / "hub", folder / "snapshots" / commit


def test_hf_names_a_dataset_in_the_local_hugging_face_cache(lerobot_v30_path, bridge_path, tmp_path, monkeypatch):
    hub, snapshot = fake_hub(tmp_path, lerobot_v30_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert data.detect("hf:lerobot/tiny_v30") == ("lerobot", snapshot)
    assert data.parse_sources("hf:lerobot/tiny_v30:0.5,path:0.5") == (["hf:lerobot/tiny_v30", "path"], [0.5, 0.5])
    assert data.parse_sources("hf:lerobot/tiny_v30") == (["hf:lerobot/tiny_v30"], None)
    ds = data.load(f"hf:lerobot/tiny_v30:0.5,{bridge_path}:0.5", image_size=16, cache_frames="off")
    assert ds.sources[0].name == "lerobot--tiny_v30" and len(ds.sources[0]) == len(source(lerobot_v30_path))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # $HF_HOME/hub
    shutil.move(str(hub), str(tmp_path / "home" / "hub")) if (tmp_path / "home").mkdir() is None else None
    assert data.detect("hf:lerobot/tiny_v30")[0] == "lerobot"
    message = one_line_error(lambda: data.load("hf:lerobot/pusht"), r"hf:lerobot/pusht: not in the local Hugging Face")
    assert message.endswith("download it first with: hf download lerobot/pusht --repo-type dataset")
    one_line_error(lambda: data.detect("hf:pusht"), "expected hf:ORG/NAME")


# --- errors -------------------------------------------------------------------------------------------

def edit_info(root, **changes):
    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    for k, v in changes.items():
        info.pop(k) if v is None else info.__setitem__(k, v)
    path.write_text(json.dumps(info))


def test_other_codebase_versions_and_missing_info_keys_are_named(lerobot_v30_path, tmp_path):
    root = copy_of(lerobot_v30_path, tmp_path)
    edit_info(root, codebase_version="v2.0")
    one_line_error(lambda: data.prepare(str(root)), r"info.json: codebase_version 'v2.0'; data.py reads LeRobot "
                                                    r"datasets of codebase_version v3.0 and v2.1")
    for key in ("fps", "data_path", "video_path"):
        edit_info(root, codebase_version="v3.0", **{key: None})
        one_line_error(lambda: data.prepare(str(root)), rf"info.json: no '{key}'; expected LeRobot v3.0's info.json")
        shutil.copy(lerobot_v30_path / "meta" / "info.json", root / "meta" / "info.json")


def test_missing_video_file_is_named(lerobot, tmp_path):
    _, root = lerobot
    root = copy_of(root, tmp_path)
    mp4 = sorted((root / "videos").rglob("*.mp4"))[-1]
    mp4.unlink()
    one_line_error(lambda: data.prepare(str(root)), rf"{mp4}: missing \(the observation.images.\w+ video of episode 4")


def test_a_state_key_that_is_no_column_lists_the_columns(lerobot):
    _, root = lerobot
    message = one_line_error(lambda: data.prepare(str(root), keys={"state_key": "observation.joints"}),
                             r"\.parquet: no column 'observation.joints' \(--state_key\); it has: ")
    assert "action, observation.state, timestamp, frame_index, episode_index, index, task_index" in message
    one_line_error(lambda: data.prepare(str(root), keys={"action_key": "observation.images.top"}),
                   r"--action_key observation.images.top: a video feature .*; expected numbers, such as: action, ")
    one_line_error(lambda: data.prepare(str(root), keys={"wrist_key": "observation.state"}),
                   r"--wrist_key observation.state: a float32 feature .*expected a camera .*: observation.images.top, ")
    s = source(root, image_key="observation.images.wrist", state_key="observation.state+action")
    assert s.views == ["primary"] and s.state.shape[1] == 15


def test_timestamps_off_by_more_than_the_tolerance_are_refused(lerobot_v30_path, tmp_path):
    root = copy_of(lerobot_v30_path, tmp_path)
    path = root / "data" / "chunk-000" / "file-001.parquet"
    table = pq.read_table(path)
    ts = table.column("timestamp").to_numpy().copy()
    ts[5] += 0.05  # half a frame at 10 fps
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), path)
    one_line_error(lambda: data.prepare(str(root)),
                   r"file-001.mp4: no frame within 0.0001 s of 1.7500 s \(the observation.images.top video of "
                   r"episode 3, frame 5: from_timestamp 1.2000 \+ timestamp 0.5500; nearest frame at 1.8000 s\)")
    s = source(lerobot_v30_path)  # and at training time, as LeRobot's decoder refuses it
    mp4, t = s.file("primary", 0), s.pointers["primary"][3, 1]
    one_line_error(lambda: data.video_frames(data.open_video(mp4), mp4, [t + 0.03]),
                   r"file-000.mp4: no frame within 0.0001 s of 0.3300 s \(the nearest decoded is at 0.3000 s\)")


# --- every method trains on both versions -------------------------------------------------------------

TINY = {
    "rt1": ["--image_size", "32", "--history", "2", "--width_mult", "0.1", "--depth_mult", "0.1", "--tokens_per_image",
            "4", "--d_model", "32", "--layers", "1", "--heads", "2", "--head_dim", "8", "--lang_dim", "16"],
    "gcbc": ["--image_size", "32", "--width", "8", "--stage_sizes", "1", "1", "1", "1", "--mlp_dims", "16", "16"],
    "hpt": ["--image_size", "32", "--history", "2", "--chunk", "3", "--views", "primary", "wrist"],
    "gr1": ["--chunk_size", "3", "--history", "3", "--image_size", "32", "--d_model", "32", "--layers", "2", "--heads",
            "2", "--mlp", "64", "--n_positions", "512", "--patch", "8", "--vit_dim", "24", "--vit_layers", "1",
            "--vit_heads", "2", "--resampler_depth", "1", "--resampler_heads", "2", "--resampler_dim_head", "8",
            "--latents", "3", "--lang_dim", "16", "--decoder_layers", "1", "--decoder_heads", "2",
            "--future_all_steps", "--no-freeze_vit"],
    "mcr": ["--size", "18", "--image_size", "32", "--views", "primary", "wrist"],
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", list(TINY))
def test_every_method_trains_on_lerobot(method, lerobot, tmp_path, monkeypatch):
    """Two optimiser steps of each method's main() on each version (the whole group: ~12 s on the 2-core machine)."""
    import importlib
    _, root = lerobot
    common = ["--data", str(root), "--steps", "2", "--batch_size", "4", "--workers", "0", "--warmup", "1",
              "--log_every", "1", "--eval_episodes", "0", "--out_dir", str(tmp_path / method)]
    live = [] if method == "mcr" else ["--cache_frames", "off"]  # the video path in the training loop
    monkeypatch.setattr(sys, "argv", [f"{method}.py", *common, *live, *TINY[method]])
    importlib.import_module(method).main()
    ckpt = train.load_checkpoint(tmp_path / method / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["stats"][0]["fps"] == 10

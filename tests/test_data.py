"""data.py on the real Bridge sample and on fixtures written in DROID's, fractal's, kuka's, language_table's,
taco_play's and CALVIN's exact layouts (tests/fixtures.py)."""
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from tests import fixtures


def window(path, **kw):  # the JPEG path unless a test asks for the decoded-frame cache
    return data.load(str(path), image_size=kw.pop("image_size", 32), cache_frames=kw.pop("cache_frames", "off"), **kw)


def reference_frames(ds, src, view, idx):
    """main's per-frame way (before issue 16): decode and resize frame by frame, stack -> uint8 (n, 3, H, W)."""
    if view not in src.views:
        return torch.zeros((len(idx), 3) + ds.size, dtype=torch.uint8)
    return torch.stack([data.resize(src.image(view, int(i)), ds.size, ds.interpolation) for i in idx])


def episode_of(ds, e):
    s = ds.sources[0]
    return range(int(s.start[e]), int(s.start[e + 1]))


# --- the real Bridge sample -------------------------------------------------------------------------

def test_bridge_sample_reads_as_standard_keys(bridge_path):
    ds = window(bridge_path, history=2, chunk=3, views=("primary", "secondary"), image_size=48)
    s = ds.sources[0]
    assert s.name == "bridge_dataset" and s.stats["num_episodes"] == 25
    assert len(ds) == 25 * 9  # 10 steps each, the last one dropped by Octo's relabelling
    x = ds[(0, 13, 0)]
    assert x["image_primary"].dtype == torch.uint8 and x["image_primary"].shape == (2, 3, 48, 48)
    assert x["image_secondary"].shape == (2, 3, 48, 48)
    assert x["state"].dtype == torch.float32 and x["state"].shape == (2, 7)
    assert x["action"].shape == (2, 3, 7) and x["action_pad"].shape == (2, 3)
    assert x["language_embedding"].shape == (512,)
    assert x["instruction"] in {"put cup from counter or drying rack into sink", "put carrot on plate",
                                "flip pot upright which is in sink", "turn lever vertical to front"}
    assert set(np.unique(s.action[:, 6])) <= {0.0, 1.0}  # binarised gripper, 1 = open


def test_bridge_actions_follow_octo(bridge_path):
    # Octo's bridge transform: motion = next reached state - state, gripper binarised, last step dropped
    ds = window(bridge_path)
    s = ds.sources[0]
    ref = fixtures.tfds_episodes(bridge_path)[0]
    state, action = ref["steps/observation/state"], ref["steps/action"]
    np.testing.assert_allclose(s.action[:9, :6], state[1:, :6] - state[:-1, :6], atol=1e-7)
    np.testing.assert_array_equal(s.action[:9, 6], data.binarize_gripper(action[:, 6])[:9])
    np.testing.assert_array_equal(s.state[:9], state[:9])


def test_own_parser_equals_tfds_on_bridge_bit_for_bit(bridge_path):
    for split in ("train", "val"):
        ours = [ep.raw() for ep in data.rlds_episodes(bridge_path, split)]
        assert_same_episodes(ours, fixtures.tfds_episodes(bridge_path, split))


def assert_same_episodes(ours, ref):
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        assert a.keys() == b.keys()
        for k in a:
            va, vb = np.asarray(a[k]), np.asarray(b[k])
            assert va.dtype == vb.dtype and va.shape == vb.shape, (k, va.dtype, vb.dtype, va.shape, vb.shape)
            assert np.array_equal(va, vb), k


def test_statistics_are_those_of_the_arrays(bridge_path):
    s = window(bridge_path).sources[0]
    a = np.asarray(s.action, np.float64)
    st = s.stats["action"]
    np.testing.assert_allclose(st["mean"], a.mean(0))
    np.testing.assert_allclose(st["std"], a.std(0))
    np.testing.assert_allclose(st["q01"], np.quantile(a, 0.01, 0))
    np.testing.assert_allclose(st["q99"], np.quantile(a, 0.99, 0))
    assert st["min"] == a.min(0).tolist() and st["max"] == a.max(0).tolist()


# --- fixtures in the released layouts ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["droid_path", "fractal_path", "kuka_path", "language_table_path", "taco_path"])
def test_own_parser_equals_tfds_on_fixtures(name, request):
    path = request.getfixturevalue(name)
    assert_same_episodes([ep.raw() for ep in data.rlds_episodes(path)], fixtures.tfds_episodes(path))


def test_droid_maps_to_standard_action_and_state(droid_path):
    ds = window(droid_path, views=("primary", "secondary", "wrist"))
    s = ds.sources[0]
    ref = fixtures.tfds_episodes(droid_path)
    assert s.name == "r2d2_faceblur" and s.stats["num_episodes"] == len(ref)
    steps = ref[0]["steps/action_dict/cartesian_velocity"].shape[0]
    expected = np.concatenate([ref[0]["steps/action_dict/cartesian_velocity"],
                               1 - ref[0]["steps/action_dict/gripper_position"]], 1)
    np.testing.assert_allclose(s.action[:steps], expected, rtol=1e-6)
    expected = np.concatenate([ref[0]["steps/observation/cartesian_position"],
                               ref[0]["steps/observation/gripper_position"]], 1)
    np.testing.assert_allclose(s.state[:steps], expected, rtol=1e-6)
    x = ds[(0, 3, 0)]
    for view in ("primary", "secondary", "wrist"):
        assert x[f"image_{view}"].shape == (1, 3, 32, 32)
    full = data.Source(s.cache).image("wrist", 0)
    assert full.shape == (3, 180, 320)
    first = ref[0]["steps/language_instruction"][0].decode() or ref[0]["steps/language_instruction_2"][0].decode()
    assert ds[(0, 0, 0)]["instruction"] == first


def test_fractal_relative_gripper_becomes_absolute(fractal_path):
    s = window(fractal_path).sources[0]
    ref = fixtures.tfds_episodes(fractal_path)[0]
    rel = ref["steps/action/gripper_closedness_action"][:, 0]
    n = len(rel)
    np.testing.assert_array_equal(s.action[:n, 6], data.rel2abs_gripper(rel))
    np.testing.assert_array_equal(s.action[:n, :3], ref["steps/action/world_vector"])
    assert s.embedding.shape[1] == 512


def test_kuka_zlib_state_is_decompressed(kuka_path):
    s = window(kuka_path).sources[0]
    assert s.state.shape[1] == 8 and np.isfinite(s.state).all()


def test_language_table_instruction_is_decoded(language_table_path):
    ds = window(language_table_path)
    assert all(t and "\x00" not in t for t in ds.instructions)
    assert np.all(ds.sources[0].action[:, 2:6] == 0) and np.all(ds.sources[0].action[:, 6] == 1)


def test_taco_play_has_wrist_camera(taco_path):
    x = window(taco_path, views=("primary", "wrist"))[(0, 0, 0)]
    assert x["image_wrist"].shape == (1, 3, 32, 32)


def test_calvin_language_windows_and_all_frames(calvin_path):
    ann = np.load(Path(calvin_path) / "training" / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
    ds = window(calvin_path, views=("primary", "wrist"))
    s = ds.sources[0]
    assert s.stats["num_episodes"] == len(ann["info"]["indx"])
    assert s.stats["num_steps"] == sum(e - b + 1 for b, e in ann["info"]["indx"])
    assert set(ds.instructions) == set(ann["language"]["ann"]) and s.embedding.shape[1] == 384
    b, e = ann["info"]["indx"][0]
    frame = np.load(Path(calvin_path) / "training" / f"episode_{b:07d}.npz")
    np.testing.assert_allclose(s.action[0, :6], frame["rel_actions"][:6])
    assert s.action[0, 6] == (frame["rel_actions"][6] + 1) / 2
    x = ds[(0, 0, 0)]
    assert torch.equal(data.Source(s.cache).image("primary", 0), torch.from_numpy(frame["rgb_static"]).permute(2, 0, 1))
    assert x["image_wrist"].shape == (1, 3, 32, 32)
    every = window(calvin_path, calvin_all_frames=True).sources[0]
    ids = np.load(Path(calvin_path) / "training" / "ep_start_end_ids.npy")
    assert every.stats["num_steps"] == sum(e - b + 1 for b, e in ids) and every.instructions == [""]


# --- windows at episode boundaries ------------------------------------------------------------------

def test_history_is_padded_at_the_episode_start(droid_path):
    ds = window(droid_path, history=3, chunk=2)
    first = episode_of(ds, 1)[0]
    x = ds[(0, first, 0)]
    assert x["obs_pad"].tolist() == [True, True, False] and x["step"] == 0 and x["episode"] == 1
    assert torch.equal(x["image_primary"][0], x["image_primary"][2])  # the first frame repeats
    assert torch.equal(x["state"][0], x["state"][2])
    y = ds[(0, first + 2, 0)]
    assert y["obs_pad"].tolist() == [False] * 3
    np.testing.assert_array_equal(y["state"].numpy(), ds.sources[0].state[first:first + 3])


def test_action_chunks_are_padded_past_the_episode_end(droid_path):
    ds = window(droid_path, history=2, chunk=4)
    steps = episode_of(ds, 0)
    x = ds[(0, steps[-1], 0)]
    # history steps L-2 and L-1: the actions from each step on, the last one repeated past the end
    assert x["action_pad"].tolist() == [[False, False, True, True], [False, True, True, True]]
    a = ds.sources[0].action
    np.testing.assert_array_equal(x["action"][0].numpy(), np.stack([a[steps[-2]], *[a[steps[-1]]] * 3]))
    np.testing.assert_array_equal(x["action"][1].numpy(), np.stack([a[steps[-1]]] * 4))
    inner = ds[(0, steps[0] + 1, 0)]
    assert not inner["action_pad"].any()
    np.testing.assert_array_equal(inner["action"][1].numpy(), a[steps[0] + 1: steps[0] + 5])


def test_goal_is_a_later_frame_of_the_same_episode(droid_path):
    ds = window(droid_path, goal_last=8)
    src = data.Source(ds.sources[0].cache)
    for position, i in enumerate(range(0, len(ds), 3)):
        x = ds[(0, i, position)]
        e, t, length = src.locate(i)
        matches = [g for g in range(max(t, length - 8), length)
                   if torch.equal(x["goal_image_primary"], reference_frames(ds, src, "primary", [src.start[e] + g])[0])]
        assert matches, (i, e, t)


def test_future_frames_are_offset_and_clamped(droid_path):
    ds = window(droid_path, history=2, future=3)
    steps = episode_of(ds, 0)
    x = ds[(0, steps[-2], 0)]
    assert x["future_pad"].tolist() == [True, True]
    assert torch.equal(x["future_image_primary"][1], reference_frames(ds, ds.sources[0], "primary", [steps[-1]])[0])
    y = ds[(0, steps[1], 0)]
    assert y["future_pad"].tolist() == [False, False]
    assert torch.equal(y["future_image_primary"][0], reference_frames(ds, ds.sources[0], "primary", [steps[3]])[0])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "bicubic_float"])
def test_windows_equal_frame_by_frame_decoding(bridge_path, interpolation):
    """Issue 16: a window decodes and resizes each distinct frame once, in one call per frame size; the pixels
    are bit-identical to decoding and resizing frame by frame (main's way), for every image key of a sample."""
    ds = window(bridge_path, history=3, views=("primary", "secondary", "wrist"), goal_last=4, future=2,
                missing_views="zeros", interpolation=interpolation, image_size=(40, 56))
    src = ds.sources[0]
    for position, i in enumerate([0, 1, 2, 13, 44, len(ds) - 1]):  # episode starts, middles, the very end
        x = ds[(0, i, position)]
        e, t, length = src.locate(i)
        base, hist = int(src.start[e]), np.maximum(np.arange(t - 2, t + 1), 0)
        for view in ("primary", "secondary", "wrist"):
            assert torch.equal(x[f"image_{view}"], reference_frames(ds, src, view, base + hist)), (i, view)
            fut = base + np.minimum(hist + 2, length - 1)
            assert torch.equal(x[f"future_image_{view}"], reference_frames(ds, src, view, fut)), (i, view)
        goals = [reference_frames(ds, src, "primary", [base + g])[0] for g in range(max(t, length - 4), length)]
        assert any(torch.equal(x["goal_image_primary"], g) for g in goals)
        assert x["image_primary"].is_contiguous() and x["image_wrist"].abs().sum() == 0


# --- sampling: sharding, determinism, resume, mixtures ----------------------------------------------

def positions(ds, rank, world, batch, n_batches, start=0, workers=0):
    dl = data.loader(ds, batch, rank, world, seed=3, start=start, num_workers=workers)
    out = []
    for _, batch in zip(range(n_batches), dl):
        out += [(int(s), int(e), int(t)) for s, e, t in zip(batch["dataset_id"], batch["episode"], batch["step"])]
    return out


def test_two_ranks_two_workers_are_disjoint_and_cover_an_epoch(bridge_path):
    ds = window(bridge_path)  # 225 steps; 2 ranks x 5 per batch x 22 batches = 220 of them
    seen = [positions(ds, r, 2, 5, 22, workers=2) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 220 == len(seen[0]) + len(seen[1])
    everything = positions(ds, 0, 1, 15, 15)  # the whole epoch from one rank: every step once
    assert len(set(everything)) == len(ds)


def test_same_seed_same_order_and_resume_continues_it(bridge_path):
    ds = window(bridge_path)
    a = positions(ds, 0, 1, 4, 6)
    assert a == positions(ds, 0, 1, 4, 6)
    assert positions(ds, 0, 1, 4, 3, start=12) == a[12:]
    other = [data.Sampler(ds, 4, seed=4).draw(p) for p in range(24)]
    assert other != [data.Sampler(ds, 4, seed=3).draw(p) for p in range(24)]


def test_mixture_samples_by_weight_with_dataset_ids(bridge_path, droid_path):
    ds = data.load(f"{bridge_path}:0.8,{droid_path}:0.2", image_size=32)
    assert ds.weights == pytest.approx([0.8, 0.2])
    ids = [data.Sampler(ds, 1).draw(p)[0] for p in range(4000)]
    assert abs(np.mean(ids) - 0.2) < 0.03
    x = ds[(1, 0, 0)]
    assert x["dataset_id"] == 1 and "language_embedding" not in x  # DROID has none
    natural = data.load(f"{bridge_path},{droid_path}", image_size=32)
    assert natural.weights[0] == pytest.approx(len(natural.sources[0]) / len(natural))


def test_parse_sources():
    assert data.parse_sources("a/b:0.7,c:0.3") == (["a/b", "c"], [0.7, 0.3])
    assert data.parse_sources("a/b") == (["a/b"], None)
    with pytest.raises(data.DataError, match="every source or to none"):
        data.parse_sources("a:1,b")


# --- gripper conventions ----------------------------------------------------------------------------

def test_rel2abs_gripper():
    # +1 close, -1 open, 0 keep -> 1 open, 0 closed; starts opposite to the first command
    rel = np.array([0, 0, 1, 0, 0, -1, 0, 1], np.float32)
    assert data.rel2abs_gripper(rel).tolist() == [1, 1, 0, 0, 0, 1, 1, 0]
    assert data.rel2abs_gripper(np.array([0, -1, 0], np.float32)).tolist() == [0, 1, 1]
    assert data.rel2abs_gripper(np.zeros(3, np.float32)).tolist() == [1, 1, 1]


def test_binarize_gripper():
    g = np.array([1.0, 0.99, 0.5, 0.3, 0.01, 0.0, 0.6, 0.97], np.float32)
    assert data.binarize_gripper(g).tolist() == [1, 1, 0, 0, 0, 0, 1, 1]


# --- bad input: one clear error naming the file or key ----------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(data.DataError, match="no such file or directory"):
        data.load(str(tmp_path / "nowhere"))


def test_remote_path_says_copy_it_first():
    with pytest.raises(data.DataError, match="copy the dataset to a local disk first"):
        data.load("gs://gresearch/robotics/droid/1.0.1")


def test_folder_in_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(data.DataError, match="no known format.*RLDS.*CALVIN"):
        data.load(str(tmp_path))


def test_unknown_dataset_lists_its_keys_and_the_flags(bridge_path, tmp_path):
    copy = tmp_path / "my_robot" / "1.0.0"
    shutil.copytree(bridge_path, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps(dict(info, name="my_robot")))
    for f in copy.glob("bridge_dataset-*"):
        f.rename(copy / f.name.replace("bridge_dataset", "my_robot"))
    with pytest.raises(data.DataError, match=r"(?s)'my_robot' is not in data.STANDARD.*observation/image_0.*"
                                             r"action keys: action.*--image_key"):
        data.load(str(copy))
    ds = data.load(str(copy), keys={"image_key": "observation/image_0", "action_key": "action",
                                    "state_key": "observation/state", "instruction_key": "language_instruction"},
                   image_size=16)
    assert ds[(0, 0, 0)]["action"].shape == (1, 1, 7) and len(ds) == 250
    with pytest.raises(data.DataError, match=r"no key 'steps/observation/wrist'.*observation/image_0"):
        data.load(str(copy), keys={"image_key": "observation/wrist", "action_key": "action"})


def test_empty_episode_and_nan_actions_are_named(tmp_path):
    empty = fixtures.write_bad_droid(tmp_path / "empty", problem="empty")
    with pytest.raises(data.DataError, match=r"r2d2_faceblur-train\.tfrecord.*episode \d+.*empty episode"):
        data.load(str(empty))
    nan = fixtures.write_bad_droid(tmp_path / "nan", problem="nan")
    with pytest.raises(data.DataError, match=r"r2d2_faceblur-train\.tfrecord.*action is not finite at step 2"):
        data.load(str(nan))
    state = {"image_key": "observation/exterior_image_1_left", "action_key": "action_dict/gripper_position",
             "state_key": "observation/gripper_position+action_dict/cartesian_position"}  # the NaN as a state
    with pytest.raises(data.DataError, match=r"r2d2_faceblur-train\.tfrecord.*state is not finite at step 2 \(dim 1\)"):
        data.load(str(nan), keys=state)


def test_missing_view_is_named(bridge_path):
    with pytest.raises(data.DataError, match=r"no \['wrist'\] camera"):
        window(bridge_path, views=("wrist",))


def test_truncated_tfrecord_is_named(bridge_path, tmp_path):
    copy = tmp_path / "bridge_dataset" / "1.0.0"
    shutil.copytree(bridge_path, copy)
    shard = copy / "bridge_dataset-train.tfrecord-00000-of-00001"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(data.DataError, match="bridge_dataset-train.tfrecord-00000-of-00001: record at byte"):
        data.load(str(copy))


def test_summary_and_bench_run(bridge_path, capsys):
    data.main([str(bridge_path)])
    out = capsys.readouterr().out
    assert "episodes 25" in out and "instruction(s)" in out and "action q99" in out
    data.main([str(bridge_path), "--bench", "--image_size", "32", "--workers", "0"])
    assert "frames/s" in capsys.readouterr().out


def test_bicubic_resizes_are_the_official_kernels(bridge_path):
    """GC-BC resizes as Torch-X-Embodiment (torchvision's uint8 bicubic), GR-1 as GR1-Training (bicubic on
    float; we store uint8, so rounded once): issue 14.5."""
    import torchvision.transforms.v2.functional as TF
    bil = window(bridge_path, image_size=48)[(0, 13, 0)]["image_primary"]
    ds = window(bridge_path, image_size=48, interpolation="bicubic")
    raw = ds.sources[0].image("primary", 13)[None]                               # (1, 3, h, w) native size
    bic = ds[(0, 13, 0)]["image_primary"]
    assert torch.equal(bic, TF.resize(raw, [48, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=True))
    flt = window(bridge_path, image_size=48, interpolation="bicubic_float")[(0, 13, 0)]["image_primary"]
    ref = torch.nn.functional.interpolate(raw.float(), size=(48, 48), mode="bicubic", antialias=True)
    assert flt.dtype == torch.uint8 and (flt[0].float() - ref[0].clamp(0, 255)).abs().max() <= 0.5
    assert (bic.int() - bil.int()).abs().max() > 0 and (flt.int() - bic.int()).abs().max() > 0
    with pytest.raises(data.DataError, match="interpolation='nearest'"):
        window(bridge_path, interpolation="nearest")


# --- corrupt data is refused (issue 15): CRCs, shard lengths, pickles, one-line errors ----------------

BRIDGE_TRAIN = "bridge_dataset-train.tfrecord-00000-of-00001"


def bridge_copy(bridge_path, tmp_path):
    copy = tmp_path / "bridge_dataset" / "1.0.0"
    shutil.copytree(bridge_path, copy)
    return copy


def record_offsets(path):
    """Byte offset of every record of a TFRecord file (u64 length, u32 crc, payload, u32 crc)."""
    buf, pos, out = Path(path).read_bytes(), 0, []
    while pos < len(buf):
        out.append(pos)
        pos += 16 + int.from_bytes(buf[pos:pos + 8], "little")
    return out


def flip(path, byte):
    buf = bytearray(Path(path).read_bytes())
    buf[byte] ^= 0x10
    Path(path).write_bytes(bytes(buf))


def one_line_error(fn, match):
    with pytest.raises(data.DataError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and len(str(e.value)) < 600, str(e.value)
    return str(e.value)


def test_tfrecord_crc_refuses_a_flipped_byte_naming_shard_and_record(bridge_path, tmp_path):
    """One flipped byte inside an episode's record (today: a changed action or frame, silently) or in a
    record's length field: prepare and the episode reader refuse it, as TFDS's DataLossError does."""
    copy = bridge_copy(bridge_path, tmp_path)
    shard = copy / BRIDGE_TRAIN
    third = record_offsets(shard)[2]
    flip(shard, third + 12 + 5000)  # inside the payload of the third record
    for read in (lambda: data.load(str(copy)), lambda: list(data.rlds_episodes(copy))):
        one_line_error(read, rf"{BRIDGE_TRAIN}: corrupted record at byte {third}: its \d+ bytes fail the CRC-32C")
    flip(shard, third + 12 + 5000)  # restored
    flip(shard, third + 1)           # the record's length field
    one_line_error(lambda: data.load(str(copy)), rf"{BRIDGE_TRAIN}: corrupted record at byte {third}: its length field")


def test_masked_crc32c_is_tensorflows():
    # TFRecord masks CRC-32C (Castagnoli; check value 0xE3069283 for "123456789") as rotr15 + 0xa282ead8
    crc = 0xE3069283
    assert data.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert data.masked_crc32c(b"") == 0xA282EAD8


def test_image_bytes_are_checked_as_training_reads_them(bridge_path, tmp_path):
    """Each image's bytes are checked against the CRC-32C prepare recorded, so a shard damaged after prepare
    is refused instead of decoded (unchecked, the damaged JPEG decodes to other pixels)."""
    from torchvision.io import ImageReadMode, decode_image
    copy = bridge_copy(bridge_path, tmp_path)
    source = data.load(str(copy), image_size=16).sources[0]
    _, offset, length, _ = (int(x) for x in source.pointers["primary"][7])

    def unchecked():  # the JPEG as it lies in the shard, decoded without a check
        jpeg = bytearray((copy / BRIDGE_TRAIN).read_bytes()[offset:offset + length])
        return decode_image(torch.frombuffer(jpeg, dtype=torch.uint8), mode=ImageReadMode.RGB)

    before = unchecked()
    assert torch.equal(source.image("primary", 7), before)
    flip(copy / BRIDGE_TRAIN, offset + length // 2)
    one_line_error(lambda: source.image("primary", 7),
                   rf"{BRIDGE_TRAIN}: the primary image at byte {offset} \({length} bytes\) fails the CRC-32C")
    assert not torch.equal(unchecked(), before)  # what training would have seen
    source.image("primary", 8)  # other frames still read


def test_shard_lengths_are_checked_and_the_shard_named(bridge_path, droid_path, tmp_path):
    """A shard cut at a record boundary passes every CRC; dataset_info.json's shardLengths catches it
    (today 24 of 25 episodes are read without a word). A missing shard is named too."""
    copy = bridge_copy(bridge_path, tmp_path)
    shard = copy / BRIDGE_TRAIN
    shard.write_bytes(shard.read_bytes()[:record_offsets(shard)[-1]])
    for read in (lambda: data.load(str(copy)), lambda: list(data.rlds_episodes(copy))):
        one_line_error(read, rf"{BRIDGE_TRAIN}: 24 records, but dataset_info.json's shardLengths says 25")
    droid = tmp_path / "droid_100" / "1.0.0"
    shutil.copytree(droid_path, droid)
    (droid / "r2d2_faceblur-train.tfrecord-00001-of-00003").unlink()
    one_line_error(lambda: data.load(str(droid)), r"dataset_info.json: split 'train' has 3 shards \(shardLengths\) but "
                                                  r"2 files .* missing r2d2_faceblur-train.tfrecord-00001-of-00003")


def test_dataset_info_json_errors_are_one_line(tmp_path):
    info = tmp_path / "dataset_info.json"
    for text, match in [('{"name": "x", "splits": [', r"dataset_info.json: cannot read the TFDS dataset info \("),
                        ('["bridge_dataset"]', "dataset_info.json: a JSON list; expected an object with 'name'"),
                        ('{"splits": [{"name": "train"}]}', "dataset_info.json: no 'name'"),
                        ('{"name": "x", "splits": {"train": 1}}', "dataset_info.json: 'splits' is .*expected a list")]:
        info.write_text(text)
        one_line_error(lambda: data.load(str(tmp_path)), match)


def test_features_json_of_another_schema_is_named(bridge_path, tmp_path):
    rlds = tmp_path / "bridge_dataset" / "1.0.0"
    rlds.mkdir(parents=True)
    for f in ("dataset_info.json", BRIDGE_TRAIN):
        (rlds / f).symlink_to(bridge_path / f)
    features = rlds / "features.json"
    fd = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
    for spec, match in [([1, 2], r"feature '\(root\)' does not follow the TFDS feature spec"),
                        ({"pythonClassName": fd, "featuresDict": {"features": {"steps": {
                            "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset"}}}},
                         r"feature 'steps' does not follow the TFDS feature spec \(KeyError: 'sequence'\)"),
                        ({"pythonClassName": fd, "featuresDict": {"features": {}}}, "no per-step features")]:
        features.write_text(json.dumps(spec))
        one_line_error(lambda: data.load(str(rlds)), rf"features.json: {match}")


def test_key_flags_of_the_wrong_kind_are_named(bridge_path):
    """--action_key naming an image (today: kilobytes of JPEG bytes in a numpy error) and --image_key
    naming numbers: one line naming the flag, what the key holds and the keys that would fit."""
    msg = one_line_error(lambda: data.load(str(bridge_path), keys={"image_key": "observation/image_0",
                                                                  "action_key": "observation/image_1"}),
                         r"--action_key observation/image_1: 'steps/observation/image_1' holds an encoded image; "
                         r"expected per-step numbers, such as: action, .*observation/state")
    assert "image_0" not in msg.split("such as:")[1]
    one_line_error(lambda: data.load(str(bridge_path), keys={"image_key": "observation/state", "action_key": "action"}),
                   r"--image_key observation/state: 'steps/observation/state' holds float32 numbers \[7\]; "
                   r"expected a per-step encoded image, such as: observation/image_0, observation/image_1")
    one_line_error(lambda: data.load(str(bridge_path), keys={"image_key": "observation/image_0", "action_key": "action",
                                                            "state_key": "observation/state+language_instruction"}),
                   r"--state_key language_instruction: 'steps/language_instruction' holds text")


def test_mixture_weights_must_be_finite(bridge_path):
    for w in ("nan", "inf", "-1"):
        one_line_error(lambda: data.parse_sources(f"a:{w},b:1"), rf"--data 'a:{w},b:1': weight '{w}' of a: expected a "
                                                                rf"finite number >= 0")
    src = window(bridge_path).sources[0]
    for w in ([float("nan"), 1.0], [float("inf"), 1.0]):
        one_line_error(lambda: data.Mixture([src, src], weights=w),
                       r"mixture weights \[(nan|inf), 1.0\]: expected 2 finite")


# CALVIN: a copy of the fixture's first frames with one annotation window over them

def mini_calvin(calvin_path, root, frames=5, ann=None):
    src, dst = Path(calvin_path) / "training", Path(root) / "training"
    (dst / "lang_annotations").mkdir(parents=True)
    start = int(np.load(src / "ep_start_end_ids.npy")[0, 0])
    for i in range(start, start + frames):
        shutil.copy(src / f"episode_{i:07d}.npz", dst)
    np.save(dst / "ep_start_end_ids.npy", np.array([[start, start + frames - 1]]))
    if ann is None:
        emb = np.ones((1, 1, 384), np.float32)
        ann = {"language": {"ann": ["open the drawer"], "task": ["open_drawer"], "emb": emb},
               "info": {"episodes": [], "indx": [(np.int64(start), np.int64(start + frames - 1))]}}
    np.save(dst / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    return dst, start


class RunsCode:
    """Unpickling this calls os.system: what a crafted auto_lang_ann.npy can do to np.load(allow_pickle=True)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_calvin_annotations_are_unpickled_without_running_code(calvin_path, tmp_path):
    marker = tmp_path / "code_ran"
    folder, start = mini_calvin(calvin_path, tmp_path / "calvin", ann={
        "language": {"ann": [RunsCode(marker)], "emb": np.ones((1, 1, 384), np.float32)},
        "info": {"indx": [(0, 1)]}})
    refused = r"auto_lang_ann.npy: refused to unpickle (posix|os|nt)\.system: only dicts, lists, strings"
    one_line_error(lambda: data.load(str(tmp_path / "calvin")), refused)
    with pytest.raises(SystemExit, match=refused) as exit_:  # python data.py PATH: one line, status 2
        data.main([str(tmp_path / "calvin")])
    assert exit_.value.code == 2 and not marker.exists()
    np.load(folder / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True)  # what the reader did before
    assert marker.exists()


def test_calvin_annotations_written_by_numpy_1_still_read(calvin_path, tmp_path):
    """CALVIN's files were written by numpy 1.x, whose pickles name numpy.core.multiarray (numpy 2: _core)."""
    folder, start = mini_calvin(calvin_path, tmp_path / "calvin")
    f = folder / "lang_annotations" / "auto_lang_ann.npy"
    obj = np.load(f, allow_pickle=True)
    body = pickle.dumps(obj, protocol=3)  # GLOBAL opcodes: "module\nname\n", no length prefixes to fix
    assert b"numpy._core.multiarray" in body
    with open(f, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "|O", "fortran_order": False, "shape": ()})
        out.write(body.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ann = data.load_pickled_npy(f)
    assert ann["language"]["ann"] == ["open the drawer"] and ann["info"]["indx"] == [(start, start + 4)]
    ds = data.load(str(tmp_path / "calvin"), image_size=16)
    assert ds.instructions == ["open the drawer"] and len(ds) == 5


def test_malformed_calvin_annotations_are_named(calvin_path, tmp_path):
    emb = np.ones((1, 1, 384), np.float32)
    for i, (ann, match) in enumerate([
            ({"language": {"ann": ["a"], "emb": emb}}, r"malformed annotation file \(KeyError: 'info'\)"),
            ({"language": {"ann": ["a", "b"], "emb": emb}, "info": {"indx": [(0, 1)]}},
             r"malformed annotation file \(ValueError: len\(info.indx\) = 1, len\(language.ann\) = 2"),
            ({"language": {"ann": ["a"], "emb": emb}, "info": {"indx": [(5, 1)]}},
             r"malformed annotation file \(ValueError: window \(5, 1\) ends before it starts"),
            ({"language": {"ann": ["a"], "emb": emb}, "info": "indx"}, r"malformed annotation file \(TypeError"),
            (["not", "a", "dict"], r"cannot read the pickled .npy \(ValueError: a <U4 array of shape \(3,\), not a")]):
        mini_calvin(calvin_path, tmp_path / str(i), ann=ann)
        one_line_error(lambda: data.load(str(tmp_path / str(i))), rf"auto_lang_ann.npy: {match}")
    folder, _ = mini_calvin(calvin_path, tmp_path / "garbage")
    (folder / "lang_annotations" / "auto_lang_ann.npy").write_bytes(b"not an npy file")
    one_line_error(lambda: data.load(str(tmp_path / "garbage")), r"auto_lang_ann.npy: cannot read the pickled .npy")


def test_calvin_truncated_or_corrupt_frame_is_named(calvin_path, tmp_path):
    folder, start = mini_calvin(calvin_path, tmp_path / "cut")
    cut = folder / f"episode_{start + 1:07d}.npz"
    cut.write_bytes(cut.read_bytes()[:5000])
    one_line_error(lambda: data.load(str(tmp_path / "cut")),
                   rf"{cut.name}: cannot read rel_actions/robot_obs \(BadZipFile")
    # at training time: zip checks the CRC-32 of every array it reads, so a damaged frame is named, never decoded
    folder, start = mini_calvin(calvin_path, tmp_path / "flip")
    src = data.load(str(tmp_path / "flip"), image_size=16).sources[0]
    frame = folder / f"episode_{start + 2:07d}.npz"
    with zipfile.ZipFile(frame) as z:
        info = z.getinfo("rgb_static.npy")
    flip(frame, info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2)
    one_line_error(lambda: src.image("primary", 2), rf"{frame.name}: cannot read rgb_static \(")
    assert src.image("primary", 1).shape == (3, 200, 200)


def test_calvin_nan_state_is_named(calvin_path, tmp_path):
    folder, start = mini_calvin(calvin_path, tmp_path / "calvin")
    frame = folder / f"episode_{start + 3:07d}.npz"
    arrays = dict(np.load(frame))
    arrays["robot_obs"][4] = np.nan
    np.savez_compressed(frame, **arrays)
    one_line_error(lambda: data.load(str(tmp_path / "calvin")),
                   rf"{frame.name}: robot_obs is not finite \(dim 4\); expected finite numbers")


# --- the decoded-frame cache (issue 16) ---------------------------------------------------------------

CACHED = dict(history=3, chunk=2, views=("primary", "secondary"), goal_last=4, future=2, image_size=(24, 40))


def batches(ds, n, start=0, workers=0, batch=8):
    dl = data.loader(ds, batch, seed=5, start=start, num_workers=workers)
    return [b for _, b in zip(range(n), dl)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


def test_frame_cache_gives_the_jpeg_paths_batches_with_workers_and_on_resume(bridge_path, capsys):
    """The same samples in the same order, bit for bit, read from the cache as decoded from the JPEGs; with
    DataLoader workers (each opens the memmap itself); and resumed mid-stream at a batch boundary."""
    off = window(bridge_path, cache_frames="off", **CACHED)
    on = window(bridge_path, cache_frames="on", **CACHED)
    assert off.frame_caches == {} and set(on.frame_caches) == {(0, "primary"), (0, "secondary")}
    assert "decoded-frame cache on (on: 2 camera(s), 450 frames at 24x40" in capsys.readouterr().out
    reference = batches(off, 6)
    assert_same_batches(batches(on, 6), reference)
    assert_same_batches(batches(on, 6, workers=2), reference)
    assert_same_batches(batches(on, 2, start=4 * 8), reference[4:])  # resume at step 4
    on.sources[0].image = None  # the cached path never decodes a JPEG
    batches(on, 2)


def test_frame_cache_is_keyed_by_size_and_resize(bridge_path):
    a = window(bridge_path, cache_frames="on", image_size=24)
    b = window(bridge_path, cache_frames="on", image_size=28)
    c = window(bridge_path, cache_frames="on", image_size=24, interpolation="bicubic")
    paths = {a.frame_caches[0, "primary"], b.frame_caches[0, "primary"], c.frame_caches[0, "primary"]}
    assert len(paths) == 3 and all(p.exists() for p in paths)
    for ds in (a, b, c):
        assert torch.equal(ds[(0, 17, 0)]["image_primary"], reference_frames(ds, ds.sources[0], "primary", [17]))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no sidecar", "other shape"])
def test_a_damaged_frame_cache_is_detected_and_rebuilt(bridge_path, damage, capsys):
    path = window(bridge_path, cache_frames="on", image_size=20).frame_caches[0, "primary"]
    good = path.read_bytes()
    capsys.readouterr()
    if damage == "truncated":  # e.g. a full disk: the rename never happens, but a copied cache might be cut
        path.write_bytes(good[:-1000])
    elif damage == "flipped byte":  # no size change: only the CRC-32C in the sidecar sees it
        flip(path, len(good) - 500)
    elif damage == "no sidecar":  # a build interrupted between the two renames
        path.with_suffix(".json").unlink()
    else:
        np.save(path, np.zeros((3, 3, 20, 20), np.uint8))
    ds = window(bridge_path, cache_frames="on", image_size=20)
    assert "225 primary frames of bridge_dataset at 20x20 (bilinear)" in capsys.readouterr().out  # rebuilt
    assert path.read_bytes() == good
    assert torch.equal(ds[(0, 9, 0)]["image_primary"], reference_frames(ds, ds.sources[0], "primary", [9]))


def test_auto_builds_the_cache_when_it_fits_the_budget(bridge_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "FRAME_CACHE_BUDGET", 225 * 3 * 16 * 16 - 1)  # one byte short
    assert data.load(str(bridge_path), image_size=16).frame_caches == {}  # auto is load's default
    assert "decoded-frame cache off (auto: 1 camera(s), 225 frames at 16x16" in capsys.readouterr().out
    monkeypatch.setattr(data, "FRAME_CACHE_BUDGET", 225 * 3 * 16 * 16)
    assert data.load(str(bridge_path), image_size=16).frame_caches
    assert "<= FRAME_CACHE_BUDGET" in capsys.readouterr().out
    one_line_error(lambda: window(bridge_path, cache_frames="yes"), r"cache_frames='yes': expected one of")


@pytest.mark.parametrize("method", ["rt1", "gcbc", "hpt", "gr1"])
def test_every_method_passes_cache_frames_to_data_load(method, bridge_path, monkeypatch):
    """(hpt: without --resnet_weights its ResNet trains, so it reads frames; mcr has no such flag: it crops frames
    at their native size.)"""
    import importlib

    class Loaded(Exception):
        pass

    def load(spec, *args, **window):
        raise Loaded(window)
    module = importlib.import_module(method)
    monkeypatch.setattr(data, "load", load)
    monkeypatch.setattr("sys.argv", [f"{method}.py", "--data", str(bridge_path), "--cache_frames", "on"])
    with pytest.raises(Loaded) as loaded:
        module.main()
    assert loaded.value.args[0]["cache_frames"] == "on"

"""data.py on the real Bridge sample and on fixtures written in DROID's, fractal's, kuka's, language_table's,
taco_play's and CALVIN's exact layouts (tests/fixtures.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from tests import fixtures


def window(path, **kw):
    return data.load(str(path), image_size=kw.pop("image_size", 32), **kw)


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
    np.testing.assert_allclose(s.state[:steps], np.concatenate([ref[0]["steps/observation/cartesian_position"],
                                                               ref[0]["steps/observation/gripper_position"]], 1), rtol=1e-6)
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
                   if torch.equal(x["goal_image_primary"], ds._frames(src, "primary", np.array([src.start[e] + g]))[0])]
        assert matches, (i, e, t)


def test_future_frames_are_offset_and_clamped(droid_path):
    ds = window(droid_path, history=2, future=3)
    steps = episode_of(ds, 0)
    x = ds[(0, steps[-2], 0)]
    assert x["future_pad"].tolist() == [True, True]
    assert torch.equal(x["future_image_primary"][1], ds._frames(ds.sources[0], "primary", np.array([steps[-1]]))[0])
    y = ds[(0, steps[1], 0)]
    assert y["future_pad"].tolist() == [False, False]
    assert torch.equal(y["future_image_primary"][0], ds._frames(ds.sources[0], "primary", np.array([steps[3]]))[0])


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

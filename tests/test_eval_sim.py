"""eval_sim.py on real MetaWorld with real offscreen rendering (CPU, Mesa EGL): actions, seeds, errors,
expert and random policies, a checkpoint-rebuilt policy, and a tiny RLDS collection read back with TFDS."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

import eval_sim
import train
from eval_sim import EvalError


# --- fast checks, no simulation ----------------------------------------------------------------------

def test_action_conversion_round_trip():
    native = np.random.default_rng(0).uniform(-1, 1, (1000, 4)).astype(np.float32)
    standard = eval_sim.to_standard_action(native)
    assert standard.shape == (1000, 7) and standard.dtype == np.float32
    assert (standard[:, 3:6] == 0).all() and (standard[:, 6] >= 0).all() and (standard[:, 6] <= 1).all()
    np.testing.assert_allclose(eval_sim.to_env_action(standard), native, atol=1e-6)
    # grab effort +1 closes the gripper: standard gripper 0 = closed, 1 = open
    np.testing.assert_array_equal(eval_sim.to_standard_action([0.5, 0.25, -1, 1.0]), [0.5, 0.25, -1, 0, 0, 0, 0])
    np.testing.assert_array_equal(eval_sim.to_standard_action([0, 0, 0, -1.0])[6], 1.0)
    # the env action is clipped to MetaWorld's box; rotations are dropped
    np.testing.assert_array_equal(eval_sim.to_env_action([2, -3, 0.5, 9, 9, 9, -1]), [1, -1, 0.5, 1])


def test_demonstration_and_evaluation_seeds_never_overlap():
    episodes = (eval_sim.EVAL_SEED - eval_sim.DEMO_SEED) // eval_sim.DEMO_TRIES  # the most collect accepts
    last_demo = max(eval_sim.demo_seed(k, a, episodes) for k in (0, episodes - 1) for a in range(eval_sim.DEMO_TRIES))
    assert last_demo < min(eval_sim.eval_seeds(1000)) == eval_sim.EVAL_SEED
    with pytest.raises(EvalError, match="--episodes"):
        eval_sim.collect("reach-v3", episodes + 1, "unused")
    with pytest.raises(EvalError, match="--seed_offset"):
        eval_sim.eval_seeds(10, seed_offset=-1)


def test_one_distinct_instruction_per_task():
    assert set(eval_sim.INSTRUCTIONS) == set(eval_sim.SUITES["mt50"]) and len(eval_sim.SUITES["mt50"]) == 50
    assert len(set(eval_sim.INSTRUCTIONS.values())) == 50
    assert len(eval_sim.parse_tasks("mt10")) == 10
    assert eval_sim.parse_tasks(" reach-v3, push-v3 ") == ["reach-v3", "push-v3"]


def test_unknown_task_lists_valid_names(capsys):
    with pytest.raises(EvalError) as e:
        eval_sim.parse_tasks("reach-v3,fly-v3")
    assert "fly-v3" in str(e.value) and "window-close-v3" in str(e.value) and "mt10" in str(e.value)
    with pytest.raises(SystemExit, match=r"eval_sim.py: --tasks 'fly-v3': unknown task\(s\) \['fly-v3'\]"):
        eval_sim.main(["evaluate", "--policy", "random", "--tasks", "fly-v3"])


def test_bad_numbers_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="eval_sim.py: --size 4: expected"):
        eval_sim.main(["collect", "--tasks", "reach-v3", "--size", "4", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="eval_sim.py: --episodes 0: expected"):
        eval_sim.main(["evaluate", "--policy", "expert", "--tasks", "reach-v3", "--episodes", "0"])
    for command in ("collect", "evaluate --policy random"):
        with pytest.raises(SystemExit, match=r"eval_sim.py: --workers -1: expected at least 1 process") as e:
            eval_sim.main([*command.split(), "--tasks", "reach-v3", "--workers", "-1", "--out", str(tmp_path / "x")])
        assert e.value.code == 2  # as argparse exits on a bad flag
    assert capsys.readouterr().err.count("\n") == 4  # one line each
    assert not (tmp_path / "x").exists()


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    torch.save({"method": "rt1", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path in (garbage, truncated):
        with pytest.raises(EvalError, match=f"--ckpt {path}: not a readable checkpoint \\(\\w+Error: "):
            eval_sim.load_policy(str(path))
    with pytest.raises(SystemExit, match="eval_sim.py: --ckpt .*missing.pt: no such checkpoint"):
        eval_sim.main(["evaluate", "--ckpt", str(tmp_path / "missing.pt")])
    not_ours = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_ours)
    with pytest.raises(EvalError, match=r"not a nanorobot checkpoint \(a Tensor, not a dict\)"):
        eval_sim.load_policy(str(not_ours))


STATS = [{"name": "metaworld"}]  # what a method's from_checkpoint reads of it is the method's business


def test_checkpoint_of_unknown_method_is_one_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"method": "no_such_method", "config": {}, "model": {}, "stats": STATS, "step": 3}, path)
    with pytest.raises(SystemExit, match=f"eval_sim.py: --ckpt {path}: method 'no_such_method' is unknown"):
        eval_sim.main(["evaluate", "--ckpt", str(path)])
    torch.save({"method": "../evil", "config": {}, "model": {}, "stats": STATS, "step": 3}, path)
    with pytest.raises(EvalError, match=r"method '../evil' is not a module name"):
        eval_sim.load_policy(str(path))


def test_checkpoint_that_does_not_fit_its_method_is_one_line_naming_it(tmp_path):
    import gcbc
    import rt1
    from dataclasses import asdict, replace
    path, small = tmp_path / "ckpt.pt", gcbc.Config(image_size=32, stage_sizes=(1, 1, 1, 1), width=8)
    ckpt = {"method": "gcbc", "config": asdict(small), "model": gcbc.GCBC(small).state_dict(), "step": 3,
            "stats": STATS}

    def error(**changes):
        torch.save(ckpt | changes, path)
        with pytest.raises(EvalError) as e:
            eval_sim.load_policy(str(path))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"--ckpt {path}: ")
        return str(e.value)[len(f"--ckpt {path}: "):]

    # config and weights disagree (the config says width 16, the weights are width 8)
    assert re.fullmatch(r"its weights do not fit the model its config builds \(encoder\.\S+ is \[8, .*\] in the "
                        r"checkpoint, \[16, .*\] in the model; .*; \d+ more shapes differ\)",
                        error(config=asdict(replace(small, width=16))))
    assert error(model={}).startswith("its weights do not fit the model its config builds (the checkpoint lacks ")
    assert error(config=asdict(small) | {"depth": 3}).startswith(
        "its config does not fit gcbc.Policy.from_checkpoint (Config.__init__() got an unexpected keyword argument")
    rt1_config = {k: v for k, v in asdict(rt1.Config()).items() if k != "bins"}
    assert error(method="rt1", config=rt1_config | {"vocabulary": ["a"]}) == (
        "lacks the key 'bins' that rt1.Policy.from_checkpoint reads (written by another version of rt1.py?)")
    assert error(stats=[]) == ("not a nanorobot checkpoint (stats is [], not a list of one dict per data source); "
                               "expected a dict with method (a string), config (a dict), model (a state_dict), stats "
                               "(a dict per data source) and step (an int)")
    assert error(method="mcr", config={"stage": "pretrain"}).startswith(
        "mcr.Policy.from_checkpoint: this is an MCR pre-training checkpoint (an encoder, not a policy)")
    assert error(config=argparse.Namespace(a=1)).startswith(  # refused, and torch's paragraph is not cut in two
        "refused by torch.load(weights_only=True), which admits tensors and plain data only (Unsupported global: "
        "GLOBAL argparse.Namespace was not an allowed global by default); a nanorobot checkpoint holds nothing else")


def test_bad_actions_are_rejected_naming_the_method():
    good = np.zeros((3, 7), np.float32)
    assert eval_sim.check_actions(good, 3, "rt1") is good
    for bad, got in [(np.zeros((3, 4)), r"shape \(3, 4\)"), (np.zeros(7), r"shape \(7,\)"),
                     (np.full((3, 7), np.nan), r"shape \(3, 7\)"), (torch.zeros(3, 7), "Tensor"),
                     ([[0.0] * 7] * 3, "list")]:
        with pytest.raises(EvalError, match=rf"policy 'rt1': act\(\) returned .*{got}.*expected .*\(3, 7\)"):
            eval_sim.check_actions(bad, 3, "rt1")


def test_wilson_interval_matches_the_closed_form_and_stays_in_bounds():
    # Wilson (1927), 95%, z = 1.96: 13/30 -> 27.4-60.8%
    # (by hand: (p + z²/2n -+ z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n))
    np.testing.assert_allclose(eval_sim.wilson(13, 30), [0.27377, 0.60803], atol=1e-5)
    low, high = eval_sim.wilson(0, 200)
    assert low == 0.0 and 0.018 < high < 0.019  # not empty at 0 successes: the "rule of three" is 1.5%
    assert eval_sim.wilson(200, 200)[1] == 1.0 and eval_sim.wilson(0, 0) == [0.0, 1.0]
    # rounding put 0/40's lower bound at -1e-17 (printed "-0.0%") and n/n's upper at 1 - 2e-16: exact now
    assert all(eval_sim.wilson(0, n)[0] == 0.0 and eval_sim.wilson(n, n)[1] == 1.0 for n in range(1, 500))


# --- simulation: worker processes, MuJoCo physics and EGL rendering --------------------------------------

def test_expert_succeeds_through_the_standard_action_path(tmp_path):
    # ~6 s: two worker processes start (~2 s), then 2 tasks x 3 rendered episodes of ~45-65 steps
    out = tmp_path / "eval"
    results = eval_sim.evaluate(eval_sim.ExpertPolicy(), "reach-v3,button-press-topdown-v3", 3, out_dir=str(out),
                                method="expert", size=64)
    assert results["success"] == {"reach-v3": 1.0, "button-press-topdown-v3": 1.0} and results["mean"] == 1.0
    assert results["seeds"] == [eval_sim.EVAL_SEED, eval_sim.EVAL_SEED + 2]
    assert (results["successes"], results["total"]) == (6, 6) and results["interval"][1] == 1.0
    assert json.loads((out / "results.json").read_text())["success"] == results["success"]
    assert results["videos"] == {"reach-v3": "reach-v3.mp4", "button-press-topdown-v3": "button-press-topdown-v3.mp4"}
    frames = decoded(out / "reach-v3.mp4")
    assert len(frames) > 5 and frames[0].shape == (64, 64, 3)
    assert all(border(f) == "green" for f in frames)  # the success border, on every frame


def decoded(path):
    """The frames of an mp4 as PyAV decodes them: uint8 (H, W, 3) each; its codec must be H.264 in yuv420p."""
    import av
    with av.open(str(path)) as video:
        codec = video.streams.video[0].codec_context
        assert (codec.name, codec.pix_fmt) == ("h264", "yuv420p")
        return [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]


def border(frame):
    """'green' or 'red': the colour of a frame's border (its left edge, mid-height), within H.264's rounding."""
    r, g, b = frame[frame.shape[0] // 2, 0].astype(int)
    colour = "green" if g > 170 and r < 40 and b < 40 else "red" if r > 200 and g < 40 and b < 40 else None
    assert colour, f"the border is {(r, g, b)}, neither green (0, 200, 0) nor red (230, 0, 0)"
    return colour


def test_video_of_odd_size_is_padded_to_even_and_keeps_its_border(tmp_path):
    frames = [np.full((33, 31, 3), 128, np.uint8)] * 3  # H.264 in yuv420p needs an even width and height
    eval_sim.save_video(frames, False, str(tmp_path / "odd.mp4"))
    out = decoded(tmp_path / "odd.mp4")
    assert len(out) == 3 and out[0].shape == (34, 32, 3) and border(out[-1]) == "red"
    assert abs(int(out[0][17, 16, 0]) - 128) < 6  # the inside is the frame's own grey


def test_without_an_h264_encoder_videos_are_gifs_and_it_is_said_once(tmp_path, monkeypatch, capsys):
    # ~4 s: the expert on two tasks, one episode each; "import av" fails, as where PyAV is not installed
    monkeypatch.setitem(sys.modules, "av", None)
    results = eval_sim.evaluate(eval_sim.ExpertPolicy(), "reach-v3,drawer-close-v3", 1, out_dir=str(tmp_path),
                                method="expert", size=32, workers=1)
    assert results["videos"] == {"reach-v3": "reach-v3.gif", "drawer-close-v3": "drawer-close-v3.gif"}
    assert capsys.readouterr().out.count("rollout videos are GIFs, not mp4: no H.264 encoder (ModuleNotFoundError") == 1
    from PIL import Image
    gif = Image.open(tmp_path / "reach-v3.gif")
    assert gif.size == (32, 32) and gif.n_frames > 5
    gif.seek(gif.n_frames - 1)
    assert gif.convert("RGB").getpixel((0, 16)) == (0, 200, 0)  # the green success border, exact in a GIF


def test_random_policy_scores_zero():
    # ~8-13 s: random actions never succeed, so both episodes run MetaWorld's full 500 rendered steps
    results = eval_sim.evaluate(eval_sim.RandomPolicy(), "pick-place-v3", 2, method="random", size=64)
    assert results["success"] == {"pick-place-v3": 0.0} and results["mean"] == 0.0


TINY_METHOD = '''
import numpy as np

class Policy:
    """A method file's Policy in miniature: it records what it is given and answers in the wrong shape."""
    wants_goal_image = True
    seen = []

    @classmethod
    def from_checkpoint(cls, ckpt, device):
        policy = cls()
        policy.ckpt, policy.device = ckpt, device
        return policy

    def reset(self, num_envs):
        self.num_envs = num_envs

    def act(self, obs, instructions):
        Policy.seen.append((obs, instructions))
        return np.zeros((self.num_envs, 4), np.float32)  # MetaWorld's 4-d action instead of the standard 7-d one
'''


def test_checkpoint_policy_gets_the_batched_observation_and_a_wrong_shape_names_it(tmp_path, monkeypatch):
    # ~2 s: worker start, the expert's rollout for each goal image, then the first step fails as it should
    (tmp_path / "tiny_method.py").write_text(textwrap.dedent(TINY_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "ckpt.pt"
    torch.save({"method": "tiny_method", "config": {"a": 1}, "model": {}, "stats": STATS, "step": 7}, path)
    policy, method = eval_sim.load_policy(str(path))
    assert method == "tiny_method" and policy.ckpt["step"] == 7 and policy.device == "cpu"
    with pytest.raises(EvalError, match=r"policy 'tiny_method': act\(\) returned an array of shape \(2, 4\)"):
        eval_sim.evaluate(policy, "drawer-open-v3", 2, method=method, size=64)
    (obs, instructions), = policy.seen
    assert instructions == ["pull the drawer open"] * 2
    assert set(obs) == {"image_primary", "image_wrist", "state", "goal_image_primary"}
    for key in ("image_primary", "image_wrist", "goal_image_primary"):
        assert obs[key].shape == (2, 3, 64, 64) and obs[key].dtype == np.uint8 and obs[key].std() > 10, key
    assert obs["state"].shape == (2, 4) and obs["state"].dtype == np.float32
    assert not np.array_equal(obs["goal_image_primary"], obs["image_primary"])  # the drawer is open in the goal
    assert not np.array_equal(obs["goal_image_primary"][0], obs["goal_image_primary"][1])  # two variations


class GoalRecorder:
    """Stands still for a few steps and records the goal images it is shown."""
    wants_goal_image = True

    def reset(self, num_envs):
        self.goals = []

    def act(self, obs, instructions):
        self.goals.append(obs["goal_image_primary"].copy())
        if len(self.goals) == 5:
            raise StopIteration  # enough steps seen
        return np.tile(np.array([0, 0, 0, 0, 0, 0, 1], np.float32), (len(instructions), 1))


def test_goal_image_stays_the_same_through_the_episode():
    # ~2 s: the expert's rollout for each goal, then 5 steps; the goal must reach every step, not only the first
    policy = GoalRecorder()
    with pytest.raises(StopIteration):
        eval_sim.evaluate(policy, "drawer-open-v3", 2, method="goal_recorder", size=64, video=False)
    assert len(policy.goals) == 5
    assert all(np.array_equal(g, policy.goals[0]) for g in policy.goals)


def test_environment_worker_that_fails_or_dies_names_the_task_and_seed(capfd):
    # ~3 s: two worker processes start and reset one environment each; then one is killed, the other fails
    pool = eval_sim.Workers(2, 64)
    try:
        pool.reset("reach-v3", [11, 12], goal=False)
        still = np.zeros(7, np.float32)
        os.kill(pool.procs[1].pid, signal.SIGKILL)  # as the kernel's OOM killer would
        with pytest.raises(EvalError, match=r"^the environment worker for reach-v3 \(episodes with seeds \[12\]\) "
                                            r"died \(killed by SIGKILL; out of memory"):
            pool.step({0: still, 1: still})
        with pytest.raises(EvalError, match=r"^the environment worker failed on reach-v3, seed 11: ValueError: "
                                            r".*\(its traceback is printed above\)$"):
            pool.step({0: "not an action"})  # worker 0 answered the step before: it is still in step
        assert "Traceback" in capfd.readouterr().err  # the worker's own, on its stderr
    finally:
        pool.close()


# --- collect: a tiny RLDS dataset, read back with TFDS -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rlds(tmp_path_factory):
    # ~6-9 s: worker start, TensorFlow import, 2 rendered expert episodes of ~45 steps, TFDS writing
    out = tmp_path_factory.mktemp("metaworld") / "reach"
    eval_sim.main(["collect", "--tasks", "reach-v3", "--episodes", "2", "--size", "64", "--out", str(out)])
    return out


def test_collect_writes_rlds_that_tfds_reads(tiny_rlds):
    import torchvision  # noqa: F401, before TensorFlow
    import tensorflow_datasets as tfds
    assert sorted(os.listdir(tiny_rlds)) == ["1.0.0"]  # the temporary folder is gone
    assert {"dataset_info.json", "features.json"} <= set(os.listdir(tiny_rlds / "1.0.0"))
    builder = tfds.builder_from_directory(str(tiny_rlds / "1.0.0"))
    assert builder.info.name == "metaworld" and str(builder.info.version) == "1.0.0"
    steps, obs = builder.info.features["steps"], builder.info.features["steps"]["observation"]
    for cam in ("image", "wrist_image"):
        assert obs[cam].shape == (64, 64, 3) and obs[cam].dtype == np.uint8 and obs[cam].encoding_format == "jpeg"
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert steps["action"].shape == (4,) and steps["action"].dtype == np.float32
    for key, dtype in [("reward", np.float32), ("discount", np.float32), ("is_first", np.bool_),
                       ("is_last", np.bool_), ("is_terminal", np.bool_), ("language_instruction", np.str_)]:
        assert steps[key].shape == () and steps[key].dtype == dtype, key
    meta = builder.info.features["episode_metadata"]
    assert meta["task"].dtype == np.str_ and meta["seed"].dtype == np.int64

    episodes = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(episodes) == 2
    assert sorted(int(e["episode_metadata"]["seed"]) for e in episodes) == [0, 1]  # demo seeds, not eval seeds
    for e in episodes:
        assert e["episode_metadata"]["task"] == b"reach-v3"
        s = list(e["steps"])
        T = len(s)
        assert 10 < T < eval_sim.MAX_STEPS
        assert [x["is_first"] for x in s] == [True] + [False] * (T - 1)
        assert [x["is_last"] for x in s] == [x["is_terminal"] for x in s] == [False] * (T - 1) + [True]
        assert all(x["language_instruction"] == b"reach the goal position" for x in s)
        actions = np.stack([x["action"] for x in s])
        states = np.stack([x["observation"]["state"] for x in s])
        assert np.abs(actions).max() <= 1 and states.dtype == np.float32
        assert np.abs(np.diff(states[:, :3], axis=0)).max() > 1e-3  # the hand moves
        for x in (s[0], s[-1]):
            assert x["observation"]["image"].std() > 10 and x["observation"]["wrist_image"].std() > 10

    raw = builder.as_dataset(split="train", decoders={"steps": {"observation": {"image": tfds.decode.SkipDecoding()}}})
    jpeg = next(iter(next(iter(raw))["steps"]))["observation"]["image"].numpy()
    assert jpeg[:2] == b"\xff\xd8"  # stored as JPEG bytes


def test_default_data_reuses_a_finished_collection(tiny_rlds, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_rlds, root / "reach-v3_2")
    (root / "reach-v3_2" / ".incomplete-abc").mkdir()  # an interrupted run's leftovers do not matter
    path = eval_sim.default_data("reach-v3", 2, root=str(root))
    assert path == str(root / "reach-v3_2" / "1.0.0")
    assert "collecting" not in capsys.readouterr().out
    with pytest.raises(EvalError, match="already exists"):
        eval_sim.collect("reach-v3", 2, str(root / "reach-v3_2"))


# --- what a policy is given: only its declared cameras, bf16 where it trained in bf16 ------------------------

class ViewRecorder(eval_sim.RandomPolicy):
    views = ("image_wrist",)

    def __init__(self):
        super().__init__()
        self.keys = set()

    def act(self, obs, instructions):
        self.keys |= {frozenset(obs)}
        return super().act(obs, instructions)


def test_a_policy_receives_only_the_views_it_declares(tmp_path):
    # ~4 s: one worker, 500 steps drawing the wrist camera only (+ the primary one every 4th step for the video)
    policy = ViewRecorder()
    eval_sim.evaluate(policy, "reach-v3", 1, out_dir=str(tmp_path), method="recorder", size=32, workers=1)
    assert policy.keys == {frozenset({"image_wrist", "state"})}
    frames = decoded(tmp_path / "reach-v3.mp4")
    assert len(frames) == eval_sim.MAX_STEPS // eval_sim.VIDEO_EVERY + 1 and frames[0].shape == (32, 32, 3)
    assert all(border(f) == "red" for f in frames)  # the failure border, on every frame
    pool = eval_sim.Workers(1, 32)
    try:  # the built-in policies read no image: nothing is drawn
        obs = pool.reset("reach-v3", [11], goal=False, cameras=lambda i: eval_sim.policy_views(eval_sim.RandomPolicy()))
        assert set(obs[0]) == {"success", "state", "expert_action"}
        assert set(pool.step({0: np.zeros(7)}, cameras=lambda i: ("wrist",))[0]) == {"success", "state", "wrist",
                                                                                     "expert_action"}
    finally:
        pool.close()


def test_bf16_trained_policy_acts_in_bf16_and_returns_float32_actions():
    import gcbc
    if not train.bf16_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX)")
    torch.manual_seed(0)
    stats = [{"name": "metaworld", "action": {"mean": [0.1] * 6 + [0.5], "std": [2.0] * 6 + [0.5]}}]
    policy = gcbc.Policy(gcbc.GCBC(gcbc.Config(image_size=32, width=8, stage_sizes=(1, 1, 1, 1), mlp_dims=(16, 16))),
                         stats)
    rng = np.random.default_rng(0)
    obs = {k: rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8) for k in ("image_primary", "goal_image_primary")}
    fp32 = policy.act(obs, ["x"] * 3)
    assert np.array_equal(eval_sim.act(policy, obs, ["x"] * 3), fp32)  # no amp_dtype (older checkpoints): fp32
    policy.amp_dtype = "bf16"
    bf16 = eval_sim.act(policy, obs, ["x"] * 3)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # bf16 ran
    np.testing.assert_allclose(bf16[:, :6], fp32[:, :6], atol=0.1)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=rf"^eval_sim.py: --ckpt {tmp_path}/none.pt: no such checkpoint$"):
        eval_sim.main(["export", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "export")])
    with pytest.raises(SystemExit, match=rf"^eval_sim.py: --ckpt {tmp_path}: no config.json there; expected an "):
        eval_sim.main(["evaluate", "--ckpt", str(tmp_path)])  # a folder that is not an export
    assert not (tmp_path / "export").exists()


def pixel_table(tasks, size):
    """`python eval_sim.py pixels` in its own process (a MuJoCo renderer made in the pytest process, after the tests
    before it, can crash EGL) -> {(task, camera): {object: pixels}}, and the header line."""
    done = subprocess.run([sys.executable, "eval_sim.py", "pixels", "--tasks", tasks, "--size", str(size),
                           "--episodes", "1"], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, check=True)
    header, *lines = done.stdout.splitlines()
    rows = [line.split(None, 2) for line in lines]  # task, camera, "name pixels  name pixels ..."
    return header, {(task, camera): {name: float(n) for name, n in (item.rsplit(" ", 1) for item in rest.split("  "))}
                    for task, camera, rest in rows}


def test_object_pixels_count_the_task_objects_only_and_scale_with_image_area():
    # ~10 s: segmentation renders of one variation of two tasks at two sizes, in two processes
    header, large = pixel_table("push-v3,door-open-v3", 128)
    _, small = pixel_table("door-open-v3", 64)
    assert "128 x 128 image (16,384)" in header
    assert set(large) == {(t, c) for t in ("push-v3", "door-open-v3") for c in eval_sim.SIM_CAMERAS}
    push, door = large["push-v3", "image"], large["door-open-v3", "image"]["door"]
    assert set(push) == {"obj", "goal marker"}  # no robot, no table
    assert 10 < push["obj"] < 60 and push["goal marker"] > 0  # a few of the 16,384 pixels
    assert door > 20 * push["obj"] and 3.3 < door / small["door-open-v3", "image"]["door"] < 4.7  # a quarter at half

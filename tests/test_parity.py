"""Train/deploy parity (issue 17), one test per method.

Forward: a real MetaWorld demonstration (collected by eval_sim into RLDS) is cut into training windows with
data.py exactly as the method's main() asks for them, and the method's Policy is stepped through the same
episode's frames handed over as eval_sim hands them (eval_sim.batch: uint8 (N, 3, H, W) at the collected size,
the state as stored, the instruction string, the goal image). At every step the action the Policy returns must
equal the model's prediction on that step's training window, un-normalised as the Policy does, to fp32
tolerance. The frames are the dataset's own (decoded JPEGs at native size) on both sides: what is checked is
everything between a frame and an action (resize, history, padding, chunking, statistics), not the renderer.

Reverse: a Policy trained to overfit one demonstration replays it in the simulator from its seed and succeeds.
"""
import numpy as np
import pytest
import torch
from dataclasses import asdict, replace

import data
import eval_sim

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread

SIZE = 64  # collected frames; every tiny config below trains at 32 px, so the Policy's resize path is exercised
ATOL = 1e-4


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two reach-v3 expert demonstrations (seeds 0 and 1) at 64 px: ~8 s, once for this file."""
    out = tmp_path_factory.mktemp("parity") / "reach"
    eval_sim.main(["collect", "--tasks", "reach-v3", "--episodes", "2", "--size", str(SIZE), "--out", str(out),
                   "--workers", "1"])
    return str(out / "1.0.0")


def windows(path, episode=0, **window):
    """The training windows of every step of one episode, as data.load builds them for main() (sample position
    0 for each), batched with the DataLoader's collate. Built with cache_frames "off" (the JPEG path) and "on"
    (the decoded-frame cache): both must give the same tensors."""
    out = []
    for mode in ("off", "on"):
        ds = data.load(path, cache_frames=mode, **window)
        src = ds.sources[0]
        steps = range(int(src.start[episode]), int(src.start[episode + 1]))
        out.append((ds, torch.utils.data.default_collate([ds[(0, i, 0)] for i in steps])))
    (ds, batch), (_, cached) = out
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert torch.equal(v, cached[k]), f"cache_frames on vs off: {k} differs"
    return ds, batch


def sim_observations(src, episode=0):
    """What eval_sim's workers reply for each step of the episode (the reset's "goal" stays in the dict, as in
    run_task): HWC uint8 frames under the SIM_CAMERAS keys at native size, the 4-d state as stored, and as the
    goal the episode's last stored frame (see test_gcbc_parity for how eval's goal differs from it)."""
    hwc = lambda view, i: src.image(view, i).permute(1, 2, 0).numpy()
    first, end = int(src.start[episode]), int(src.start[episode + 1])
    goal = hwc("primary", end - 1)
    return [{"image": hwc("primary", i), "wrist": hwc("wrist", i), "state": np.asarray(src.state[i], np.float32),
             "goal": goal} for i in range(first, end)]


def rollout(policy, steps, instruction):
    """reset, then act on every step's observation as eval_sim.run_task does -> (T, 7) actions."""
    policy.reset(1)
    return np.concatenate([eval_sim.check_actions(eval_sim.act(policy, eval_sim.batch([o], policy), [instruction]),
                                                  1, "parity") for o in steps])


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected).float(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Forward parity

def test_rt1_parity(demos):
    import rt1
    from tests.test_rt1 import TINY, tiny
    # main: data.load(path, split, keys, calvin_all_frames, history=cfg.history, image_size=cfg.image_size)
    ds, batch = windows(demos, history=TINY.history, image_size=TINY.image_size)
    model = tiny(TINY, ds.instructions).eval()  # BatchNorm statistics of one batch (eval mode: token reuse holds)
    tokenizer = rt1.ActionTokenizer(ds.stats, TINY.bins)
    with torch.no_grad():
        logits = model(batch["image_primary"], batch["instruction"])[:, -1]  # (L, A, bins) at the window's last step
    expected = tokenizer.decode(logits.argmax(-1), batch["dataset_id"])[:, :7]
    policy = rt1.Policy(model, tokenizer, rt1.metaworld_source(ds.stats))
    actions = rollout(policy, sim_observations(ds.sources[0]), batch["instruction"][0])
    close(actions, expected)


def test_gcbc_parity(demos):
    import gcbc
    from tests.test_gcbc import TINY
    # main: goal_last=8 (goal relabelling: uniform among the episode's last 8 frames, an augmentation) and
    # interpolation="bicubic". Eval has one goal, the expert's final frame, so the comparable training window is
    # goal_last=1: the episode's last stored frame. Designed difference: eval_sim's goal is rendered after the
    # expert's successful step, one step later than the last frame the RLDS episode stores (collect keeps the
    # observation before each action); here the Policy is given the stored frame, the same pixels.
    cfg = gcbc.Config(**TINY, augment=False)
    ds, batch = windows(demos, image_size=cfg.image_size, goal_last=1, seed=0, interpolation="bicubic")
    torch.manual_seed(0)
    model = gcbc.GCBC(cfg).eval()
    norm = gcbc.ActionNorm(ds.stats)
    with torch.no_grad():
        mu = model(batch["image_primary"][:, -1], batch["goal_image_primary"])  # as loss() calls it
    expected = norm.decode(mu, batch["dataset_id"])
    actions = rollout(gcbc.Policy(model, ds.stats), sim_observations(ds.sources[0]), batch["instruction"][0])
    close(actions, expected)


def test_hpt_parity(demos):
    import hpt
    from tests.test_hpt import TINY
    # main: history, chunk, image_size, views=cfg.views, missing_views="zeros", seed; the stems of one embodiment
    # per source (embodiments_of). The Policy executes the first action of every chunk: chunk[:, 0].
    ds, batch = windows(demos, history=TINY.history, chunk=TINY.chunk, image_size=TINY.image_size, views=TINY.views,
                        missing_views="zeros", seed=0)
    torch.manual_seed(0)
    model = hpt.HPT(TINY, hpt.embodiments_of(ds, TINY.views)).eval()
    norm = {"state": hpt.Limits(ds.stats, "state", ds.state_dim),
            "action": hpt.Limits(ds.stats, "action", model.action_dim)}
    ids = batch["dataset_id"]
    with torch.no_grad():  # as loss() calls the model
        images = torch.stack([batch[f"image_{v}"] for v in TINY.views], 2)  # (L, T, V, 3, H, W)
        chunk = model(images, norm["state"].normalize(batch["state"], ids), batch["obs_pad"], ids)  # (L, K, A)
    expected = norm["action"].unnormalize(chunk[:, 0].float(), ids)[:, :7]
    policy = hpt.Policy(model, ds.stats, hpt.metaworld_source(ds.stats))
    actions = rollout(policy, sim_observations(ds.sources[0]), batch["instruction"][0])
    close(actions[:, :expected.shape[1]], expected)
    assert (actions[:, expected.shape[1]:] == 0).all()


def gr1_model(ds, cfg):
    import gr1
    torch.manual_seed(0)
    return gr1.GR1(cfg, ds.instructions, None).eval()  # main: a learned embedding per instruction (no CLIP)


def gr1_windows(demos, cfg, interpolation="bicubic_float"):
    # main: history, chunk=cfg.chunk_size, image_size, views=("primary", "wrist"), future=cfg.future, seed,
    # interpolation="bicubic_float" (GR1-Training's resize; Policy._image resizes so)
    return windows(demos, history=cfg.history, chunk=cfg.chunk_size, image_size=cfg.image_size,
                   views=("primary", "wrist"), future=cfg.future, seed=0, interpolation=interpolation)


def gr1_predict(model, batch, inputs):
    """The arm and gripper chunk at each window's newest valid step, as loss() computes them (left-aligned)."""
    import gr1
    valid, b = gr1.left_align(batch)
    arm, gripper = inputs.state(b["state"], b["dataset_id"])
    with torch.no_grad():
        pred_arm, pred_gripper, _, _ = model(b["image_primary"], b["image_wrist"], arm, gripper, b["instruction"],
                                             valid)
    last = valid.sum(1) - 1  # (L,) the window's step t after left alignment
    rows = torch.arange(len(last))
    return pred_arm[rows, last], pred_gripper[rows, last]  # (L, K, 6), (L, K)


def test_gr1_parity(demos):
    import gr1
    from tests.test_gr1 import TINY
    cfg = replace(TINY, test_chunk_size=1)  # the default: predict at every step, execute the chunk's first action
    ds, batch = gr1_windows(demos, cfg)
    model, inputs = gr1_model(ds, cfg), gr1.Inputs(ds.stats)
    # The tiny random GR-1 barely reads its frames (a resize or channel-order change moves its arm by less than
    # ATOL), so parity on it would miss a preprocessing difference: 100 Adam steps on this episode make the
    # frames matter (measured: bilinear for bicubic moves the arm by ~0.016, RGB -> BGR by ~0.19).
    overfit(model, lambda m, b: gr1.loss(m, b, inputs, cfg), batch, 100)
    arm, gripper = gr1_predict(model, batch, inputs)
    bilinear = gr1_windows(demos, cfg, interpolation="bilinear")[1]
    bgr = {**batch, "image_primary": batch["image_primary"].flip(-3), "image_wrist": batch["image_wrist"].flip(-3)}
    for name, other, margin in (("bilinear resize", bilinear, 10), ("BGR frames", bgr, 100)):
        moved = (gr1_predict(model, other, inputs)[0] - arm).abs().max()
        assert moved > margin * ATOL, f"{name} moves the arm by {moved:.2g} only: parity could not see it"
    ids = batch["dataset_id"]
    expected = torch.cat([inputs.arm_action(arm[:, 0].float(), ids), (gripper[:, :1].float() > 0).float()], -1)
    actions = rollout(gr1.Policy(model, ds.stats), sim_observations(ds.sources[0]), batch["instruction"][0])
    close(actions, expected)


def test_gr1_chunk_execution(demos):
    """test_chunk_size = k > 1: the Policy predicts at steps 0, k, 2k, ... and executes k actions of each chunk;
    the frames in between never enter its window (official evaluation), so only the first prediction has a
    training window (the episode's first, one valid step): its k actions are the first k the Policy executes."""
    import gr1
    from tests.test_gr1 import TINY
    cfg = replace(TINY, test_chunk_size=TINY.chunk_size)
    k = cfg.test_chunk_size
    ds, batch = gr1_windows(demos, cfg)
    model, inputs = gr1_model(ds, cfg), gr1.Inputs(ds.stats)
    arm, gripper = gr1_predict(model, batch, inputs)
    ids = batch["dataset_id"][:1]
    expected = torch.cat([inputs.arm_action(arm[0, :k, None].float(), ids)[:, 0],
                          (gripper[0, :k, None].float() > 0).float()], -1)  # (k, 7)
    actions = rollout(gr1.Policy(model, ds.stats), sim_observations(ds.sources[0]), batch["instruction"][0])
    close(actions[:k], expected)


def test_mcr_parity(demos, tmp_path):
    import mcr
    from tests.test_mcr import TINY
    # mcr's policy is the downstream BC MLP on the frozen encoder: downstream() computes each demonstration
    # frame's features from data.Source.image (native size, resized by BCPolicy.features) with its state; no
    # data.load windows (one frame, no history).
    cfg = mcr.Config(**TINY)
    dcfg = mcr.Downstream(tasks="reach-v3", demos=2, bc_hidden=(16,), bc_steps=2, bc_batch=4, eval_episodes=0)
    torch.manual_seed(0)
    model, _ = mcr.downstream(mcr.resnet(18), "random", demos, cfg, dcfg, str(tmp_path), log=lambda *a: None)
    model = model.eval()
    src = data.Source(data.prepare(demos))
    steps = np.arange(int(src.start[0]), int(src.start[1]))
    with torch.no_grad():
        features = model.features(torch.stack([src.image("primary", int(i)) for i in steps]))  # as downstream()
        state = torch.from_numpy(src.state[steps].copy())
        expected = model.head(features, state) * model.action_std + model.action_mean
    policy = eval_sim.load_policy(str(tmp_path / "ckpt.pt"))[0]  # the checkpoint, as eval_sim loads it
    actions = rollout(policy, sim_observations(src), src.instructions[src.instruction[0]])
    close(actions, expected)


# ---------------------------------------------------------------------------------------------------
# Reverse: overfit one demonstration, replay it in the simulator from its seed

class _Bar:  # run_task's progress bar
    def update(self, n):
        pass


@pytest.fixture(scope="module")
def one_demo(tmp_path_factory):
    """One reach-v3 expert demonstration at 64 px and the seed it was collected from."""
    out = tmp_path_factory.mktemp("parity") / "one"
    eval_sim.main(["collect", "--tasks", "reach-v3", "--episodes", "1", "--size", str(SIZE), "--out", str(out),
                   "--workers", "1"])
    path, seed = str(out / "1.0.0"), eval_sim.demo_seed(0, 0, 1)  # the first try (the expert succeeds on ~99%)
    env = eval_sim.make_env("reach-v3")  # no renderer in the test process: the expert's first action from the seed
    env.seed(seed)
    state, _ = env.reset()
    first = eval_sim.to_standard_action(np.clip(eval_sim.ENV_POLICY_MAP["reach-v3"]().get_action(state), -1, 1))
    env.close()
    src = data.Source(data.prepare(path))
    assert np.allclose(src.action[0][:7], first, atol=1e-5), f"demonstration 0 was not collected from seed {seed}"
    return path, seed


def replay(policy, seed):
    """One evaluation episode of reach-v3 from `seed` through eval_sim.run_task -> success."""
    workers = eval_sim.Workers(1, SIZE)
    try:
        success, _ = eval_sim.run_task(workers, policy, "reach-v3", [seed], "parity", _Bar(), video=False)
    finally:
        workers.close()
    return bool(success[0])


def test_mcr_overfit_demo_replays(one_demo, tmp_path):
    # ~15 s: 500 Adam steps of the BC MLP on one demonstration's frozen features (z-scored action MSE ~1e-4),
    # then one closed-loop episode from the demonstration's seed, on rendered (not JPEG) frames.
    import mcr
    from tests.test_mcr import TINY
    path, seed = one_demo
    dcfg = mcr.Downstream(tasks="reach-v3", demos=1, bc_hidden=(256, 256), bc_steps=500, bc_batch=32, bc_lr=1e-3,
                          eval_episodes=0)
    torch.manual_seed(0)
    mcr.downstream(mcr.resnet(18), "random", path, mcr.Config(**TINY), dcfg, str(tmp_path), log=lambda *a: None)
    policy = eval_sim.load_policy(str(tmp_path / "ckpt.pt"))[0]
    assert replay(policy, seed)


def overfit(model, loss_fn, batch, steps, lr=1e-3):
    """Full-batch Adam on one demonstration's training windows; -> the last loss (the model is left in eval mode)."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = loss_fn(model, batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def test_rt1_overfit_demo_replays(one_demo):
    # ~30 s: 300 full-batch steps of the tiny RT-1 on the demonstration's windows, then one episode from its seed
    import rt1
    from tests.test_rt1 import TINY
    path, seed = one_demo
    ds, batch = windows(path, history=TINY.history, image_size=TINY.image_size)
    torch.manual_seed(0)
    model, tokenizer = rt1.RT1(TINY, ds.instructions), rt1.ActionTokenizer(ds.stats, TINY.bins)
    overfit(model, lambda m, b: rt1.loss(m, b, tokenizer), batch, 300)
    assert replay(rt1.Policy(model, tokenizer, rt1.metaworld_source(ds.stats)), seed)


def test_gcbc_overfit_demo_replays(one_demo):
    # ~10 s: 300 full-batch steps of the tiny GC-BC (goal: the demonstration's last frame, as eval's expert goal)
    import gcbc
    from tests.test_gcbc import TINY
    path, seed = one_demo
    cfg = gcbc.Config(**TINY, augment=False)
    ds, batch = windows(path, image_size=cfg.image_size, goal_last=1, seed=0, interpolation="bicubic")
    torch.manual_seed(0)
    model = gcbc.GCBC(cfg)
    overfit(model, lambda m, b: gcbc.loss(m, b, gcbc.ActionNorm(ds.stats)), batch, 300)
    assert replay(gcbc.Policy(model, ds.stats), seed)


def test_hpt_overfit_demo_replays(one_demo):
    # ~30 s: 300 full-batch steps of the tiny HPT: one camera, one frame, the ResNet-18 frozen (it was the cost)
    import hpt
    from tests.test_hpt import TINY
    path, seed = one_demo
    cfg = replace(TINY, history=1, views=("primary",), finetune_encoder=False)
    ds, batch = windows(path, history=cfg.history, chunk=cfg.chunk, image_size=cfg.image_size, views=cfg.views,
                        missing_views="zeros", seed=0)
    torch.manual_seed(0)
    model = hpt.HPT(cfg, hpt.embodiments_of(ds, cfg.views))
    norm = {"state": hpt.Limits(ds.stats, "state", ds.state_dim),
            "action": hpt.Limits(ds.stats, "action", model.action_dim)}
    overfit(model, lambda m, b: hpt.loss(m, b, norm, cfg, [model.action_dim]), batch, 300)
    assert replay(hpt.Policy(model, ds.stats, hpt.metaworld_source(ds.stats)), seed)


def test_gr1_overfit_demo_replays(one_demo):
    # ~20 s: 300 full-batch steps of the tiny GR-1 on the demonstration's windows
    import gr1
    from tests.test_gr1 import TINY
    path, seed = one_demo
    cfg = replace(TINY, test_chunk_size=1)
    ds, batch = gr1_windows(path, cfg)
    model, inputs = gr1_model(ds, cfg), gr1.Inputs(ds.stats)
    overfit(model, lambda m, b: gr1.loss(m, b, inputs, cfg), batch, 300)
    assert replay(gr1.Policy(model, ds.stats), seed)

"""mcr.py: the official parameter counts and checkpoint layouts, each loss on hand-made cases, the frame
sampling and dynamics chunks on the DROID fixture with the official keys, a falling loss, and a downstream
checkpoint that eval_sim loads and runs. Tiny ResNet-18 configurations on small images except where the
test is about ResNet-50 itself (built, never trained)."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import data
import mcr

TINY = dict(size=18, image_size=32)


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_configuration_has_the_official_parameter_counts_and_names():
    model = mcr.MCR(mcr.Config())  # ResNet-50, DROID chunk 3 x 14 + 2 x 7 = 56; built, never run
    assert mcr.Config().chunk_dim == 56
    assert count(model.convnet) == 23_508_032
    assert (count(model.state_encoder), count(model.bc_trunk), count(model.bc_policy)) == (2_157_568, 102_550, 292_359)
    assert count(model) == 26_060_509
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("convnet.")}
    assert shapes == {"state_encoder.0.weight": (1024, 56), "state_encoder.0.bias": (1024,),
                      "state_encoder.2.weight": (2048, 1024), "state_encoder.2.bias": (2048,),
                      "bc_trunk.0.weight": (50, 2048), "bc_trunk.0.bias": (50,), "bc_trunk.1.weight": (50,),
                      "bc_trunk.1.bias": (50,), "bc_policy.0.weight": (512, 50), "bc_policy.0.bias": (512,),
                      "bc_policy.2.weight": (512, 512), "bc_policy.2.bias": (512,), "bc_policy.4.weight": (7, 512),
                      "bc_policy.4.bias": (7,)}
    small = mcr.MCR(mcr.Config(size=18))
    assert (count(small.convnet), count(small.state_encoder)) == (11_176_512, 583_168)
    assert not hasattr(mcr.MCR(mcr.Config(**TINY, align_weight=0, bc_weight=0)), "state_encoder")  # plain TCN


# ---------------------------------------------------------------------------------------------------
# the losses, on cases computed by hand

def test_similarity_is_negative_euclidean_distance():
    assert mcr.similarity(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])).item() == -5.0


def test_contrastive_matches_the_official_formula_and_saturates_at_minus_log_eps():
    p, n = torch.tensor([-1.0]), torch.tensor([[-2.0, 0.0]])
    expected = -math.log(1e-8 + math.exp(-1) / (1e-8 + math.exp(-1) + math.exp(-2) + 1))
    assert mcr.contrastive(p, n).item() == pytest.approx(expected, rel=1e-6)
    # far apart (every similarity << log eps): the official epsilons cap the loss at -log(1e-8) = 18.42
    assert mcr.contrastive(torch.tensor([-60.0]), torch.tensor([[-70.0]])).item() == pytest.approx(-math.log(1e-8))


def test_time_contrastive_loss_by_hand():
    # one sample on a line: e0 = 0, e1 = 1, e2 = 2. With a batch of 1 every shuffled negative is the sample
    # itself (similarity 0), as torch.randperm gives it in the official code.
    e0, e1, e2 = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]])
    loss, aligned = mcr.tcn_loss(e0, e1, e2, negatives=3)
    one = -math.log(1e-8 + math.exp(-1) / (1e-8 + math.exp(-1) + math.exp(-2) + 3 * math.exp(0)))
    assert loss.item() == pytest.approx(one, rel=1e-6) and aligned.item() == 1.0
    _, wrong = mcr.tcn_loss(e1, e0, e2, negatives=3)  # the middle frame is not in the middle
    assert wrong.item() == 0.0


def official_tcn(e0, e1, e2, perms0, perms2):
    """The official Trainer.update's time-contrastive loss with the given shuffles, written out."""
    sim = lambda a, b: -torch.linalg.norm(a - b, dim=-1)
    neg0 = torch.stack([sim(e0, e0[p]) for p in perms0], -1)
    neg2 = torch.stack([sim(e2, e2[p]) for p in perms2], -1)
    sim_0_2, sim_1_2, sim_0_1 = sim(e2, e0), sim(e2, e1), sim(e1, e0)
    loss1 = -torch.log(1e-8 + sim_1_2.exp() / (1e-8 + sim_0_2.exp() + sim_1_2.exp() + neg2.exp().sum(-1)))
    loss2 = -torch.log(1e-8 + sim_0_1.exp() / (1e-8 + sim_0_1.exp() + sim_0_2.exp() + neg0.exp().sum(-1)))
    return ((loss1 + loss2) / 2).mean()


def test_time_contrastive_negatives_are_drawn_in_the_official_order():
    g = torch.Generator().manual_seed(0)
    e0, e1, e2 = (0.3 * torch.randn(8, 4, generator=g) for _ in range(3))  # close: the negatives count
    torch.manual_seed(5)
    loss, _ = mcr.tcn_loss(e0, e1, e2, negatives=3)
    # the official loop: for each negative, torch.randperm for es0, then torch.randperm for es2
    torch.manual_seed(5)
    perms0, perms2 = [], []
    for _ in range(3):
        perms0.append(torch.randperm(8))
        perms2.append(torch.randperm(8))
    assert loss.item() == pytest.approx(official_tcn(e0, e1, e2, perms0, perms2).item(), rel=1e-6)
    # the order this file used before: the three shuffles of e0, then the three of e2 (another loss)
    torch.manual_seed(5)
    perms = [torch.randperm(8) for _ in range(6)]
    assert abs(loss.item() - official_tcn(e0, e1, e2, perms[:3], perms[3:]).item()) > 1e-3


def test_alignment_loss_minimum_at_perfect_alignment_and_a_case_by_hand():
    e0, e2 = torch.zeros(4, 8), torch.full((4, 8), 10.0)  # the two steps 10 * sqrt(8) apart
    best, acc = mcr.alignment_loss(e0, e2, z0=e0.clone(), z2=e2.clone())
    assert best.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0
    worst, acc = mcr.alignment_loss(e0, e2, z0=e2.clone(), z2=e0.clone())  # chunks swapped
    assert worst.item() == pytest.approx(-math.log(1e-8), rel=1e-3) and acc.item() == 0.0
    # by hand: e0 = 0, z0 = 1 (distance 1), z2 = 3 (distance 3); e2 = 3 -> z2 distance 0, z0 distance 2
    loss, _ = mcr.alignment_loss(torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.tensor([[1.0]]),
                                 torch.tensor([[3.0]]))
    a = -math.log(1e-8 + math.exp(-1) / (1e-8 + math.exp(-1) + math.exp(-3)))
    b = -math.log(1e-8 + 1 / (1e-8 + 1 + math.exp(-2)))
    assert loss.item() == pytest.approx((a + b) / 2, rel=1e-6)


def fake_batch(b=3, size=32, chunk=26, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (b, 5, 3, size, size), dtype=torch.uint8, generator=g),
            "chunks": torch.randn(b, 2, chunk, generator=g), "actions": torch.randn(b, 5, 7, generator=g)}


def test_action_loss_is_the_mse_over_all_five_frames_and_weights_add_up():
    torch.manual_seed(0)
    cfg = mcr.Config(**TINY, state_dim=4)
    model = mcr.MCR(cfg).eval()  # eval: BatchNorm statistics do not change between the calls
    batch = fake_batch()
    bc_only, metrics = mcr.loss(model, batch, mcr.Config(**TINY, state_dim=4, tcn_weight=0, align_weight=0))
    pred = model.bc_policy(model.bc_trunk(model.convnet(mcr.preprocess(batch["images"].flatten(0, 1)))))
    assert bc_only.item() == pytest.approx(((pred - batch["actions"].flatten(0, 1)) ** 2).mean().item(), rel=1e-5)
    assert set(metrics) == {"bc"}
    torch.manual_seed(1)
    total, m = mcr.loss(model, batch, cfg)
    assert set(m) == {"tcn", "tcn_acc", "align", "align_acc", "bc"}
    assert total.item() == pytest.approx((m["tcn"] + m["align"] + m["bc"]).item(), rel=1e-5)


def test_preprocess_is_imagenet_normalisation_of_0_255_inputs():
    x = torch.tensor([[[[0]], [[255]], [[124]]]], dtype=torch.uint8)  # (1, 3, 1, 1)
    out = mcr.preprocess(x).flatten()
    expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225]
    assert out.tolist() == pytest.approx(expected, rel=1e-5)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = mcr.Config(size=18, image_size=16, state_dim=4)
    model = mcr.MCR(cfg)
    batch = fake_batch(b=2, size=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    first = mcr.loss(model, batch, cfg)[0].item()
    for step in range(6):
        torch.manual_seed(step)  # the shuffled negatives
        opt.zero_grad()
        mcr.loss(model, batch, cfg)[0].backward()
        opt.step()
    torch.manual_seed(0)
    last, metrics = mcr.loss(model, batch, cfg)
    assert last.item() < 0.8 * first, (first, last.item(), metrics)


# ---------------------------------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize("length", [3, 4, 10, 57])
def test_frame_ranges_follow_the_official_sampler(length):
    rng = np.random.default_rng(0)
    t = np.stack([mcr.sample_frames(length, 0.2, rng) for _ in range(3000)])  # (n, 5): start, end, s0, s1, s2
    start, end, s0, s1, s2 = t.T
    assert (t >= 1).all() and (t < length).all()  # frame 0 never
    assert set(start) == set(range(1, min(length, 2 + int(0.2 * length))))
    assert set(end) == set(range(int(0.8 * length) - 1, length))
    assert ((1 <= s0) & (s0 < s1) & (s1 <= s2)).all() and set(s1) == set(range(2, length))
    assert (s1 == s2).any()  # s2 may equal s1, as the official np.random.randint(s1, len)


def test_dynamics_chunk_layout_is_p_a_p_a_p():
    L = 9
    state = np.arange(L)[:, None] * 100 + np.arange(14)[None]  # (L, 14): p(t)[k] = 100 t + k
    action = -(np.arange(L)[:, None] * 100 + np.arange(7)[None])  # (L, 7): a(t)[k] = -(100 t + k)
    chunk = mcr.dynamics_chunk(state, action, 5, 3)
    assert chunk.shape == (56,)
    np.testing.assert_array_equal(chunk, np.concatenate([state[4], action[4], state[5], action[5], state[6]]))
    np.testing.assert_array_equal(mcr.dynamics_chunk(state, action, 1, 3)[:14], state[1])  # max(1, t - 1)
    end = mcr.dynamics_chunk(state, action, L - 1, 3)  # past the end: the last step repeats
    np.testing.assert_array_equal(end, np.concatenate([state[7], action[7], state[8], action[8], state[8]]))


@pytest.fixture(scope="module")
def droid(droid_path):
    """The DROID fixture read with MCR's official inputs, and the raw RLDS episodes to check them against."""
    keys = mcr.official_keys(droid_path, {})
    assert keys == mcr.DROID_KEYS
    src = data.Source(data.prepare(droid_path, keys=keys))
    return src, list(data.rlds_episodes(droid_path))


def test_droid_official_keys_give_cartesian_gripper_joints_and_the_raw_action(droid, droid_path):
    src, episodes = droid
    assert src.views == ["primary", "secondary"] and src.state.shape[1] == 14 and src.action.shape[1] == 7
    for e, ep in enumerate(episodes):
        rows = slice(int(src.start[e]), int(src.start[e + 1]))
        raw = np.concatenate([ep["observation/cartesian_position"], ep["observation/gripper_position"],
                              ep["observation/joint_position"]], 1)
        np.testing.assert_allclose(src.state[rows], raw.astype(np.float32))
        np.testing.assert_allclose(src.action[rows], ep["action"].astype(np.float32))
    standard = data.Source(data.prepare(droid_path))  # data.STANDARD's DROID: secondary = exterior_image_2_left
    assert torch.equal(src.image("secondary", 5), standard.image("secondary", 5))


def test_frames_on_droid_keep_time_order_one_view_and_the_official_chunks(droid):
    src, _ = droid
    mixture = data.Mixture([src], image_size=32, views=("primary", "secondary"))
    cfg = mcr.Config(**TINY, state_dim=14, action_dim=7)
    ds = mcr.Frames(mixture, cfg, seed=0)
    calls = []
    image = src.image
    src.image = lambda view, i: calls.append((view, i)) or image(view, i)  # a spy on the decoder
    try:
        views = set()
        for position in range(40):
            calls.clear()
            s = ds[(0, 0, position)]
            start, end, s0, s1, s2 = s["frames"].tolist()
            e = s["episode"]
            base, length = int(src.start[e]), int(src.start[e + 1] - src.start[e])
            assert 1 <= start < 2 + int(0.2 * length) and int(0.8 * length) - 1 <= end < length
            assert 1 <= s0 < s1 <= s2 < length
            view = cfg.views[s["view"]]
            views.add(view)
            assert calls == [(view, base + t) for t in (start, end, s0, s1, s2)]  # one camera, those frames
            assert s["images"].shape == (5, 3, 32, 32) and s["images"].dtype == torch.uint8
            np.testing.assert_array_equal(s["actions"].numpy(), src.action[base + s["frames"].numpy()])
            rows = slice(base, base + length)
            for k, t in enumerate((s0, s2)):
                expected = mcr.dynamics_chunk(src.state[rows], src.action[rows], t, 3)
                np.testing.assert_array_equal(s["chunks"][k].numpy(), expected)
        assert views == {"primary", "secondary"}
        again = ds[(0, 0, 7)]
        assert all(torch.equal(again[k], ds[(0, 0, 7)][k]) for k in ("images", "chunks", "frames"))  # exact resume
    finally:
        src.image = image


def test_crops_are_independent_per_frame_and_seeded():
    frame = torch.randint(0, 256, (1, 3, 40, 60), dtype=torch.uint8).expand(5, -1, -1, -1)
    a = mcr.random_resized_crops(frame, 24, (0.5, 1.0), seed=3)
    assert a.shape == (5, 3, 24, 24) and a.dtype == torch.uint8
    assert len({x.numpy().tobytes() for x in a}) == 5  # five draws, as the official code (see its doaug bug)
    assert torch.equal(a, mcr.random_resized_crops(frame, 24, (0.5, 1.0), seed=3))


# ---------------------------------------------------------------------------------------------------
# the encoder: export and the official layouts

def test_export_loads_into_plain_torchvision_resnet50_and_official_layouts_load(tmp_path, monkeypatch):
    import train
    torch.manual_seed(0)
    model = mcr.MCR(mcr.Config())  # ResNet-50 with the official heads (built; its encoder runs on 2 tiny images)
    train.save_checkpoint(tmp_path / "ckpt.pt", {"method": "mcr", "config": {"stage": "pretrain"},
                                                 "model": model.state_dict(), "stats": [], "step": 1})
    monkeypatch.setattr(sys, "argv", ["mcr.py", "--export", str(tmp_path / "encoder.pt"), "--ckpt",
                                      str(tmp_path / "ckpt.pt")])
    mcr.main()
    plain = torchvision.models.resnet50()
    plain.fc = nn.Identity()
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert len(state) == 318 and not any(k.startswith("fc.") for k in state)  # as ckpts/mcr_resnet50.pth
    plain.load_state_dict(state, strict=True)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.convnet.eval()(mcr.preprocess(x))
        assert torch.equal(plain.eval()(mcr.preprocess(x)), expected)
        # the official training snapshot: {"mcr": DataParallel state_dict (module.*), "global_step"}
        torch.save({"mcr": {f"module.{k}": v for k, v in model.state_dict().items()}, "global_step": 5},
                   tmp_path / "snapshot.pt")
        for name in ("encoder.pt", "snapshot.pt", "ckpt.pt"):
            assert torch.equal(mcr.load_encoder(tmp_path / name)(mcr.preprocess(x)), expected), name


def official_snapshot(model, path, step=None):
    """What the official Workspace.save_snapshot writes: {"mcr": DataParallel(model).state_dict()}, plus
    "global_step" in snapshot.pt (not in snapshot_<step>.pt)."""
    sdict = {"mcr": nn.DataParallel(model).state_dict()}  # keys module.convnet.…, as the official run
    assert all(k.startswith("module.") for k in sdict["mcr"])
    if step is not None:
        sdict["global_step"] = step
    torch.save(sdict, path)


def test_official_snapshot_loads_into_the_whole_model(tmp_path):
    # ~4 s: three snapshots written and loaded, ResNet-18 (the smallest depth MCR builds) in each
    torch.manual_seed(0)
    cfg = mcr.Config(size=18, image_size=32, hidden_dim=64)  # DROID's 56-d chunk, the official 7-d actor
    model = mcr.MCR(cfg).eval()
    official_snapshot(model, tmp_path / "snapshot.pt", step=40_000)
    official_snapshot(model, tmp_path / "snapshot_40000.pt")
    images, chunks = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.randn(2, 56)
    with torch.no_grad():
        expected = model(images, chunks)
    for name, step in (("snapshot.pt", 40_000), ("snapshot_40000.pt", None)):
        loaded, global_step = mcr.load_snapshot(tmp_path / name)  # default Config: depth and width from the file
        assert global_step == step and not loaded.training
        assert (loaded.cfg.size, loaded.cfg.hidden_dim) == (18, 64)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(loaded(images, chunks), expected))
    # the official default config (tcn only) has no state encoder and no actor: nor has the loaded model
    official_snapshot(mcr.MCR(mcr.Config(size=18, align_weight=0, bc_weight=0)), tmp_path / "tcn.pt", step=1)
    tcn, _ = mcr.load_snapshot(tmp_path / "tcn.pt")
    assert (tcn.cfg.align_weight, tcn.cfg.bc_weight) == (0, 0) and not hasattr(tcn, "state_encoder")
    with pytest.raises(ValueError, match="snapshot.pt: state_encoder.0.weight takes a 56-d dynamics chunk"):
        mcr.load_snapshot(tmp_path / "snapshot.pt", mcr.Config(state_dim=8))
    torch.save(model.convnet.state_dict(), tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match="encoder.pt: expected an official MCR training snapshot"):
        mcr.load_snapshot(tmp_path / "encoder.pt")


def test_resnet_depth_is_read_from_the_keys_and_bad_files_say_what_they_are(tmp_path):
    torch.save(mcr.resnet(18).state_dict(), tmp_path / "r18.pt")
    assert isinstance(mcr.load_encoder(tmp_path / "r18.pt").layer1[0], torchvision.models.resnet.BasicBlock)
    assert mcr.resnet_depth(mcr.resnet(34).state_dict()) == 34
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a torchvision ResNet"):
        mcr.load_encoder(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such encoder file"):
        mcr.load_encoder(tmp_path / "missing.pt")


def test_imagenet_baseline_without_weights_is_a_clear_error():
    with pytest.raises(SystemExit, match="--imagenet_weights"):
        mcr.make_encoder("imagenet")


def test_secondary_key_flag_maps_a_second_camera(droid_path):
    import argparse
    args = data.add_args(argparse.ArgumentParser()).parse_args(
        ["--image_key", "observation/exterior_image_1_left", "--secondary_key", "observation/wrist_image_left",
         "--action_key", "action"])
    keys = data.keys_from(args)
    assert keys["secondary_key"] == "observation/wrist_image_left"
    src = data.Source(data.prepare(droid_path, keys=keys))
    assert src.views == ["primary", "secondary"] and src.state.shape[1] == 0
    assert torch.equal(src.image("secondary", 3), data.Source(data.prepare(droid_path)).image("wrist", 3))


# ---------------------------------------------------------------------------------------------------
# downstream: the checkpoint round trip through eval_sim

def test_downstream_checkpoint_round_trips_through_eval_sim(tmp_path):
    # ~20 s: one expert demonstration collected (MetaWorld + TFDS writer) and one 500-step evaluation episode
    import eval_sim
    path = eval_sim.collect("reach-v3", 1, str(tmp_path / "mw"), size=64, workers=1)
    path = str(tmp_path / "mw" / "1.0.0")
    cfg = mcr.Config(**TINY)
    dcfg = mcr.Downstream(tasks="reach-v3", demos=1, bc_hidden=(16,), bc_steps=30, bc_batch=8, eval_episodes=0)
    torch.manual_seed(0)
    model, _ = mcr.downstream(mcr.resnet(18), "random", path, cfg, dcfg, str(tmp_path / "down"), log=lambda *a: None)
    policy, method = eval_sim.load_policy(str(tmp_path / "down" / "ckpt.pt"))
    assert method == "mcr" and not any(p.requires_grad for p in model.encoder.parameters())
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
           "state": rng.standard_normal((2, 4)).astype(np.float32)}
    policy.reset(2)
    action = eval_sim.check_actions(policy.act(obs, ["x"] * 2), 2, "mcr")
    with torch.no_grad():
        expected = model.eval()(torch.as_tensor(obs["image_primary"]), torch.as_tensor(obs["state"])).numpy()
    np.testing.assert_allclose(action, expected, atol=1e-5)
    results = eval_sim.evaluate(policy, "reach-v3", 1, method="mcr", size=64, workers=1, video=False)
    assert set(results["success"]) == {"reach-v3"}
    with pytest.raises(ValueError, match="pre-training checkpoint"):
        mcr.Policy.from_checkpoint({"config": {"stage": "pretrain"}})

"""gcbc.py: the reference's parameter count, the action conventions, goal relabelling, mixture weights,
the loss, and a short run on the real Bridge sample whose checkpoint eval_sim can load (CPU, tiny widths)."""
import math

import numpy as np
import pytest
import torch

import data
import eval_sim
import gcbc
import train

TINY = dict(image_size=32, width=8, stage_sizes=(1, 1, 1, 1), mlp_dims=(16, 16))


def stats(mean, std, name="metaworld"):
    return {"name": name, "action": {"mean": mean + [0.5], "std": std + [0.5]}}


def fake_batch(b=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    action = torch.randn(b, 1, 1, 7, generator=g)
    action[..., 6] = (torch.rand(b, 1, 1, generator=g) > 0.5).float()  # standard gripper: 1 open, 0 closed
    return {"image_primary": torch.randint(0, 256, (b, 1, 3, size, size), dtype=torch.uint8, generator=g),
            "goal_image_primary": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
            "action": action, "dataset_id": torch.zeros(b, dtype=torch.long)}


def test_shapes():
    model = gcbc.GCBC(gcbc.Config(**TINY))
    obs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert model.encoder.spatial_coordinates(torch.zeros(5, 6, 32, 32)).shape == (5, 8, 32, 32)
    assert model.encoder(obs, obs).shape == (5, 64)  # width 8 x 2^3 after global average pooling
    assert model(obs, obs).shape == (5, 7)
    grid = model.encoder.spatial_coordinates.grid  # channel 0: x (along the width), channel 1: y, both -1 -> 1
    assert torch.equal(grid[0, 0], torch.linspace(-1, 1, 32)) and torch.equal(grid[1, :, 0], torch.linspace(-1, 1, 32))


def test_parameter_count_equals_the_reference():
    model = gcbc.GCBC(gcbc.Config())  # built, never run
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == 21_565_063
    assert (count(model.encoder), count(model.mlp), count(model.action_mean_linear)) == (21_300_352, 262_912, 1_799)
    assert count(gcbc.GCBC(gcbc.Config(image_size=64))) == 21_565_063  # independent of the image size


def test_gripper_convention_and_threshold():
    norm = gcbc.ActionNorm([stats([1, 2, 3, 0, 0, 0], [2, 2, 2, 0, 1, 1])])
    standard = torch.tensor([[3.0, 2, 1, 5, 0, 0, 1.0],   # gripper open
                             [1.0, 2, 3, 0, 0, 0, 0.0]])  # gripper closed
    ref = norm.encode(standard, torch.tensor([0, 0]))
    assert ref[:, 6].tolist() == [-1.0, 1.0]  # the reference: -1 open, +1 closed
    assert ref[0, :6].tolist() == [1.0, 0.0, -1.0, 5.0, 0.0, 0.0]  # z-scored; std 0 -> 1
    assert torch.allclose(norm.decode(ref, torch.tensor([0, 0])), standard)
    pred = torch.zeros(4, 7)
    pred[:, 6] = torch.tensor([-0.7, -1e-4, 1e-4, 0.9])
    assert norm.decode(pred, torch.zeros(4, dtype=torch.long))[:, 6].tolist() == [1.0, 1.0, 0.0, 0.0]  # < 0: open


def test_loss_is_the_unit_variance_gaussian_nll_and_falls():
    torch.manual_seed(0)
    model = gcbc.GCBC(gcbc.Config(**TINY, dropout=0.0, augment=False))
    norm = gcbc.ActionNorm([stats([0.1] * 6, [0.5] * 6)])
    batch = fake_batch()
    nll, metrics = gcbc.loss(model, batch, norm)
    mu, target = model(batch["image_primary"][:, -1], batch["goal_image_primary"]), \
        norm.encode(batch["action"][:, -1, 0], batch["dataset_id"])
    reference = -torch.distributions.MultivariateNormal(mu, scale_tril=torch.eye(7)).log_prob(target).mean()
    assert torch.allclose(nll, reference, atol=1e-5)
    assert torch.allclose(gcbc.loss(lambda o, g: target, batch, norm)[0], torch.tensor(3.5 * math.log(2 * math.pi)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad()
        gcbc.loss(model, batch, norm)[0].backward()
        opt.step()
    assert gcbc.loss(model, batch, norm)[0] < 0.5 * nll


def test_augmentation_is_one_draw_per_sample_shared_by_observation_and_goal():
    cfg = gcbc.Config(**TINY)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(8, -1, -1, -1)
    obs, goal = gcbc.augment(image, image, cfg)
    assert obs.shape == goal.shape == (8, 3, 32, 32) and obs.dtype == torch.uint8
    assert torch.equal(obs, goal)  # the same crop and jitter for a sample's observation and goal
    assert len({o.numpy().tobytes() for o in obs}) == 8  # a new draw for every sample


def test_policy_resizes_as_the_training_frames_bicubic(bridge_path):
    policy = gcbc.Policy(gcbc.GCBC(gcbc.Config(**TINY)), [stats([0.0] * 6, [1.0] * 6)])
    frame = data.Source(data.prepare(str(bridge_path))).image("primary", 0)[None]  # uint8 (1, 3, 64, 64)
    for x in (frame, torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)):  # down- and upsampled to 32
        resized = policy._image(x.numpy())
        assert resized.dtype == torch.uint8 and torch.equal(resized, data.resize(x, 32, "bicubic"))
        assert not torch.equal(resized, data.resize(x, 32, "bilinear"))


def test_main_loads_the_training_frames_bicubic(bridge_path, monkeypatch):
    class Loaded(Exception):
        pass

    def load(spec, **window):
        raise Loaded(window)
    monkeypatch.setattr(data, "load", load)
    monkeypatch.setattr("sys.argv", ["gcbc.py", "--data", str(bridge_path)])
    with pytest.raises(Loaded) as loaded:
        gcbc.main()
    assert loaded.value.args[0]["interpolation"] == "bicubic"


def test_balance_weights_follow_the_reference_formula():
    steps, episodes = [1_000, 100_000], [10, 2_000]
    # small: r1 = max(1, int(100 - 0.5)) = 99, r2 = max(1, 3500 // 10) = 350 -> min((99 + 350) // 2, 10) = 10
    # large: r1 = max(1, int(1 - 0.5)) = 1, r2 = max(1, 3500 // 2000) = 1 -> 1
    assert gcbc.balance_weights(steps, episodes) == [10 * 1_000, 1 * 100_000]
    # below the cap: r1 = max(1, int(5 - 0.5)) = 4, r2 = max(1, 3500 // 5000) = 1 -> (4 + 1) // 2 = 2
    assert gcbc.balance_weights([20_000, 100_000], [5_000, 5_000]) == [2 * 20_000, 100_000]


def test_balance_weights_reach_the_sampler(bridge_path):
    spec = f"{bridge_path},{bridge_path}"
    natural = data.load(spec, image_size=32)
    w = gcbc.balance_weights([20_000, 100_000], [5_000, 5_000])
    assert data.load(spec, image_size=32, weights=w).weights == pytest.approx([40 / 140, 100 / 140])
    assert natural.weights == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("goal_last", [8, 1])
def test_goal_is_a_later_frame_of_the_same_episode(bridge_path, goal_last):
    ds = data.load(str(bridge_path), image_size=32, goal_last=goal_last)
    src = ds.sources[0]
    frames = ds._frames(0, {"all": ("primary", np.arange(len(src)))})["all"]  # every frame, (N, 3, 32, 32)
    for position, i in enumerate(range(0, len(src), 7)):
        sample = ds[(0, i, position)]
        e, t, length = src.locate(i)
        base = int(src.start[e])
        same = [j for j in range(len(src)) if torch.equal(frames[j], sample["goal_image_primary"])]
        allowed = range(base + max(t, length - goal_last), base + length)
        assert same and all(j in allowed for j in same), (i, same, allowed)


def test_a_few_steps_on_bridge_and_the_checkpoint_round_trips_through_eval_sim(bridge_path, tmp_path):
    cfg = gcbc.Config(**TINY)
    ds = data.load(str(bridge_path), image_size=cfg.image_size, goal_last=cfg.goal_last)
    norm = gcbc.ActionNorm(ds.stats)
    tcfg = train.TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=4, warmup=1, workers=0, log_every=1,
                             ckpt_every=3)
    torch.manual_seed(0)
    model = train.train(gcbc.GCBC(cfg), lambda m, b: gcbc.loss(m, b, norm), ds, tcfg, method="gcbc",
                        config=gcbc.asdict(cfg), log=lambda *a: None)
    policy, method = eval_sim.load_policy(str(tmp_path / "ckpt.pt"))
    assert method == "gcbc" and policy.wants_goal_image and policy.model.cfg == cfg
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (3, 3, 128, 128), dtype=np.uint8),
           "goal_image_primary": rng.integers(0, 256, (3, 3, 128, 128), dtype=np.uint8),
           "image_wrist": np.zeros((3, 3, 128, 128), np.uint8), "state": np.zeros((3, 4), np.float32)}
    policy.reset(3)
    action = eval_sim.check_actions(policy.act(obs, ["x"] * 3), 3, "gcbc")
    assert set(action[:, 6].tolist()) <= {0.0, 1.0}
    model.eval()
    with torch.no_grad():
        small = [policy._image(obs[k]) for k in ("image_primary", "goal_image_primary")]
        expected = norm.decode(model(*small), torch.zeros(3, dtype=torch.long)).numpy()
    assert np.allclose(action, expected, atol=1e-5)

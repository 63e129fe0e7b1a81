"""rt1.py on the CPU: parameter count of the paper configuration, shapes, FiLM identity at init, action
tokens, causality, the policy's history, a falling loss, a few steps on the Bridge sample, and a checkpoint
that eval_sim rebuilds. Everything but the parameter count runs a tiny configuration (same code paths,
torchvision's MBConv blocks)."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import rt1

BRIDGE = Path(__file__).resolve().parents[2] / "shared/data/oxe/bridge_dataset/1.0.0"
TINY = rt1.Config(image_size=32, history=3, width_mult=0.1, depth_mult=0.1, lang_dim=16, tokens_per_image=4,
                  d_model=32, layers=2, heads=2, head_dim=16, dropout=0.0, shift=(0.0, 0.0))
VOCAB = ["close the door", "open the door"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny(cfg=TINY, vocabulary=VOCAB, seed=0):
    """A tiny RT1 whose BatchNorm statistics are those of one batch of random frames: with the initial
    running statistics (mean 0, variance 1) the eval-mode activations of a fresh net shrink ~20x per stage."""
    torch.manual_seed(seed)
    model = rt1.RT1(cfg, vocabulary)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    with torch.no_grad():
        model.train()(frames(4, cfg.history, cfg.image_size, seed=99), [vocabulary[0]] * 4)
    return model


def frames(B, T, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=g)  # (B, T, 3, H, W)


def stats(low, high):
    return [{"name": "metaworld", "action": {"q01": low, "q99": high}}]


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def paper():
    """~2-5 s, once: the full 35M-parameter model (never run) with the official 11 action tokens (a 6 x 19 =
    114-token sequence); the initialisation tests measure its weights (millions of draws: stds to <1%)."""
    torch.manual_seed(0)
    return rt1.RT1(rt1.Config(action_dim=11))


def test_paper_configuration_has_the_official_parameter_count(paper):
    model = paper
    assert count(model.encoder) + count(model.token_learner) == 15_744_160  # official image tokenizer
    assert count(model.transformer) == 19_376_384  # official transformer
    # The official total 35,252,128 also counts _action_token_emb (Dense 256 -> 512 = 131,584), whose output
    # the official network replaces by zeros (it never gets a gradient); rt1.py leaves it out.
    assert count(model) + 131_584 == 35_252_128
    # torchvision's B3 trunk, key for key: an ImageNet state_dict (--imagenet_weights) loads as is
    reference = torchvision.models.efficientnet_b3().features.state_dict()
    ours = model.encoder.net.state_dict()
    assert list(ours) == list(reference) and all(ours[k].shape == reference[k].shape for k in ours)
    assert sum(p.numel() for p in model.encoder.net.parameters()) == 10_696_232
    assert len(model.encoder.films) == 26  # a FiLM after every MBConv block
    # the default (standard 7-d action) differs only in the position table: 6 x 15 positions instead of 114
    assert count(rt1.RT1(rt1.Config())) == count(model) - (114 - 90) * 512


def test_shapes():
    model = tiny().eval()
    images = frames(2, 3)
    with torch.no_grad():
        features = model.encoder(images[:, 0], torch.zeros(2, 16))
        tokens = model.tokenize(images, ["open the door"] * 2)
        logits = model(images, ["open the door", "close the door"])
    assert features.shape[:2] == (2, 32)  # (N, d_model, h, w)
    assert tokens.shape == (2, 3, 4, 32)  # (B, T, tokens per image, d_model)
    assert logits.shape == (2, 3, 7, 256)  # (B, T, action dims, bins)
    with pytest.raises(KeyError, match="not among the 2"):
        model(images, ["fly away"] * 2)


def test_film_is_the_identity_at_init():
    model = tiny().eval()
    images = frames(2, 1)[:, 0]
    with torch.no_grad():
        conditioned = model.encoder(images, torch.randn(2, 16) * 10)
        unconditioned = model.encoder(images, torch.zeros(2, 16))
    torch.testing.assert_close(conditioned, unconditioned, rtol=0, atol=0)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(rt1.FiLM(16, 8)(x, torch.randn(2, 16)), x)


def test_action_tokens_round_trip_within_one_bin():
    low, high = [-1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 2.0, 0.0, 0.0, 0.0, 1.0]  # dims 3-5 constant
    tokenizer = rt1.ActionTokenizer(stats(low, high))
    rng = np.random.default_rng(0)
    action = torch.tensor(rng.uniform(low, high, (1000, 7)), dtype=torch.float32)
    action[:, 6] = torch.tensor(rng.integers(0, 2, 1000), dtype=torch.float32)  # a binary gripper
    ids = torch.zeros(1000, dtype=torch.long)
    tokens = tokenizer.encode(action, ids)
    assert tokens.min() >= 0 and tokens.max() <= 255
    error = action - tokenizer.decode(tokens, ids)
    bin_width = (torch.tensor(high) - torch.tensor(low)) / 255
    # floor on encode, the bin's lower edge on decode (official): 0 <= error < one bin, bounds exact
    assert (error >= -1e-6).all() and (error < bin_width.clamp(min=1e-6) + 1e-6).all()
    assert (error[:, 3:] .abs() < 1e-6).all()  # constant dims and the 0/1 gripper come back exactly
    outside = torch.tensor([[5.0, -5, 9, 1, 1, 1, 3]])  # clipped to the [q01, q99] bounds
    np.testing.assert_allclose(tokenizer.decode(tokenizer.encode(outside, ids[:1]), ids[:1]),
                               [[1, -0.5, 2, 0, 0, 0, 1]], atol=1e-6)


def test_action_tokens_on_bin_edges_are_the_official_ones():
    # the official tokenizer in float32: clip, then int((a - min) / (max - min) * 255); decode: t / 255 * w + min
    low = np.array([-1, -0.5, 0, -0.37, -np.pi / 2, -0.02, 0], np.float32)
    high = np.array([1, 0.5, 2, 0.81, np.pi / 2, 0.03, 1], np.float32)
    k = np.arange(256, dtype=np.float32)[:, None]
    edges = k / np.float32(255) * (high - low) + low  # (256, 7) float32: every bin's lower edge, decoded
    official = ((np.clip(edges, low, high) - low) / (high - low) * np.float32(255)).astype(np.int32)
    assert (official != k).any()  # float32 puts some edges a hair below: the official token is then k - 1
    tokenizer = rt1.ActionTokenizer(stats(low.tolist(), high.tolist()))
    ids = torch.zeros(256, dtype=torch.long)
    np.testing.assert_array_equal(tokenizer.encode(torch.from_numpy(edges), ids).numpy(), official)
    np.testing.assert_array_equal(tokenizer.decode(torch.from_numpy(k).long().expand(-1, 7), ids).numpy(), edges)


def test_attention_starts_as_keras_multi_head_attention(paper):
    def keras_glorot_limit(shape):  # Keras 2 _compute_fans: the last two axes times the product of the others
        r = int(np.prod(shape[:-2]))
        return np.sqrt(6 / (shape[-2] * r + shape[-1] * r))

    qkv, out, ff = keras_glorot_limit((512, 8, 128)), keras_glorot_limit((8, 128, 512)), keras_glorot_limit((512, 512))
    assert round(qkv / np.sqrt(3), 4) == 0.0054 and round(out / np.sqrt(3), 4) == 0.0198  # 6.7x, 1.8x below 0.036
    for block in paper.transformer.blocks:
        for layer, limit in [(block.q, qkv), (block.k, qkv), (block.v, qkv), (block.out, out), (block.ff, ff)]:
            w = layer.weight.detach()
            assert abs(w.std().item() / (limit / np.sqrt(3)) - 1) < 0.01  # uniform(-limit, limit)
            assert limit * 0.999 < w.abs().max().item() <= limit
            assert not layer.bias.any()


def test_convolutions_start_as_keras_variance_scaling(paper):
    # the 1x1 conv after EfficientNet: VarianceScaling() = truncated normal, std sqrt(1 / fan_in) after the cut
    w = paper.encoder.conv1x1.weight.detach()  # (512, 1536, 1, 1)
    assert abs(w.std().item() * np.sqrt(1536) - 1) < 0.01
    assert w.abs().max().item() <= 2 * np.sqrt(1 / 1536) / 0.87962566103423978  # cut at 2 std of the normal
    # EfficientNet: VarianceScaling(2, fan_out); a depthwise (k, k, C, 1) Keras kernel has fan_out k*k
    depthwise = [m for m in paper.encoder.net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    big = [m for m in depthwise if m.weight.numel() > 20_000]
    assert big
    for m in big:
        k2 = m.kernel_size[0] * m.kernel_size[1]
        assert abs(m.weight.std().item() / np.sqrt(2 / k2) - 1) < 0.03, m


def test_batchnorm_is_keras_from_scratch_and_torchvision_with_its_imagenet_weights(tmp_path):
    def batchnorms(cfg):
        return [m for m in rt1.RT1(cfg, VOCAB).encoder.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in batchnorms(TINY))  # Keras: eps 1e-3, momentum 0.99
    torchvision_bn = replace(TINY, torchvision_bn=True)  # what rt1.main sets with --imagenet_weights
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in batchnorms(torchvision_bn))
    model = rt1.RT1(torchvision_bn, VOCAB)
    ckpt = {"config": {**asdict(torchvision_bn), "vocabulary": VOCAB}, "model": model.state_dict(),
            "stats": stats([-1.0] * 7, [1.0] * 7)}
    policy = rt1.Policy.from_checkpoint(ckpt, "cpu")  # the checkpoint remembers which BatchNorm it trained with
    assert all(m.eps == 1e-5 for m in policy.model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def image_offsets(images, shifted):
    """(dy, dx) of each frame: images hold 1000 * row + col + 1 (0 only in the padding), so the centre pixel
    of a shifted frame names the source pixel it came from."""
    H, W = images.shape[-2:]
    centre = shifted[..., H // 2, W // 2].flatten()
    return (centre - 1) // 1000 - H // 2, (centre - 1) % 1000 - W // 2


def test_random_shift_moves_each_axis_by_its_official_fraction():
    H = W = 64  # (20/256, 50/320) of 64 px: up to 5 rows and 10 columns either way
    frame = (1000 * torch.arange(H)[:, None] + torch.arange(W)[None] + 1).float()  # (H, W)
    images = frame.expand(2, 3, 3, H, W)  # (B, T, 3, H, W)
    torch.manual_seed(0)
    dys, dxs = set(), set()
    for _ in range(300):
        dy, dx = image_offsets(images, rt1.random_shift(images, rt1.Config().shift))
        assert len(set(dy.tolist())) == len(set(dx.tolist())) == 1  # one offset for the whole batch
        dys.add(int(dy[0])), dxs.add(int(dx[0]))
    assert dys == set(range(-5, 6)) and dxs == set(range(-10, 11))


def test_random_shift_compiles_without_a_graph_break():
    # ~1 s: dynamo traces it whole (fullgraph raises on a break, e.g. an offset drawn as a Python int);
    # the "eager" backend skips code generation
    images = frames(2, 3)
    torch.manual_seed(0)
    shifted = torch.compile(rt1.random_shift, fullgraph=True, backend="eager")(images, rt1.Config().shift)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8


def test_action_slots_see_only_image_tokens_of_their_own_and_earlier_steps():
    mask = rt1.attention_mask(steps=2, n_image=2, n_action=3)  # [i i a a a][i i a a a]
    image_row = torch.tensor([True, True, True, True, True, True, False, False, False, False])
    assert torch.equal(mask[5], image_row)  # first image token of step 1: everything before it, causally
    action_row = torch.tensor([True, True, False, False, False, True, True, False, False, False])
    assert torch.equal(mask[9], action_row)  # last action slot of step 1: image tokens of steps 0 and 1


def test_later_frames_do_not_change_earlier_predictions():
    model = tiny().eval()  # eval: BatchNorm would otherwise mix frames through the batch statistics
    images = frames(2, 3)
    changed = images.clone()
    changed[:, 2] = 255 - changed[:, 2]
    with torch.no_grad():
        a, b = model(images, VOCAB), model(changed, VOCAB)
    torch.testing.assert_close(a[:, :2], b[:, :2], rtol=0, atol=0)
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_policy_reuses_tokens_as_training_pads_history():
    model = tiny().eval()
    tokenizer = rt1.ActionTokenizer(stats([-1.0] * 3 + [0.0] * 3 + [0.0], [1.0] * 3 + [0.0] * 3 + [1.0]))
    policy = rt1.Policy(model, tokenizer)
    policy.reset(2)
    video = frames(2, 5, size=48)  # at 48 px: the policy resizes to the configured 32 px as data.py does
    resized = torchvision.transforms.v2.functional.resize(video.flatten(0, 1), [32, 32], antialias=True)
    resized = resized.unflatten(0, (2, 5))
    for t in range(5):
        action = policy.act({"image_primary": video[:, t].numpy()}, ["open the door"] * 2)
        window = resized[:, np.maximum(np.arange(t - 2, t + 1), 0)]  # (B, T, ...): first frame repeated
        with torch.no_grad():
            tokens = model(window, ["open the door"] * 2)[:, -1].argmax(-1)  # (B, A): the newest step
        expected = tokenizer.decode(tokens, torch.zeros(2, dtype=torch.long))
        assert action.shape == (2, 7) and action.dtype == np.float32
        np.testing.assert_allclose(action, expected.numpy(), atol=1e-6)
        assert (action[:, 3:6] == 0).all()


def fake_batch(B=4, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image_primary": frames(B, T, seed=seed), "instruction": [VOCAB[i % 2] for i in range(B)],
            "action": torch.rand(B, T, 1, 7, generator=g) * 2 - 1, "obs_pad": torch.zeros(B, T, dtype=torch.bool),
            "action_pad": torch.zeros(B, T, 1, dtype=torch.bool), "dataset_id": torch.zeros(B, dtype=torch.long)}


def test_loss_falls_on_a_fixed_batch():
    model = tiny()
    tokenizer = rt1.ActionTokenizer(stats([-1.0] * 7, [1.0] * 7))
    batch = fake_batch()
    batch["obs_pad"][0, :2] = True  # padded history steps are not supervised
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, metrics = rt1.loss(model, batch, tokenizer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - np.log(256)) < 0.5  # starts near uniform over 256 bins
    assert losses[-1] < 0.3 * losses[0], losses
    assert 0 <= metrics["token_acc"] <= 1


@pytest.mark.skipif(not BRIDGE.exists(), reason="the Bridge sample (../shared/data) is not here")
def test_a_few_steps_on_the_bridge_sample(tmp_path):
    # ~1-5 s: indexes the Bridge sample (once per session) and trains 3 steps through train.train
    import data
    import train
    ds = data.load(str(BRIDGE), history=TINY.history, image_size=TINY.image_size)
    assert ds.has_embedding  # Open X-Embodiment ships a 512-d instruction embedding
    cfg = rt1.Config(**{**asdict(TINY), "lang_dim": ds.sources[0].embedding.shape[1], "shift": rt1.Config().shift})
    tokenizer = rt1.ActionTokenizer(ds.stats)
    tcfg = train.TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=4, lr=1e-3, warmup=1, workers=0,
                             log_every=1, ckpt_every=3)
    model = train.train(rt1.RT1(cfg), lambda m, b: rt1.loss(m, b, tokenizer), ds, tcfg, method="rt1",
                        config={**asdict(cfg), "vocabulary": None}, log=lambda *a: None)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["method"] == "rt1" and ckpt["step"] == 3 and ckpt["config"]["lang_dim"] == 512
    assert model.vocabulary is None


@pytest.mark.skipif(not BRIDGE.exists(), reason="the Bridge sample (../shared/data) is not here")
def test_token_accuracy_against_the_frame_blind_baseline():
    # ~2 s: every window of the Bridge sample through a tiny model. With every step sampled, the blind baseline
    # (each instruction's most frequent token) is right on sum over instructions of its mode's count, out of all
    # steps: a window whose acting step is not the step it was drawn for breaks that identity.
    import data
    ds = data.load(str(BRIDGE), history=TINY.history, image_size=TINY.image_size)
    src = ds.sources[0]
    tokenizer = rt1.ActionTokenizer(ds.stats)
    model = rt1.RT1(rt1.Config(**{**asdict(TINY), "lang_dim": src.embedding.shape[1]}))
    report = rt1.token_accuracy(model, tokenizer, ds, samples=10**6)
    assert list(report) == list(rt1.DIMS)
    tokens = tokenizer.encode(torch.from_numpy(np.array(src.action[:, :7], np.float32)),
                              torch.zeros(len(src.action), dtype=torch.long)).numpy()
    task = src.instruction[np.searchsorted(src.start, np.arange(len(tokens)), side="right") - 1]
    for d, name in enumerate(rt1.DIMS):
        modes = sum(np.bincount(tokens[task == t, d]).max() for t in np.unique(task))
        assert report[name][1] == pytest.approx(modes / len(tokens))
        assert 0 <= report[name][0] <= 1 and report[name][2] >= 0 and report[name][3] >= 0


def test_checkpoint_round_trips_through_eval_sim(tmp_path):
    import eval_sim
    model = tiny(vocabulary=sorted(eval_sim.INSTRUCTIONS.values())).eval()
    low, high = [-1.0, -1, -1, 0, 0, 0, 0], [1.0, 1, 1, 0, 0, 0, 1]  # MetaWorld: no rotation
    ckpt = {"method": "rt1", "config": {**asdict(TINY), "vocabulary": sorted(eval_sim.INSTRUCTIONS.values())},
            "model": model.state_dict(), "stats": [{"name": "bridge", "action": {"q01": [0] * 7, "q99": [1] * 7}},
                                                   {"name": "metaworld", "action": {"q01": low, "q99": high}}],
            "instructions": sorted(eval_sim.INSTRUCTIONS.values()), "step": 1}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    policy, method = eval_sim.load_policy(str(tmp_path / "ckpt.pt"))
    assert method == "rt1" and policy.dataset_id == 1  # acts with the MetaWorld source's statistics
    reference = rt1.Policy(model, rt1.ActionTokenizer(ckpt["stats"]), dataset_id=1)
    rng = np.random.default_rng(0)
    for p in (policy, reference):
        p.reset(2)
    for _ in range(3):
        obs = {"image_primary": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
               "image_wrist": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
               "state": rng.standard_normal((2, 4)).astype(np.float32)}
        instructions = [eval_sim.INSTRUCTIONS["reach-v3"], eval_sim.INSTRUCTIONS["door-open-v3"]]
        np.testing.assert_array_equal(policy.act(obs, instructions), reference.act(obs, instructions))
    # and in the simulator: one short evaluation through the worker processes
    # ~10 s: an untrained policy fails, so the episode runs MetaWorld's full 500 steps
    results = eval_sim.evaluate(policy, "reach-v3", 1, method="rt1", size=64, workers=1, video=False)
    assert set(results["success"]) == {"reach-v3"}


def test_export_acts_as_its_checkpoint_and_loads_without_pickle(tmp_path, export_round_trip):
    # eval_sim.py export, then the folder through eval_sim.load_policy (what evaluate --ckpt DIR calls)
    import eval_sim
    vocabulary = sorted(eval_sim.INSTRUCTIONS.values())
    low, high = [-1.0, -1, -1, 0, 0, 0, 0], [1.0, 1, 1, 0, 0, 0, 1]
    torch.save({"method": "rt1", "config": {**asdict(TINY), "vocabulary": vocabulary}, "amp_dtype": "fp32",
                "channels_last": True, "model": tiny(vocabulary=vocabulary).state_dict(), "stats": stats(low, high),
                "step": 1}, tmp_path / "ckpt.pt")
    policy, exported, method = export_round_trip(tmp_path / "ckpt.pt")
    assert method == "rt1" and exported.amp_dtype == "fp32"
    for p in (policy, exported):  # trained NHWC: its convolutions compute NHWC at evaluation too
        stem = next(w for w in p.model.parameters() if w.dim() == 4 and w.shape[-1] > 1)
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    rng = np.random.default_rng(0)
    for p in (policy, exported):
        p.reset(2)
    for _ in range(3):  # the history fills: every step's action must match
        obs = {"image_primary": rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8),
               "image_wrist": rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8),
               "state": rng.standard_normal((2, 4)).astype(np.float32)}
        instructions = [eval_sim.INSTRUCTIONS["reach-v3"], eval_sim.INSTRUCTIONS["door-open-v3"]]
        np.testing.assert_array_equal(exported.act(obs, instructions), policy.act(obs, instructions))

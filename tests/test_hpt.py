"""hpt.py on the CPU: the official trunk parameter counts, a trunk.pth in the official layout that loads and
computes what the official blocks compute, two embodiments with different cameras, state and action sizes
in one batch, masking of padded history and padded actions, a falling loss, data.py's missing_views, and
pretraining on a real mixture -> fine-tuning MetaWorld on a frozen trunk -> a checkpoint that eval_sim
rebuilds and runs. Everything but the parameter counts runs the Small trunk on 32 px frames."""
import hashlib
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF

import data
import eval_sim
import hpt

TINY = hpt.Config(image_size=32, history=2, chunk=3, views=("primary", "wrist"), finetune_encoder=True,
                  drop_path=0.0, stem_dropout=0.0, head_dropout=0.0)
# embodiment 0: two cameras, 7-d state, 7-d action; embodiment 1: the first camera only, 4-d state, 4-d action
EMBODIMENTS = [{"name": "two_cams", "state_dim": 7, "action_dim": 7, "views": [0, 1]},
               {"name": "one_cam", "state_dim": 4, "action_dim": 4, "views": [0]}]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def stats(name, state_lo, state_hi, action_lo, action_hi):
    return {"name": name, "state": {"min": state_lo, "max": state_hi}, "action": {"min": action_lo, "max": action_hi}}


STATS = [stats("two_cams", [-1.0] * 7, [1.0] * 7, [-2.0] * 7, [2.0] * 7),
         stats("one_cam", [0.0] * 4, [1.0] * 4, [0.0] * 4, [1.0] * 4)]


def batch(B=6, cfg=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, K, size = cfg.history, cfg.chunk, cfg.image_size
    image = lambda: torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=g)
    ids = torch.tensor([0, 1] * (B // 2))
    state, action = torch.rand(B, T, 7, generator=g) * 2 - 1, torch.rand(B, T, K, 7, generator=g)
    state[ids == 1, :, 4:] = action[ids == 1, :, :, 4:] = 0  # data.py zero-pads the smaller embodiment
    return {"image_primary": image(), "image_wrist": image(), "state": state, "action": action,
            "obs_pad": torch.zeros(B, T, dtype=torch.bool), "action_pad": torch.zeros(B, T, K, dtype=torch.bool),
            "dataset_id": ids}


def model_inputs(b, cfg=TINY):
    norm = hpt.Limits(STATS, "state", 7)
    images = torch.stack([b[f"image_{v}"] for v in cfg.views], 2)
    return images, norm.normalize(b["state"], b["dataset_id"]), b["obs_pad"], b["dataset_id"]


def tiny(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return hpt.HPT(cfg, EMBODIMENTS)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_trunk_parameter_counts_are_the_official_ones():
    expected = {"small": 3_176_448, "base": 12_644_352, "large": 50_454_528, "xlarge": 226_861_056}
    for size, n in expected.items():
        with torch.device("meta"):  # shapes only: XLarge's 227M parameters are never allocated
            trunk = hpt.Trunk(size)
        assert count(trunk) == n, size
        assert len(trunk.state_dict()) == 14 * len(trunk.blocks)  # 224 keys (448 for XLarge), nothing else
    with pytest.raises(ValueError, match="--size 'huge'"):
        hpt.Trunk("huge")


def test_stems_and_head_as_official():
    model = tiny()
    stem = model.stems[1]["state"]
    assert stem.net[0].weight.shape == (128, 4)  # the whole 4-d state vector -> one token per step
    assert stem.tokens.shape == (1, 16, 128) and model.stems[0]["image"].net[0].weight.shape == (128, 512)
    assert stem.cross_attention.to_q.weight.shape == (512, 128) and stem.cross_attention.to_q.bias is None
    assert stem.cross_attention.to_kv.weight.shape == (1024, 128)
    head = model.heads[0].net
    assert [type(m).__name__ for m in head] == ["Linear", "SiLU", "Linear", "Dropout", "LayerNorm", "SiLU", "Linear",
                                                "Tanh"]
    assert head[6].weight.shape == (3 * 7, 128) and model.heads[1].net[6].weight.shape == (3 * 4, 128)
    table = hpt.sinusoid(5, 6)
    angle = 3 / 10000 ** (2 * 1 / 6)  # position 3, dims 2 (sin) and 3 (cos) share the frequency of pair 1
    assert math.isclose(table[3, 2], math.sin(angle), abs_tol=1e-6)
    assert math.isclose(table[3, 3], math.cos(angle), abs_tol=1e-6)


def test_two_embodiments_in_one_batch_give_each_its_own_computation():
    model = tiny().eval()
    b = batch()
    images, state, pad, ids = model_inputs(b)
    with torch.no_grad():
        out = model(images, state, pad, ids)
        assert out.shape == (6, TINY.chunk, 7) and out.abs().max() <= 1
        assert (out[ids == 1, :, 4:] == 0).all()  # past the 4-d embodiment's action size
        for k in (0, 1):  # the mixed batch = each embodiment's rows on their own (the official one-domain batch)
            rows = ids == k
            alone = model(images[rows], state[rows], pad[rows], ids[rows])
            torch.testing.assert_close(out[rows], alone, atol=1e-5, rtol=1e-5)
        # the one-camera embodiment never looks at the wrist frames (data.py gives it zeros there)
        other = images.clone()
        other[ids == 1, :, 1] = 255 - other[ids == 1, :, 1]
        torch.testing.assert_close(model(other, state, pad, ids)[ids == 1], out[ids == 1], atol=0, rtol=0)


def test_padded_history_steps_are_masked_out():
    model = tiny().eval()
    b = batch()
    b["obs_pad"][:, 0] = True  # step 0 lies before the episode start
    images, state, pad, ids = model_inputs(b)
    changed_images, changed_state = images.clone(), state.clone()
    changed_images[:, 0], changed_state[:, 0] = 255 - changed_images[:, 0], -changed_state[:, 0]
    with torch.no_grad():
        out = model(images, state, pad, ids)
        torch.testing.assert_close(model(changed_images, changed_state, pad, ids), out, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(model(changed_images, changed_state, torch.zeros_like(pad), ids), out)


def official_trunk_state(size, seed=0):
    """A trunk.pth as the HF repos liruiw/hpt-* ship it: keys trunk.blocks.{i}.* (spec A2.2), random values."""
    dim, depth, _ = hpt.SIZES[size]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    state = {}
    for i in range(depth):
        p = f"trunk.blocks.{i}."
        state |= {p + "attn.in_proj_weight": r(3 * dim, dim), p + "attn.in_proj_bias": r(3 * dim),
                  p + "attn.bias_k": r(1, 1, dim), p + "attn.bias_v": r(1, 1, dim),
                  p + "attn.out_proj.weight": r(dim, dim), p + "attn.out_proj.bias": r(dim),
                  p + "norm_1.weight": 1 + r(dim), p + "norm_1.bias": r(dim), p + "mlp.fc1.weight": r(4 * dim, dim),
                  p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
                  p + "norm_2.weight": 1 + r(dim), p + "norm_2.bias": r(dim)}
    return state


def reference_trunk(state, x, heads):
    """The official blocks written out: pre-LN (eps 1e-6), attention whose learned bias_k / bias_v are
    appended as one extra key and value after the projection, exact GELU MLP, no final LayerNorm."""
    depth = 1 + max(int(k.split(".")[2]) for k in state)
    B, L, d = x.shape
    for i in range(depth):
        w = lambda name: state[f"trunk.blocks.{i}.{name}"]
        h = F.layer_norm(x, (d,), w("norm_1.weight"), w("norm_1.bias"), eps=1e-6)
        q, k, v = (h @ w("attn.in_proj_weight").t() + w("attn.in_proj_bias")).chunk(3, -1)
        k = torch.cat([k, w("attn.bias_k").expand(B, 1, d)], 1)  # (B, L + 1, d)
        v = torch.cat([v, w("attn.bias_v").expand(B, 1, d)], 1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        attn = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d / heads)).softmax(-1) @ split(v)
        x = x + attn.transpose(1, 2).flatten(2) @ w("attn.out_proj.weight").t() + w("attn.out_proj.bias")
        h = F.layer_norm(x, (d,), w("norm_2.weight"), w("norm_2.bias"), eps=1e-6)
        x = x + F.gelu(h @ w("mlp.fc1.weight").t() + w("mlp.fc1.bias")) @ w("mlp.fc2.weight").t() + w("mlp.fc2.bias")
    return x


def test_a_trunk_in_the_official_layout_loads_strictly_and_computes_the_same(tmp_path):
    state = official_trunk_state("small")
    torch.save(state, tmp_path / "trunk.pth")
    trunk = hpt.Trunk("small").eval()
    assert "trunk" in hpt.load_trunk(trunk, str(tmp_path / "trunk.pth"))
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), reference_trunk(state, x, heads=8), atol=1e-4, rtol=1e-4)
    # the full model keeps the same keys under model.trunk: its state_dict's trunk.* is a trunk.pth
    model = tiny()
    hpt.load_trunk(model.trunk, str(tmp_path / "trunk.pth"))
    mine = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    assert mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)
    # an official full model.pth (policy.state_dict(): trunk.trunk.blocks.*, stems.*, heads.*) too
    torch.save({"trunk." + k: v for k, v in state.items()} | {"heads.metaworld.net.0.weight": torch.zeros(2)},
               tmp_path / "model.pth")
    other = hpt.Trunk("small")
    hpt.load_trunk(other, str(tmp_path / "model.pth"))
    assert all(torch.equal(other.state_dict()[k[len("trunk."):]], v) for k, v in state.items())
    # a nanorobot hpt checkpoint works as --pretrained too
    torch.save({"method": "hpt", "config": {}, "model": model.state_dict(), "stats": [], "step": 1}, tmp_path / "c.pt")
    other = hpt.Trunk("small")
    hpt.load_trunk(other, str(tmp_path / "c.pt"))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.trunk.state_dict().values()))
    with pytest.raises(ValueError, match="width 128 with 16 blocks.*pass --size small"):
        hpt.load_trunk(hpt.Trunk("base"), str(tmp_path / "trunk.pth"))
    torch.save({"method": "rt1", "model": {}}, tmp_path / "rt1.pt")
    with pytest.raises(ValueError, match="'rt1' checkpoint"):
        hpt.load_trunk(other, str(tmp_path / "rt1.pt"))


def test_limits_map_min_max_to_plus_minus_one():
    norm = hpt.Limits([stats("a", [0.0, 5.0], [2.0, 5.0], [0.0], [1.0])], "state", 3)
    x = torch.tensor([[[0.0, 5.0, 9.0], [2.0, 5.0, 9.0], [1.0, 5.0, 9.0]]])  # (1, 3, 3); dim 2 is data.py padding
    y = norm.normalize(x, torch.tensor([0]))
    assert y.tolist() == [[[-1.0, 0.0, 9.0], [1.0, 0.0, 9.0], [0.0, 0.0, 9.0]]]  # a constant dim: shifted by -min
    torch.testing.assert_close(norm.unnormalize(y, torch.tensor([0])), x)


def test_loss_ignores_padding_and_falls_on_a_fixed_batch():
    model = tiny(replace(TINY, finetune_encoder=False))  # the official frozen ResNet: ~0.15 s a step, not ~0.4
    norm = {"state": hpt.Limits(STATS, "state", 7), "action": hpt.Limits(STATS, "action", 7)}
    b = batch()
    b["action_pad"][:, -1, -1] = True  # the chunk's last action lies past the episode end
    loss = lambda m, x: hpt.loss(m, x, norm, TINY, [7, 4])[0]
    torch.manual_seed(0)
    first = loss(model, b)
    garbage = dict(b, action=b["action"].clone())
    garbage["action"][:, -1, -1] = 100.0  # padded entries
    garbage["action"][b["dataset_id"] == 1, -1, :, 4:] = 100.0  # dims the 4-d embodiment does not have
    torch.manual_seed(0)
    assert torch.equal(loss(model, garbage), first)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):  # the random horizon (1 or 2 steps) changes from step to step: seeded above
        opt.zero_grad()
        loss(model, b).backward()
        opt.step()
    last = loss(model, b)
    assert last < 0.5 * first, (first, last)
    assert all(p.grad is not None for p in model.heads.parameters())  # both embodiments' heads were trained


def test_missing_views_gives_zero_frames_and_a_mask(bridge_path, metaworld_path):
    spec = f"{bridge_path},{metaworld_path}"  # Bridge has no wrist camera, MetaWorld has one
    with pytest.raises(data.DataError, match="missing_views='zeros'"):
        data.load(spec, image_size=32, views=("primary", "wrist"))
    ds = data.load(spec, image_size=32, views=("primary", "wrist"), missing_views="zeros")
    bridge, metaworld = ds[(0, 3, 0)], ds[(1, 3, 1)]
    assert bridge["views_present"].tolist() == [True, False] and metaworld["views_present"].tolist() == [True, True]
    assert bridge["image_wrist"].shape == (1, 3, 32, 32) and not bridge["image_wrist"].any()
    assert metaworld["image_wrist"].any() and bridge["image_primary"].any()
    assert "views_present" not in data.load(spec, image_size=32)[(0, 3, 0)]  # the default is unchanged
    with pytest.raises(data.DataError, match="missing_views='maybe'"):
        data.load(spec, image_size=32, missing_views="maybe")


@pytest.fixture(scope="module")
def metaworld_path(tmp_path_factory):
    # ~6-9 s: 2 real expert demonstrations of reach-v3 at 32 px, collected through eval_sim as RLDS
    return eval_sim.collect("reach-v3", 2, str(tmp_path_factory.mktemp("metaworld") / "reach"), size=32, workers=1)


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["hpt.py", *argv])
    hpt.main()


def test_pretrain_on_a_mixture_then_finetune_metaworld_and_evaluate(bridge_path, droid_path, metaworld_path,
                                                                    tmp_path, monkeypatch, capsys):
    # ~10-15 s: 2 + 2 training steps through train.train, then one short MetaWorld episode in eval_sim's worker
    import train
    tiny_flags = ["--image_size", "32", "--workers", "0", "--batch_size", "6", "--warmup", "1", "--log_every", "1"]
    pre = tmp_path / "pre"
    run_main(monkeypatch, "--data", f"{bridge_path},{droid_path},{metaworld_path}", "--history", "2",
             "--views", "primary", "wrist", "--steps", "2", "--out_dir", str(pre), *tiny_flags)
    out = capsys.readouterr().out
    assert "random init, trained end to end" in out
    ckpt = train.load_checkpoint(pre / "ckpt.pt")
    sizes = [s["num_steps"] for s in ckpt["stats"]]
    weights = [float(line.split("weight ")[1].split(",")[0]) for line in out.splitlines() if ", weight " in line]
    np.testing.assert_allclose(weights, np.sqrt(sizes) / np.sqrt(sizes).sum(), atol=1e-3)  # temperature 2
    assert [e["name"] for e in ckpt["config"]["embodiments"]] == ["bridge_dataset", "r2d2_faceblur", "metaworld"]
    assert [len(e["views"]) for e in ckpt["config"]["embodiments"]] == [1, 2, 2]  # Bridge: no wrist camera
    assert [e["state_dim"] for e in ckpt["config"]["embodiments"]] == [len(s["state"]["min"]) for s in ckpt["stats"]]
    assert ckpt["train_config"]["find_unused"]  # DDP: a batch may lack an embodiment

    fine, resnet = tmp_path / "fine", torchvision.models.resnet18().state_dict()  # stands in for ImageNet weights
    torch.save(resnet, tmp_path / "resnet18.pth")
    run_main(monkeypatch, "--data", str(metaworld_path), "--pretrained", str(pre / "ckpt.pt"), "--freeze_trunk",
             "--resnet_weights", str(tmp_path / "resnet18.pth"), "--steps", "2", "--out_dir", str(fine),
             "--eval_episodes", "0", *tiny_flags)
    out = capsys.readouterr().out
    assert f"the trunk of nanorobot hpt checkpoint {pre / 'ckpt.pt'}, frozen" in out and "resnet18.pth, frozen" in out
    tuned = train.load_checkpoint(fine / "ckpt.pt")
    part = lambda c, prefix: {k[len(prefix):]: v for k, v in c["model"].items() if k.startswith(prefix)}
    assert all(torch.equal(v, part(ckpt, "trunk.")[k]) for k, v in part(tuned, "trunk.").items())  # loaded, frozen
    assert all(torch.equal(v, resnet[k]) for k, v in part(tuned, "encoder.net.").items())  # the frozen ResNet
    assert not tuned["config"]["finetune_encoder"]
    assert tuned["config"]["history"] == 1 and tuned["config"]["embodiments"][0]["name"] == "metaworld"

    policy, method = eval_sim.load_policy(str(fine / "ckpt.pt"))
    assert method == "hpt" and policy.model.cfg.image_size == 32
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
           "image_wrist": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
           "state": rng.uniform(0, 1, (2, 4)).astype(np.float32)}
    policy.reset(2)
    action = eval_sim.check_actions(policy.act(obs, ["reach"] * 2), 2, "hpt")
    norm = {k: hpt.Limits(tuned["stats"], k, 4 if k == "state" else 7) for k in ("state", "action")}
    ids = torch.zeros(2, dtype=torch.long)
    images = TF.resize(torch.tensor(obs["image_primary"]), [32, 32], antialias=True)  # as data.py resizes
    with torch.no_grad():
        chunk = policy.model(images[:, None, None], norm["state"].normalize(torch.tensor(obs["state"])[:, None], ids),
                             torch.zeros(2, 1, dtype=torch.bool), ids)
    expected = norm["action"].unnormalize(chunk[:, 0], ids).numpy()
    np.testing.assert_allclose(action, expected, atol=1e-5)  # the first action of the chunk, un-normalised
    monkeypatch.setattr(eval_sim, "MAX_STEPS", 50)  # an untrained policy fails: 50 steps, not 500, of ~20 ms each
    results = eval_sim.evaluate(policy, "reach-v3", 1, method="hpt", size=32, workers=1, video=False)
    assert set(results["success"]) == {"reach-v3"}


def test_cached_features_give_the_loss_of_live_frames(metaworld_path, tmp_path):
    cfg = replace(TINY, image_size=64, finetune_encoder=False)  # the official frozen ResNet; 2 x 2 tokens a frame
    ds = data.load(str(metaworld_path), history=cfg.history, chunk=cfg.chunk, image_size=cfg.image_size,
                   views=cfg.views)
    torch.manual_seed(0)
    model = hpt.HPT(cfg, hpt.embodiments_of(ds, cfg.views))
    torch.save(model.encoder.net.state_dict(), tmp_path / "resnet18.pth")
    cached = hpt.cached_features(ds, model.encoder, tmp_path / "resnet18.pth", log=lambda line: None)
    src = ds.sources[0]
    digest = hashlib.sha256((tmp_path / "resnet18.pth").read_bytes()).hexdigest()[:16]  # the weights' hash
    files = sorted(src.cache.glob(f"hpt-resnet18-{digest}-*.npy"))  # beside the data index, one per camera
    assert [f.name for f in files] == [f"hpt-resnet18-{digest}-64x64-bilinear-{v}.npy" for v in ("primary", "wrist")]
    assert all(np.load(f, mmap_mode="r").shape == (len(src), 4, 512) for f in files)
    # episode starts (padded history), the middle of an episode and the last step of the data
    items = [(0, 0, 0), (0, 1, 1), (0, 7, 2), (0, int(src.start[1]), 3), (0, len(src) - 1, 4)]
    live = torch.utils.data.default_collate([ds[i] for i in items])
    fast = torch.utils.data.default_collate([cached[i] for i in items])
    assert "image_primary" not in fast and fast["features_wrist"].shape == (5, 2, 4, 512)
    norm = {k: hpt.Limits(ds.stats, k, ds.state_dim if k == "state" else 7) for k in ("state", "action")}
    model.train()  # the frozen ResNet stays in eval mode; dropout and the random horizon draw the same seeded
    for seed in range(2):
        torch.manual_seed(seed)
        expected = hpt.loss(model, live, norm, cfg, [7])[0]
        torch.manual_seed(seed)
        torch.testing.assert_close(hpt.loss(model, fast, norm, cfg, [7])[0], expected, atol=1e-6, rtol=1e-5)
    stamps = [f.stat().st_mtime_ns for f in files]
    hpt.cached_features(ds, model.encoder, tmp_path / "resnet18.pth", log=lambda line: pytest.fail(line))
    assert [f.stat().st_mtime_ns for f in files] == stamps  # computed once: a rerun reads the same files


def test_training_on_cached_features_resumes_exactly(metaworld_path, tmp_path, monkeypatch, capsys):
    # ~5-8 s: three short runs of main() (4 steps, 2 + crash, 2 more) with dropout, drop path and the random horizon
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    flags = ["--data", str(metaworld_path), "--resnet_weights", str(tmp_path / "resnet18.pth"), "--history", "2",
             "--image_size", "32", "--workers", "0", "--batch_size", "6", "--warmup", "1", "--steps", "4",
             "--ckpt_every", "2", "--eval_episodes", "0"]
    run_main(monkeypatch, *flags, "--out_dir", str(tmp_path / "straight"))
    calls, loss = [], hpt.loss

    def crash_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the first call is train.count_flops's (on a copy of the model), then steps 1, 2, 3
            raise KeyboardInterrupt
        return loss(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(hpt, "loss", crash_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            run_main(monkeypatch, *flags, "--out_dir", str(tmp_path / "resumed"))
    run_main(monkeypatch, *flags, "--out_dir", str(tmp_path / "resumed"))
    out = capsys.readouterr().out
    assert "frozen, its features of every frame cached once" in out and "resuming" in out
    assert out.count("ResNet-18 features of") == 1  # the first run computed them, the others read them
    import train
    straight, resumed = (train.load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_policy_history_pads_like_data_py_and_starts_as_the_official_policy():
    cfg = replace(TINY, views=("primary",), history=3)
    torch.manual_seed(0)
    model = hpt.HPT(cfg, [{"name": "metaworld", "state_dim": 4, "action_dim": 7, "views": [0]}]).eval()
    st = [stats("metaworld", [0.0] * 4, [1.0] * 4, [-1.0] * 7, [1.0] * 7)]
    policy = hpt.Policy(model, st)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 2, 3, 32, 32), dtype=np.uint8)  # (time, envs, ...)
    states = rng.uniform(0, 1, (4, 2, 4)).astype(np.float32)
    policy.reset(2)
    ids = torch.zeros(2, dtype=torch.long)
    window = lambda steps: (torch.tensor(frames[steps]).transpose(0, 1)[:, :, None],  # (N, len, 1, 3, H, W)
                            torch.tensor(states[steps]).transpose(0, 1) * 2 - 1)  # (N, len, 4) normalised
    for t in range(4):
        action = policy.act({"image_primary": frames[t], "state": states[t]}, ["x"] * 2)
        steps = np.arange(t - 2, t + 1)
        pad = torch.tensor(steps < 0).expand(2, 3)  # data.py: the first frame repeats before the start, padded
        # the official get_action: the history grown from length 1, the real steps only, positions from 0
        seen = steps[steps >= 0]
        with torch.no_grad():
            padded = model(*window(np.maximum(steps, 0)), pad, ids)[:, 0].numpy()
            official = model(*window(seen), torch.zeros(2, len(seen), dtype=torch.bool), ids)[:, 0].numpy()
        np.testing.assert_allclose(action, padded, atol=1e-5)
        np.testing.assert_allclose(action, official, atol=1e-5)


def test_random_horizon_is_drawn_per_modality_whenever_the_loss_runs():
    """The official stem_process draws h ~ U{1..T} for the image stem, then another for the state stem, and
    each keeps its last h steps with positions from 0; compute_loss does it in train and eval mode alike."""
    model = tiny().eval()  # TINY has no dropout: eval mode changes nothing but the mode
    b = batch()  # T = 2
    images, state, pad, ids = model_inputs(b)
    other_images, other_state = images.clone(), state.clone()
    other_images[:, 0], other_state[:, 0] = 255 - images[:, 0], -state[:, 0]  # step 0 changed, step 1 kept

    def run(seed, x, s):
        torch.manual_seed(seed)
        return model(x, s, pad, ids, random_horizon=True)

    drawn = set()
    with torch.no_grad():
        last_step = model(images[:, 1:], state[:, 1:], pad[:, 1:], ids)  # the official slice x[:, T - 1:]
        for seed in range(6):  # draws (1, 2), (2, 2), (1, 2), (1, 1), (1, 1), (2, 1)
            torch.manual_seed(seed)
            h_image, h_state = (int(torch.randint(1, 3, ())) for _ in range(2))  # forward's draws, in its order
            out = run(seed, images, state)
            assert torch.allclose(run(seed, other_images, state), out, atol=1e-6) == (h_image == 1), seed
            assert torch.allclose(run(seed, images, other_state), out, atol=1e-6) == (h_state == 1), seed
            if h_image == h_state == 1:
                torch.testing.assert_close(out, last_step, atol=1e-5, rtol=1e-5)
            drawn.add((h_image, h_state))
    assert {(1, 2), (2, 1)} <= drawn  # the stems drew different horizons: two draws per step, not one
    norm = {"state": hpt.Limits(STATS, "state", 7), "action": hpt.Limits(STATS, "action", 7)}
    losses = set()
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(seed)
            losses.add(round(float(hpt.loss(model, b, norm, TINY, [7, 4])[0]), 6))
    assert len(losses) > 1  # masked in eval mode too


def test_horizon_mask_is_a_tensor_op_that_never_recompiles():
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounter()
    mask = torch.compile(hpt.horizon_mask, backend=counter, fullgraph=True)  # fullgraph: no graph break allowed
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, :2] = True  # history before the episode start stays masked whatever h is
    torch.manual_seed(0)
    masks = [mask(pad) for _ in range(20)]
    assert counter.frame_count == 1  # one graph for every h
    assert {tuple(m[1].tolist()) for m in masks} == {(False,) * 4, (True, False, False, False),
                                                     (True, True, False, False), (True, True, True, False)}
    assert all(m[0, :2].all() and not m[:, -1].any() for m in masks)  # pads kept, the last step never cut

"""gr1.py on the CPU: parameter counts of the paper configurations (built, never run), shapes, GR-1's
attention semantics (causal over timesteps, queries masked as keys), frozen parts, chunk targets masked at
episode ends, a falling loss, the official MAE / Bytedance / GR1-Training weight layouts, the CLIP text
tower, the frame grid, and a checkpoint trained on the CALVIN fixture that eval_sim rebuilds and runs."""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import gr1

TINY = gr1.Config(chunk_size=3, history=3, image_size=32, d_model=32, layers=2, heads=2, mlp=64, dropout=0.0,
                  n_positions=512, patch=8, vit_dim=24, vit_layers=1, vit_heads=2, resampler_depth=1,
                  resampler_heads=2, resampler_dim_head=8, latents=3, lang_dim=16, decoder_layers=1,
                  decoder_heads=2, shift=0.0, future_all_steps=True)  # 3 steps: the official rule leaves no t+3
VOCAB = ["close the drawer", "open the drawer"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny(cfg=TINY, seed=0, table=None):
    torch.manual_seed(seed)
    return gr1.GR1(cfg, VOCAB, table)


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def inputs(B=2, T=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = lambda: torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=g)
    gripper = torch.nn.functional.one_hot(torch.randint(0, 2, (B, T), generator=g), 2).float()
    return frames(), frames(), torch.randn(B, T, 6, generator=g), gripper, [VOCAB[i % 2] for i in range(B)]


def stats(state_dim=15, name="calvin", lo=-1.0, hi=1.0):  # lo, hi: the action percentiles q01, q99
    part = lambda d, lo, hi: {"mean": [0.0] * d, "std": [1.0] * d, "q01": [lo] * d, "q99": [hi] * d}
    return {"name": name, "state": part(state_dim, -1.0, 1.0), "action": part(7, lo, hi)}


def test_paper_configurations_have_the_official_parameter_counts():
    # ~3-8 s: builds GR-1, GR-Chunk (each with its 86M-parameter MAE ViT-B) and CLIP's text tower; never runs them
    table = torch.zeros(1, 512)  # frozen CLIP features: a buffer
    gr_1 = gr1.GR1(gr1.Config(variant="gr-1", chunk_size=1), ["x"], table)
    # the official counts include GPT-2's token table wte (1 x 384), unused by both official models and left out
    assert count(gr_1) + 384 == 45_988_039
    assert count(gr_1.transformer) + 384 == 21_294_720 and count(gr_1.perceiver_resampler) == 18_897_408
    assert count(gr_1.decoder_blocks) == 3_548_928
    assert sum(p.numel() for p in gr_1.model_mae.parameters()) == 85_798_656 and count(gr_1.model_mae) == 0
    assert gr_1.decoder_pos_embed.shape == (1, 196, 384)  # 14 x 14 patches, fixed
    total = count(gr_1) + 384 + 85_798_656 + 63_428_096  # + frozen MAE + frozen CLIP text tower
    assert abs(total - 195.2e6) < 0.1e6  # the paper's "195M parameters, 46M trainable"
    del gr_1
    chunk = gr1.GR1(gr1.Config(), ["x"], table)  # GR-Chunk-10: + wpe 1024 x 384 + chunk queries 10 x 384
    assert count(chunk) + 384 == 46_385_095
    assert gr1.Config().history * (22 + 10 + 20) == 520  # tokens in the sequence
    clip = gr1.CLIPText()
    assert sum(p.numel() for p in clip.parameters()) == 63_428_096


def test_shapes_and_unknown_instructions():
    model = tiny().eval()
    rgb, hand, arm, gripper, text = inputs()
    valid = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        pred_arm, pred_gripper, pred_rgb, pred_hand = model(rgb, hand, arm, gripper, text, valid)
        tokens = model.observation_tokens(rgb, hand, arm, gripper)
    assert pred_arm.shape == (2, 3, 3, 6) and pred_gripper.shape == (2, 3, 3)  # (B, T, K, ...)
    assert pred_rgb.shape == pred_hand.shape == (2, 3, 16, 8 * 8 * 3)  # (B, T, patches, p*p*3)
    assert tokens.shape == (2, 3, 1 + 2 * (3 + 1), 32)  # [state][static 3 latents + CLS][hand 3 + CLS]
    with pytest.raises(KeyError, match="not among the 2"):
        model(rgb, hand, arm, gripper, ["fly away"] * 2, valid)
    with pytest.raises(ValueError, match="chunk_size 1"):
        gr1.GR1(replace(TINY, variant="gr-1"), VOCAB)


def test_patchify_round_trips_in_mae_order():
    x = torch.randn(2, 3, 32, 32)
    patches = gr1.patchify(x, 8)
    assert patches.shape == (2, 16, 192)
    torch.testing.assert_close(patches[0, 1].view(8, 8, 3), x[0, :, 0:8, 8:16].permute(1, 2, 0))  # row 0, col 1
    torch.testing.assert_close(gr1.unpatchify(patches, 8, 4), x)


def test_attention_mask_is_causal_and_hides_query_tokens():
    valid = torch.tensor([[True, True, False]])
    mask = gr1.attention_mask(valid, n_obs=2, n_query=2)[0, 0]  # per step [o o q q]
    is_obs = torch.tensor([True, True, False, False] * 3)
    assert not mask[:, ~is_obs].any()  # no token ever attends to a query token
    assert not mask[:, 8:].any()  # nor to the padded step 2
    row = lambda *bits: torch.tensor(bits, dtype=torch.bool)
    assert torch.equal(mask[7], row(1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0))  # a query of step 1: observations of 0, 1
    assert torch.equal(mask[4], row(1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0))  # causal
    assert mask.any(1).all()  # every row keeps step 0's language token


def test_later_steps_and_padded_steps_do_not_change_earlier_outputs():
    model = tiny().eval()
    rgb, hand, arm, gripper, text = inputs()
    valid = torch.ones(2, 3, dtype=torch.bool)
    rgb2, hand2, arm2 = rgb.clone(), hand.clone(), arm.clone()
    rgb2[:, 2], hand2[:, 2], arm2[:, 2] = 255 - rgb[:, 2], 255 - hand[:, 2], arm[:, 2] + 5
    with torch.no_grad():
        a = model(rgb, hand, arm, gripper, text, valid)
        b = model(rgb2, hand2, arm2, gripper, text, valid)
        short = model(rgb[:, :2], hand[:, :2], arm[:, :2], gripper[:, :2], text, valid[:, :2])
        padded = model(rgb2, hand2, arm2, gripper, text, torch.tensor([[True, True, False]] * 2))
    for x, y, s, p in zip(a, b, short, padded):
        torch.testing.assert_close(x[:, :2], y[:, :2], rtol=0, atol=1e-6)  # step 2 does not reach steps 0, 1
        torch.testing.assert_close(x[:, :2], s, rtol=0, atol=1e-5)  # = running on the first two steps only
        torch.testing.assert_close(p[:, :2], s, rtol=0, atol=1e-5)
    assert not torch.allclose(a[0][:, 2], b[0][:, 2])


@pytest.mark.parametrize("variant", ["gr-chunk", "gr-1"])
def test_the_policys_shortcut_predicts_the_same_last_actions(variant):
    # only the observation tokens and the last [ACT] queries, at their own positions of the position table
    cfg = TINY if variant == "gr-chunk" else replace(TINY, variant="gr-1", chunk_size=1)
    model = tiny(cfg).eval()
    with torch.no_grad():
        if model.transformer.wpe is not None:  # a table far from N(0, 0.02): a token at a wrong position shows
            model.transformer.wpe.weight.normal_(std=1.0)
        rgb, hand, arm, gripper, text = inputs()
        for T in (1, 3):  # an episode's first step, a full window
            tokens = model.observation_tokens(rgb[:, :T], hand[:, :T], arm[:, :T], gripper[:, :T])
            full = model.predict(tokens, text, torch.ones(2, T, dtype=torch.bool))
            short = model.predict_last_actions(tokens, text)
            torch.testing.assert_close(short[0], full[0][:, -1], rtol=0, atol=1e-5)
            torch.testing.assert_close(short[1], full[1][:, -1], rtol=0, atol=1e-5)
        if variant == "gr-chunk":  # the positions are used: another slice of the table, another output
            x, mask = torch.zeros(2, 4, cfg.d_model), torch.ones(2, 1, 4, 4, dtype=torch.bool)
            assert not torch.allclose(model.transformer(x, mask, torch.arange(1, 5)), model.transformer(x, mask))


def test_left_align_puts_valid_steps_first():
    batch = {"obs_pad": torch.tensor([[True, False, False], [False, False, False]]),
             "state": torch.arange(6.0).view(2, 3, 1), "language_embedding": torch.zeros(2, 3)}
    valid, out = gr1.left_align(batch)
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    assert out["state"][:, :, 0].tolist() == [[1, 2, 2], [3, 4, 5]]
    assert out["language_embedding"] is batch["language_embedding"]  # not a time axis, even if its size is T


def hand_batch(B=4, T=3, K=3, seed=0):
    rgb, hand, arm, gripper, text = inputs(B, T, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    action = torch.rand(B, T, K, 7, generator=g) * 2 - 1
    action[..., 6] = (action[..., 6] > 0).float()
    return {"image_primary": rgb, "image_wrist": hand, "future_image_primary": rgb.flip(1),
            "future_image_wrist": hand.flip(1), "state": torch.randn(B, T, 15, generator=g), "action": action,
            "obs_pad": torch.zeros(B, T, dtype=torch.bool), "action_pad": torch.zeros(B, T, K, dtype=torch.bool),
            "future_pad": torch.zeros(B, T, dtype=torch.bool), "instruction": text,
            "dataset_id": torch.zeros(B, dtype=torch.long)}


def test_frozen_vit_gets_no_gradient_and_the_rest_does():
    model = tiny(cfg=replace(TINY, freeze_vit=True), table=torch.randn(2, 16))
    total, _ = gr1.loss(model.train(), hand_batch(), gr1.Inputs([stats()]), model.cfg)
    total.backward()
    assert all(p.grad is None for p in model.model_mae.parameters())
    assert "table" in dict(model.language.named_buffers())  # frozen language features: no parameter at all
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable), \
        [n for n in trainable if model.get_parameter(n).grad is None]


def test_padded_targets_do_not_count():
    model = tiny().eval()
    cfg, ins = model.cfg, gr1.Inputs([stats()])
    batch = hand_batch()
    batch["obs_pad"][0, 0] = True  # sample 0 starts one step before its episode
    batch["action_pad"][1, 2, 1:] = True  # sample 1: the last two chunk targets of step 2 lie past the end
    batch["future_pad"][2, 1:] = True  # sample 2: frames t+3 past the end
    garbage = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    garbage["action"][1, 2, 1:] = 1e3
    garbage["action"][0, 0] = 1e3  # the action of the padded history step
    garbage["future_image_primary"][2, 1:] = 0
    garbage["future_image_wrist"][2, 1:] = 255
    with torch.no_grad():
        a = gr1.loss(model, batch, ins, cfg)[1]
        b = gr1.loss(model, {**batch, **garbage}, ins, cfg)[1]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_calvin_chunk_targets_are_padded_at_episode_ends(calvin_path):
    # ~1-3 s: indexes the CALVIN fixture
    import data
    ds = data.load(str(calvin_path), history=3, chunk=4, image_size=32, views=("primary", "wrist"), future=3)
    src = ds.sources[0]
    e, t, length = src.locate(int(src.start[1]) - 1)  # the last step of the first annotation window
    sample = ds[(0, int(src.start[1]) - 1, 0)]
    assert t == length - 1
    assert sample["action_pad"][-1].tolist() == [False, True, True, True]  # a_t is real, a_t+1.. are not
    assert sample["future_pad"][-1] and sample["future_image_wrist"].shape == (3, 3, 32, 32)
    arm, gripper = gr1.Inputs(ds.stats).state(sample["state"][None], torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(arm[0], sample["state"][:, :6])  # CALVIN: raw tcp pose (GR-1)
    assert gripper[0, :, 1].tolist() == (sample["state"][:, 14] > 0).float().tolist()  # one-hot, index 1 = open


def test_loss_falls_on_a_fixed_batch():
    model = tiny()
    batch, ins = hand_batch(), gr1.Inputs([stats()])
    batch["action_pad"][0, -1, 1:] = True
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        total, metrics = gr1.loss(model.train(), batch, ins, model.cfg)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # per-patch normalised noise: predicting each patch's mean scores 191/192; below it, some pixels are learned
    assert metrics["loss_static"] < 0.99 and metrics["loss_hand"] < 0.99, metrics
    assert set(metrics) == {"loss_static", "loss_hand", "loss_arm", "loss_gripper", "gripper_acc"}
    pretrain = gr1.loss(model, batch, ins, replace(model.cfg, pretrain=True))
    assert set(pretrain[1]) == {"loss_static", "loss_hand"}  # video only


def test_frame_targets_follow_the_official_window_by_default(monkeypatch):
    # Main.py compares pred[:, :-3] with the window's own frames[:, 3:]: the last 3 steps get no frame target,
    # unless --future_all_steps (then each step's frame t+3 from data.py, which can lie past the window)
    cfg = replace(TINY, history=5, future_all_steps=False)
    model = tiny(cfg).eval()
    batch, ins = hand_batch(T=5), gr1.Inputs([stats()])
    g = torch.Generator().manual_seed(3)
    for view in ("primary", "wrist"):
        x = batch[f"image_{view}"]  # (4, 5, 3, 32, 32)
        future = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g)  # t+3 of steps 2..4: past the window
        future[:, :2] = x[:, 3:]  # steps 0, 1: the window's own frames 3, 4, as data.py gives them
        batch[f"future_image_{view}"] = future
    with torch.no_grad():
        official = gr1.loss(model, batch, ins, cfg)[1]
        every = gr1.loss(model, batch, ins, replace(cfg, future_all_steps=True))[1]
        arm, gripper = ins.state(batch["state"], batch["dataset_id"])
        _, _, pred_rgb, pred_hand = model(batch["image_primary"], batch["image_wrist"], arm, gripper,
                                          batch["instruction"], torch.ones(4, 5, dtype=torch.bool))
    for key, pred, view in (("loss_static", pred_rgb, "primary"), ("loss_hand", pred_hand, "wrist")):
        x, future = batch[f"image_{view}"], batch[f"future_image_{view}"]
        torch.testing.assert_close(official[key], ((pred[:, :-3] - gr1.frame_target(x[:, 3:], cfg)) ** 2).mean())
        torch.testing.assert_close(every[key], ((pred - gr1.frame_target(future, cfg)) ** 2).mean())
    saved = {k: v for k, v in asdict(cfg).items() if k != "future_all_steps"}  # a checkpoint from before the flag
    assert gr1.checkpoint_config(saved).future_all_steps  # it supervised every step
    monkeypatch.setattr("sys.argv", ["gr1.py", "--history", "3", "--no-future_all_steps"])
    with pytest.raises(SystemExit, match="no frame t\\+3"):  # a window too short for the rule: refused at once
        gr1.main()


def test_calvin_arm_targets_are_the_raw_actions(calvin_path):
    # ~1-3 s: a batch of the CALVIN fixture. Official: GR1-Training regresses the raw rel_actions, whatever their
    # percentiles (here far from +-1, so a percentile map would rescale them)
    import data
    ds = data.load(str(calvin_path), history=3, chunk=3, image_size=32, views=("primary", "wrist"), future=3)
    q01, q99 = (np.array(ds.stats[0]["action"][k][:6]) for k in ("q01", "q99"))
    assert (q01 > -0.5).all() and (q99 < 0.5).all()
    batch = next(iter(data.loader(ds, 4, seed=0, num_workers=0)))
    ins = gr1.Inputs(ds.stats)
    action = batch["action"][..., :6]  # (4, 3, 3, 6)
    assert torch.equal(ins.arm_target(action, batch["dataset_id"]), action)
    torch.manual_seed(0)
    model = gr1.GR1(TINY, ds.instructions).eval()
    with torch.no_grad():
        metrics = gr1.loss(model, batch, ins, TINY)[1]
        valid, b = gr1.left_align(batch)
        arm, gripper = ins.state(b["state"], b["dataset_id"])
        pred_arm = model(b["image_primary"], b["image_wrist"], arm, gripper, b["instruction"], valid)[0]
    expected = gr1.masked_mean(torch.nn.functional.smooth_l1_loss(pred_arm, b["action"][..., :6], reduction="none"),
                               valid[..., None] & ~b["action_pad"])
    torch.testing.assert_close(metrics["loss_arm"], expected)


def to_official(state, bytedance):
    """This file's state_dict -> an official layout: Conv1D (in, out) GPT weights, plus what each official
    file carries that gr1.py does not use (CLIP, wte, Bytedance's attention buffers)."""
    out = {}
    for k, v in state.items():
        if k.startswith("language.") or (bytedance and k.startswith(("transformer.wpe", "action_chunk_queries"))):
            continue
        out[k] = v.t().contiguous() if gr1.GPT_CONV1D.match(k) else v
    out["transformer.wte.weight"] = torch.randn(1, TINY.d_model)
    out["model_clip.token_embedding.weight"] = torch.randn(5, 4)
    if bytedance:
        for i in range(TINY.layers):
            out[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 512, 512, dtype=torch.uint8).tril()
            out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


@pytest.mark.parametrize("variant", ["gr-1", "gr-chunk"])
def test_official_layouts_load(tmp_path, variant):
    cfg = replace(TINY, variant=variant, chunk_size=1 if variant == "gr-1" else 3)
    features = torch.randn(2, TINY.lang_dim)  # CLIP features per instruction: not in an official state_dict
    source = tiny(cfg, seed=1, table=features).eval()
    state = to_official(source.state_dict(), bytedance=variant == "gr-1")
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    torch.save({"state_dict": state}, tmp_path / "gr1.pth")
    mae = source.model_mae.state_dict()  # MAE's release: {"model": timm ViT keys + its own decoder}
    torch.save({"model": {**mae, "decoder_embed.weight": torch.zeros(1), "mask_token": torch.zeros(1)}},
               tmp_path / "mae.pth")

    target = tiny(cfg, seed=2, table=features).eval()
    gr1.load_mae(target, tmp_path / "mae.pth")
    for k, v in source.model_mae.state_dict().items():
        assert torch.equal(target.model_mae.state_dict()[k], v)
    logs = []
    gr1.load_official(target, tmp_path / "gr1.pth", log=logs.append)
    x = inputs()
    valid = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        for a, b in zip(source(*x, valid), target(*x, valid)):
            torch.testing.assert_close(a, b)
    if variant == "gr-chunk":  # a Bytedance snapshot into GR-Chunk: position table and chunk queries keep their init
        chunk = tiny(replace(TINY, chunk_size=1), seed=2)
        bytedance = to_official(tiny(cfg=replace(TINY, variant="gr-1", chunk_size=1)).state_dict(), bytedance=True)
        torch.save(bytedance, tmp_path / "snapshot.pt")
        gr1.load_official(chunk, tmp_path / "snapshot.pt", log=logs.append)
        assert "action_chunk_queries" in logs[-1] and "transformer.wpe" in logs[-1]
        torch.save(to_official(tiny(replace(TINY, chunk_size=5)).state_dict(), False), tmp_path / "chunk5.pt")
        with pytest.raises(ValueError, match="shapes differ"):  # chunk sizes are not interchangeable
            gr1.load_official(tiny(seed=2), tmp_path / "chunk5.pt")
    torch.save({"model": {"cls_token": torch.zeros(1)}}, tmp_path / "bad_mae.pth")
    with pytest.raises(KeyError, match="missing"):
        gr1.load_mae(target, tmp_path / "bad_mae.pth")


def test_official_weights_act_unchanged_on_calvin(tmp_path):
    # both official CALVIN evaluations send the raw, unclamped arm prediction, whatever the data's percentiles
    cfg = replace(TINY, variant="gr-1", chunk_size=1)
    features = torch.randn(2, TINY.lang_dim)
    source = tiny(cfg, seed=1, table=features)
    with torch.no_grad():
        source.pred_arm_act.bias += torch.tensor([3.0, -3.0, 0, 0, 0, 0])  # outside [-1, 1]: a clamp would show
    torch.save({"state_dict": to_official(source.state_dict(), bytedance=True)}, tmp_path / "snapshot_ABC.pt")
    model = tiny(cfg, seed=2, table=features).eval()
    gr1.load_official(model, tmp_path / "snapshot_ABC.pt", log=lambda *a: None)
    policy = gr1.Policy(model, [stats(15, "calvin", lo=-0.3, hi=0.2)])
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (2, 3, 200, 200), dtype=np.uint8),
           "image_wrist": rng.integers(0, 256, (2, 3, 84, 84), dtype=np.uint8),
           "state": rng.standard_normal((2, 15)).astype(np.float32)}
    policy.reset(2)
    action = policy.act(obs, VOCAB)
    arm, gripper = policy.inputs.state(torch.from_numpy(obs["state"])[:, None], torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        pred_arm = model(policy._image(obs["image_primary"]), policy._image(obs["image_wrist"]), arm, gripper, VOCAB,
                         torch.ones(2, 1, dtype=torch.bool))[0][:, -1, 0]  # (2, 6)
    assert pred_arm.abs().max() > 2
    np.testing.assert_allclose(action[:, :6], pred_arm.numpy(), rtol=0, atol=1e-6)


def test_clip_text_tower_pools_the_end_of_text_token():
    # ~3-8 s: imports open_clip for its BPE tokenizer (a small text tower, random weights)
    from open_clip import tokenize
    torch.manual_seed(0)
    clip = gr1.CLIPText(width=32, layers=2, heads=2, embed_dim=16).eval()
    tokens = tokenize(["open the drawer", "push the red block to the left"])  # (2, 77)
    assert tokens.shape == (2, 77) and (tokens.argmax(-1) == (tokens > 0).sum(-1) - 1).all()  # EOT is last
    changed = tokens.clone()
    changed[0, 10:] = 123  # after the end-of-text token: invisible to a causal tower read at EOT
    with torch.no_grad():
        a, b = clip(tokens), clip(changed)
    assert a.shape == (2, 16)
    torch.testing.assert_close(a[0], b[0])



def test_clip_features_load_an_openai_layout(tmp_path, monkeypatch):
    # the same loading path as --clip_ckpt, with a small tower (the real one is 250 MB): OpenAI key names, plus
    # the vision tower and logit_scale that gr1.py ignores; features are L2-normalised and deterministic
    from open_clip import tokenize
    tower = gr1.CLIPText
    small = lambda: tower(width=32, layers=2, heads=2, embed_dim=16)
    torch.manual_seed(0)
    clip = small().eval()
    torch.save({**clip.state_dict(), "visual.proj": torch.zeros(3), "logit_scale": torch.tensor(4.6)},
               tmp_path / "clip.pt")
    monkeypatch.setattr(gr1, "CLIPText", small)
    text = ["open the drawer", "push the red block to the left"]
    features = gr1.clip_features(text, tmp_path / "clip.pt")
    with torch.no_grad():
        expected = clip(tokenize(text))
    torch.testing.assert_close(features, expected / (expected.norm(dim=-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    torch.save({"token_embedding.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="not an OpenAI-layout CLIP checkpoint"):
        gr1.clip_features(text, tmp_path / "bad.pt")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit:FutureWarning")
def test_torchscript_clip_loads_only_from_the_command_line(tmp_path, monkeypatch):
    # TorchScript runs code when loaded (issue 15). --clip_torchscript on gr1.py's command line loads OpenAI's
    # archive and keeps a plain state_dict for the checkpoint; a TorchScript clip_ckpt named by a checkpoint's
    # config is refused at evaluation with a clear error, and torch.jit.load is never called.
    from open_clip import tokenize
    tower = gr1.CLIPText
    small = lambda: tower(width=32, layers=2, heads=2, embed_dim=16)
    torch.manual_seed(0)
    clip = small().eval()
    text = ["open the drawer", "push the red block to the left"]
    with torch.no_grad():
        expected = clip(tokenize(text))
        torch.jit.trace(clip, tokenize(text)).save(str(tmp_path / "ViT-B-32.pt"))
    expected = expected / (expected.norm(dim=-1, keepdim=True) + 1e-6)
    monkeypatch.setattr(gr1, "CLIPText", small)
    torch.testing.assert_close(gr1.clip_features(text, tmp_path / "ViT-B-32.pt", torchscript=True), expected)
    gr1.save_clip_text(str(tmp_path / "ViT-B-32.pt"), str(tmp_path / "run" / "clip_text.pt"))
    torch.testing.assert_close(gr1.clip_features(text, tmp_path / "run" / "clip_text.pt"), expected)

    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="TorchScript archive.*--clip_torchscript"):
        gr1.clip_features(text, tmp_path / "ViT-B-32.pt")
    model = tiny(table=torch.randn(2, TINY.lang_dim))
    ckpt = {"config": {**asdict(TINY), "vocabulary": VOCAB, "language": "clip",
                       "clip_ckpt": str(tmp_path / "ViT-B-32.pt")}, "model": model.state_dict(), "stats": [stats()]}
    policy = gr1.Policy.from_checkpoint(ckpt, "cpu")
    obs = {"image_primary": np.zeros((1, 3, 32, 32), np.uint8), "image_wrist": np.zeros((1, 3, 32, 32), np.uint8),
           "state": np.zeros((1, 15), np.float32)}
    policy.reset(1)
    assert policy.act(obs, VOCAB[:1]).shape == (1, 7)  # instructions it knows need no CLIP
    with pytest.raises(ValueError, match="TorchScript archive.*--clip_torchscript"):
        policy.act(obs, ["push the red block to the left"])  # a new one would: refused
    assert calls == []


def test_frame_grid(tmp_path):
    model = tiny()
    batch = hand_batch(B=2)
    grid = gr1.render(model, batch, gr1.Inputs([stats()]), tmp_path / "predictions.png")
    assert grid.shape == (2, 6, 3, 32, 32) and grid.min() >= 0 and grid.max() <= 1
    assert (tmp_path / "predictions.png").stat().st_size > 1000
    torch.testing.assert_close(grid[:, 1], batch["future_image_primary"][:, -1].float() / 255)  # real t+3
    assert model.training  # render restores the mode


def test_checkpoint_round_trips_through_eval_sim(tmp_path, calvin_path):
    # ~5-15 s: 3 train.train steps on the CALVIN fixture, then the checkpoint through eval_sim.load_policy
    import data
    import eval_sim
    import train
    cfg = replace(TINY, shift=0.1)
    ds = data.load(str(calvin_path), history=cfg.history, chunk=cfg.chunk_size, image_size=cfg.image_size,
                   views=("primary", "wrist"), future=cfg.future)
    kind, table, _ = gr1.language_table(ds, None)
    assert kind == "dataset" and table.shape[0] == len(ds.instructions)  # CALVIN ships an embedding per window
    cfg = replace(cfg, lang_dim=table.shape[1])
    ins = gr1.Inputs(ds.stats)
    tcfg = train.TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=4, lr=1e-3, warmup=1, workers=0,
                             log_every=1, ckpt_every=3)
    torch.manual_seed(0)
    model = train.train(gr1.GR1(cfg, ds.instructions, table), lambda m, b: gr1.loss(m, b, ins, cfg), ds, tcfg,
                        method="gr1", config={**asdict(cfg), "vocabulary": ds.instructions, "language": kind,
                                              "clip_ckpt": None}, log=lambda *a: None)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss_arm"]) for r in rows)

    # the checkpoint also gets a MetaWorld-like source (4-d state), so one policy serves both simulators
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    ckpt["stats"] = ckpt["stats"] + [stats(4, "metaworld")]
    torch.save(ckpt, tmp_path / "both.pt")
    policy, method = eval_sim.load_policy(str(tmp_path / "both.pt"))
    assert method == "gr1" and isinstance(policy, gr1.Policy)
    import bench  # bench.py --act: the same checkpoint's Policy.act timed as an evaluation calls it
    name, ms, diff, recorded = bench.bench_act(str(tmp_path / "both.pt"), n=2, calls=2, warmup=1)
    assert name == "gr1" and min(ms.values()) > 0 and recorded == "NCHW"  # gr1 trains NCHW
    assert diff < 1e-4  # the same weights in either layout act alike
    model.eval()
    rng = np.random.default_rng(0)
    text = [ds.instructions[0], ds.instructions[-1]]
    policy.reset(2)
    seen = []
    for t in range(5):  # CALVIN-shaped observations: window of 1, 2, 3, then the last 3 steps
        obs = {"image_primary": rng.integers(0, 256, (2, 3, 200, 200), dtype=np.uint8),
               "image_wrist": rng.integers(0, 256, (2, 3, 84, 84), dtype=np.uint8),
               "state": rng.standard_normal((2, 15)).astype(np.float32)}
        action = policy.act(obs, text)
        seen.append(obs)
        window = seen[-3:]
        frames = lambda key: torch.stack([policy._image(o[key])[:, 0] for o in window], 1)
        state = torch.stack([torch.from_numpy(o["state"]) for o in window], 1)
        arm, gripper = ins.state(state, torch.zeros(2, dtype=torch.long))
        with torch.no_grad():
            pred_arm, pred_gripper, _, _ = model(frames("image_primary"), frames("image_wrist"), arm, gripper, text,
                                                 torch.ones(2, len(window), dtype=torch.bool))
        expected = ins.arm_action(pred_arm[:, -1, 0], torch.zeros(2, dtype=torch.long))
        assert action.shape == (2, 7) and action.dtype == np.float32
        np.testing.assert_allclose(action[:, :6], expected.numpy(), atol=1e-5)
        assert action[:, 6].tolist() == (pred_gripper[:, -1, 0] > 0).float().tolist()
    policy.reset(2)
    obs = {"image_primary": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
           "image_wrist": rng.integers(0, 256, (2, 3, 128, 128), dtype=np.uint8),
           "state": rng.standard_normal((2, 4)).astype(np.float32)}
    assert policy.act(obs, text).shape == (2, 7)  # MetaWorld-shaped: acts with the 4-d source's statistics
    policy.model.cfg = replace(policy.model.cfg, test_chunk_size=3)  # GR-Chunk at test time: 3 actions per plan
    policy.reset(2)
    first = policy.act(obs, text)
    queued = [a.copy() for a in policy.pending]
    assert len(queued) == 2  # the next two come from the same prediction, without looking at obs
    np.testing.assert_array_equal(policy.act({}, text), queued[0])
    np.testing.assert_array_equal(policy.act({}, text), queued[1])
    assert policy.tokens.shape[1] == 1 and first.shape == (2, 7)  # skipped frames do not enter the window


def test_policy_resizes_as_the_training_frames():
    # gr1.py trains on data.load(interpolation="bicubic_float"); Policy._image (which may not import data) must match it
    import data
    policy = gr1.Policy(tiny(), [stats()])
    rng = np.random.default_rng(0)
    for side, size in ((84, 32), (84, 224), (200, 224)):  # down, and up as CALVIN's 84 and 200 px to 224
        policy.model.cfg = replace(TINY, image_size=size)
        x = rng.integers(0, 256, (2, 3, side, side), dtype=np.uint8)
        expected = data.resize(torch.from_numpy(x), size, "bicubic_float")  # (2, 3, size, size)
        assert torch.equal(policy._image(x)[:, 0], expected)
        assert not torch.equal(expected, data.resize(torch.from_numpy(x), size, "bilinear"))


def test_policy_runs_in_metaworld():
    # ~10-20 s: one real MetaWorld episode through eval_sim's worker (an untrained policy runs all 500 steps)
    import eval_sim
    vocabulary = sorted(eval_sim.INSTRUCTIONS.values())
    torch.manual_seed(0)
    model = gr1.GR1(TINY, vocabulary).eval()
    policy = gr1.Policy(model, [stats(4, "metaworld")])
    results = eval_sim.evaluate(policy, "reach-v3", 1, method="gr1", size=64, workers=1, video=False)
    assert set(results["success"]) == {"reach-v3"}
    assert policy.tokens.shape[:2] == (1, TINY.history)  # the window filled up to T steps


def test_export_acts_as_its_checkpoint_and_loads_without_pickle(tmp_path, export_round_trip):
    # eval_sim.py export, then the folder through eval_sim.load_policy (what evaluate --ckpt DIR calls)
    torch.save({"method": "gr1", "model": tiny().state_dict(), "stats": [stats(), stats(4, "metaworld")], "step": 3,
                "config": {**asdict(TINY), "vocabulary": VOCAB, "language": "learned", "clip_ckpt": None}},
               tmp_path / "ckpt.pt")
    policy, exported, method = export_round_trip(tmp_path / "ckpt.pt")
    assert method == "gr1" and isinstance(exported, gr1.Policy)
    rng = np.random.default_rng(0)
    for p in (policy, exported):
        p.reset(2)
    for _ in range(5):  # the window grows to 3 steps and chunks are executed: every step's action must match
        obs = {"image_primary": rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8),
               "image_wrist": rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8),
               "state": rng.standard_normal((2, 4)).astype(np.float32)}
        np.testing.assert_array_equal(exported.act(obs, VOCAB), policy.act(obs, VOCAB))

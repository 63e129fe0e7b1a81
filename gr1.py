"""gr1.py: GR-1 (Wu et al., "Unleashing Large-Scale Video Generative Pre-training for Visual Robot
Manipulation", ICLR 2024, arXiv 2312.13139) and GR-Chunk (its action-chunking retraining), in one file.

Official code: bytedance/GR-1 (models/gr1.py, models/trajectory_gpt2.py, models/vision_transformer.py;
inference only) and EDiRobotics/GR1-Training (models/gr1.py, Main.py: the training recipe and GR-Chunk).
Where they differ from the paper this file follows the code and says so (facts: ../shared/specs/gr1_calvin.md).

    per timestep t: [lang][state][9 latents + CLS: static][9 latents + CLS: hand][ACT x K][OBS x 10][OBS_HAND x 10]
        lang:   frozen CLIP ViT-B/32 text feature -> Linear          images: frozen MAE ViT-B/16 -> perceiver resampler
        T steps x (22 + K + 20) tokens --GPT-2 (12 x 384, ReLU), queries masked as keys--> outputs at the query slots
        [ACT]_t      -> Linear -> Linear -> arm (6, smooth L1) + gripper (1 logit, BCE)   for a_t .. a_{t+K-1}
        [OBS]_t      -> 2-block MAE decoder -> the static frame t+3, 14x14 patches (per-patch normalised MSE)
        [OBS_HAND]_t -> the same decoder    -> the hand frame t+3

    python gr1.py                                        # MetaWorld MT10: collect (once), train, evaluate
    python gr1.py --data CALVIN_ROOT --mae_ckpt mae_pretrain_vit_base.pth --clip_ckpt ViT-B-32.pt --clip_torchscript
    python gr1.py --data EGO_VIDEO_RLDS --pretrain       # video-only pre-training (no action loss)
    torchrun --nproc_per_node=8 gr1.py --data PATH --gr1_ckpt GR1_0_chunksize10.pth  # from official weights
    python gr1.py --render runs/gr1/ckpt.pt --data PATH  # predicted vs real frames -> runs/gr1/predictions.png
"""
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


@dataclass
class Config:
    variant: str = "gr-chunk"      # gr-chunk: GR1-Training (HF GPT-2 with a learned position table, K chunk queries);
                                   # gr-1: Bytedance's GR-1 (no position table, one [ACT] query, chunk_size 1)
    chunk_size: int = 10           # K: actions a_t..a_{t+K-1} predicted per timestep (GR-Chunk README: 10)
    test_chunk_size: int = 1       # actions executed per prediction at test time (README: 1 is best, 2 hurts)
    history: int = 10              # T: timesteps in the window (seq_len)
    image_size: int = 224          # both cameras resized to 224x224 (static 200 px, hand 84 px in CALVIN)
    d_model: int = 384             # GPT width (hidden_size)
    layers: int = 12               # GPT blocks (n_layer)
    heads: int = 12                # GPT heads (n_head), 32 wide
    mlp: int = 1536                # GPT MLP width (n_inner = 4 x 384), ReLU (activation_function "relu")
    dropout: float = 0.1           # GPT embedding, attention and residual dropout (embd/attn/resid_pdrop)
    n_positions: int = 1024        # size of GR-Chunk's position table (GPT2Config n_positions)
    patch: int = 16                # ViT patch size: 14x14 patches at 224 px (MAE ViT-B/16)
    vit_dim: int = 768             # ViT width (img_feat_dim, patch_feat_dim)
    vit_layers: int = 12           # ViT blocks
    vit_heads: int = 12            # ViT heads
    freeze_vit: bool = True        # the MAE encoder is frozen (official); False trains it (CPU default, no MAE weights)
    resampler_depth: int = 3       # perceiver resampler layers
    resampler_heads: int = 4       # resampler heads
    resampler_dim_head: int = 128  # resampler head width
    latents: int = 9               # resampler latents per image (num_latents) -> 9 patch tokens + 1 CLS per camera
    lang_dim: int = 512            # language feature (CLIP ViT-B/32 text: 512)
    decoder_layers: int = 2        # MAE-style video decoder blocks
    decoder_heads: int = 16        # decoder heads (16 x 24 at d 384)
    future: int = 3                # predict the frame t+3 (fwd_pred_next_n x skip_frame in GR1-Training)
    future_all_steps: bool = False  # also give the window's last 3 steps their frame t+3 (official: no, Main.py
                                   # compares pred[:, :-3] with the window's own frames[:, 3:])
    norm_pix_loss: bool = True     # per-patch normalised pixel targets (MAE; GR-Chunk ablation without: 3.46 vs 3.556)
    arm_loss_weight: float = 100.0  # total = static + hand + 100 x arm + gripper (Main.py arm_loss_ratio)
    shift: float = 0.05            # DrQ random shift: pad 10/200 px (static), 4/84 px (hand), same shift for all frames
    pretrain: bool = False         # video prediction only (paper's pre-training stage; no action loss)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation of both cameras


# ---------------------------------------------------------------------------------------------------
# 1. Frozen encoders: MAE ViT-B/16 (timm key names) and the CLIP ViT-B/32 text tower (OpenAI key names)

class Attention(nn.Module):
    """timm/MAE multi-head self-attention: one qkv projection with bias, then an output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (N, L, dim)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, L, hd)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN ViT block (timm names norm1, attn, norm2, mlp): the MAE encoder's (eps 1e-6) and the video
    decoder's (eps 1e-5, as GR-1's decoder blocks)."""

    def __init__(self, dim, heads, eps):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """MAE's ViT-B/16 encoder (models/vision_transformer.py vit_base, no head): frames -> the CLS token and
    the patch tokens, both after the final norm. Keys as timm's, so `mae_pretrain_vit_base.pth` loads."""

    def __init__(self, image_size, patch, dim, layers, heads):
        super().__init__()
        n = (image_size // patch) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, eps=1e-6) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):  # (N, 3, H, W) ImageNet-normalised
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]  # (N, dim), (N, P, dim)


class CLIPText(nn.Module):
    """OpenAI CLIP ViT-B/32's text tower (Radford et al. 2021): BPE ids (N, 77) -> (N, 512) at the end-of-text
    token (the largest id), after ln_final and text_projection. Key names as OpenAI's state_dict, so the text
    half of a CLIP checkpoint loads; 63,428,096 parameters. The tokenizer comes from open_clip."""

    def __init__(self, vocab=49408, context=77, width=512, layers=12, heads=8, embed_dim=512):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width).normal_(std=0.01))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(CLIPBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim).normal_(std=width ** -0.5))
        self.register_buffer("causal", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def forward(self, tokens):  # (N, 77) long
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.causal)
        x = self.ln_final(x)
        return x[torch.arange(len(x)), tokens.argmax(-1)] @ self.text_projection  # (N, 512)


class CLIPBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def clip_state_dict(path, torchscript=False):
    """An OpenAI-layout CLIP state_dict from `path`, read with torch.load(weights_only=True). OpenAI's own release
    (ViT-B-32.pt) is a TorchScript archive, and loading TorchScript runs the code it holds: only with
    `torchscript`, which gr1.py sets from its command line (--clip_torchscript), never from a checkpoint."""
    with warnings.catch_warnings():  # torch says it dispatches to torch.jit.load; with weights_only it refuses
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as e:
            if "TorchScript" not in str(e):
                raise
            if not torchscript:
                raise ValueError(f"clip_ckpt {path}: a TorchScript archive, and loading TorchScript runs the code in "
                                 f"the file; gr1.py loads one only when named on its command line with "
                                 f"--clip_ckpt PATH --clip_torchscript (README, GR-1)") from None
            state = torch.jit.load(path, map_location="cpu").state_dict()
    return state.get("state_dict", state)


def clip_features(instructions, path, torchscript=False):
    """The frozen, L2-normalised CLIP text feature of each instruction (N, 512), computed once (GR-1:
    encode_text / (norm + 1e-6)). `path`: a state_dict with OpenAI's CLIP key names (open_clip's, or the one
    gr1.py writes from OpenAI's TorchScript ViT-B-32.pt); TorchScript itself only with `torchscript`."""
    from open_clip import tokenize  # BPE vocabulary shipped in the wheel: no network
    state = clip_state_dict(path, torchscript)
    text = CLIPText()
    keys = set(text.state_dict())
    missing = keys - set(state)
    if missing:
        raise KeyError(f"--clip_ckpt {path}: not an OpenAI-layout CLIP checkpoint, missing {sorted(missing)[:5]}")
    text.load_state_dict({k: v.float() for k, v in state.items() if k in keys})
    with torch.no_grad():
        x = torch.cat([text(tokenize(instructions[i:i + 64])) for i in range(0, len(instructions), 64)])
    return x / (x.norm(dim=-1, keepdim=True) + 1e-6)


def save_clip_text(path, out):
    """CLIP's text tower from `path` (trusted: named on the command line, TorchScript allowed) -> a plain
    state_dict at `out`, which a checkpoint may name: evaluation then encodes new instructions without TorchScript."""
    state = {k: v for k, v in clip_state_dict(path, torchscript=True).items() if not k.startswith("visual.")}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)


# ---------------------------------------------------------------------------------------------------
# 2. Perceiver resampler (flamingo_pytorch, as GR-1 uses it): 196 patch tokens -> 9 latents

class PerceiverAttention(nn.Module):
    """Latents attend to [media tokens, latents] (keys/values) with no biases (flamingo_pytorch names)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):  # x (N, P, dim), latents (N, L, dim)
        x, latents = self.norm_media(x), self.norm_latents(latents)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, heads, *, dim_head)
        k, v = self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)
        out = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, num_latents):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_pos_emb = nn.Parameter(torch.randn(1, 1, dim))  # one media embedding (a single frame)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, heads, dim_head),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                          nn.Linear(4 * dim, dim, bias=False))]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (N, P, dim) -> (N, num_latents, dim)
        x = x + self.media_pos_emb
        latents = self.latents.expand(len(x), -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


# ---------------------------------------------------------------------------------------------------
# 3. The GPT-2 backbone (Bytedance's trajectory_gpt2 / HF GPT2Model, key names kept; Linear, not Conv1D)

class GPTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, cfg.mlp), nn.Linear(cfg.mlp, d)
        self.heads, self.dropout = cfg.heads, cfg.dropout

    def forward(self, x, mask):  # x (B, L, d), mask bool (B, 1, L, L), True = may attend
        q, k, v = self.attn.c_attn(self.ln_1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.attn.c_proj(a.transpose(1, 2).flatten(2)), self.dropout, self.training)
        h = self.mlp.c_proj(F.relu(self.mlp.c_fc(self.ln_2(x))))
        return x + F.dropout(h, self.dropout, self.training)


class GPT(nn.Module):
    """Input embeddings (B, L, d) -> (B, L, d). GR-1 has no position embedding (order comes from causality and
    the per-timestep embedding); GR-Chunk's HF GPT2Model adds a learned table `wpe` over the flat sequence.
    The unused token table `wte` (1 x 384) of both official models is left out."""

    def __init__(self, cfg):
        super().__init__()
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model) if cfg.variant == "gr-chunk" else None
        self.h = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout
        for m in self.modules():  # HF GPT-2 init: N(0, 0.02) weights and tables, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x, mask, positions=None):  # positions (L,): each token's index in the flat sequence
        if self.wpe is not None:
            x = x + (self.wpe.weight[:x.shape[1]] if positions is None else self.wpe(positions))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)


def attention_mask(valid, n_obs, n_query):
    """(B, 1, L, L) bool, True = may attend, L = T * (n_obs + n_query). GR-1's mask (spec 2.5): causal, and
    a key must be an observation token of a valid timestep, so no token ever attends to a query token
    ([ACT], [OBS], [OBS_HAND] see the observations of steps <= t and nothing else). Valid steps come first:
    every row keeps step 0's language token."""
    B, T = valid.shape
    N = n_obs + n_query
    is_obs = torch.arange(T * N, device=valid.device) % N < n_obs  # (L,)
    key = is_obs[None] & valid.repeat_interleave(N, 1)  # (B, L)
    causal = torch.ones(T * N, T * N, dtype=torch.bool, device=valid.device).tril()
    return (causal[None] & key[:, None])[:, None]


# ---------------------------------------------------------------------------------------------------
# 4. GR-1: language, state and images -> actions and future frames

class Language(nn.Module):
    """Instruction strings -> (B, dim). A frozen table of one feature per distinct instruction (CLIP's or the
    dataset's own embedding: a buffer), or, when neither is at hand, a learned embedding per instruction.
    A (B, dim) tensor of features passes through (the policy encodes unseen instructions with CLIP)."""

    def __init__(self, vocabulary, dim, table=None):
        super().__init__()
        self.vocabulary = {s: i for i, s in enumerate(vocabulary)}
        if table is not None:
            self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32).clone())
        else:
            self.embedding = nn.Embedding(len(vocabulary), dim)

    def forward(self, instruction):
        if torch.is_tensor(instruction):
            return instruction
        unknown = sorted({s for s in instruction if s not in self.vocabulary})
        if unknown:
            raise KeyError(f"instruction(s) {unknown[:3]} are not among the {len(self.vocabulary)} this model knows")
        device = (self.table if hasattr(self, "table") else self.embedding.weight).device
        index = torch.tensor([self.vocabulary[s] for s in instruction], device=device)
        return self.table[index] if hasattr(self, "table") else self.embedding(index)


class GR1(nn.Module):
    """Frames of two cameras (uint8), arm state (6), gripper one-hot (2) and instructions for T steps ->
    arm actions (B, T, K, 6), gripper logits (B, T, K) and predicted patches of the static and hand frames
    t+3 (B, T, P, patch*patch*3). Attribute names are the official ones, so official state_dicts load
    (load_official). Trainable parameters (paper config, test_gr1.py): GR-1 45,987,655 and GR-Chunk-10
    46,384,711 = the official 45,988,039 and 46,385,095 less the unused `wte` (384)."""

    def __init__(self, cfg, vocabulary, table=None):
        super().__init__()
        if cfg.variant not in ("gr-1", "gr-chunk") or (cfg.variant == "gr-1" and cfg.chunk_size != 1):
            raise ValueError(f"--variant is gr-chunk (any --chunk_size) or gr-1 (--chunk_size 1), "
                             f"not {cfg.variant} with chunk {cfg.chunk_size}")
        self.cfg = cfg
        d, dv = cfg.d_model, cfg.vit_dim
        self.language = Language(vocabulary, cfg.lang_dim, table)
        self.model_mae = ViT(cfg.image_size, cfg.patch, dv, cfg.vit_layers, cfg.vit_heads)
        self.model_mae.requires_grad_(not cfg.freeze_vit)
        self.perceiver_resampler = PerceiverResampler(dv, cfg.resampler_depth, cfg.resampler_heads,
                                                      cfg.resampler_dim_head, cfg.latents)
        self.transformer = GPT(cfg)
        self.embed_arm_state, self.embed_gripper_state = nn.Linear(6, d), nn.Linear(2, d)
        self.embed_state = nn.Linear(2 * d, d)  # no nonlinearity anywhere in the state path (official)
        self.embed_timestep = nn.Embedding(cfg.history, d)
        self.embed_lang = nn.Linear(cfg.lang_dim, d)
        self.embed_img, self.embed_hand_img = nn.Linear(dv, d), nn.Linear(dv, d)  # CLS token, per camera
        self.embed_patch, self.embed_hand_patch = nn.Linear(dv, d), nn.Linear(dv, d)  # resampler latents
        self.embed_ln = nn.LayerNorm(d)
        self.action_queries = nn.Embedding(1, d)
        if cfg.variant == "gr-chunk":
            self.action_chunk_queries = nn.Embedding(cfg.chunk_size, d)  # added to the [ACT] query, zero init
            nn.init.zeros_(self.action_chunk_queries.weight)
        self.obs_queries = nn.Embedding(cfg.latents + 1, d)
        self.obs_hand_queries = nn.Embedding(cfg.latents + 1, d)
        self.pred_act_mlps = nn.ModuleList([nn.Linear(d, d // 2), nn.Linear(d // 2, d // 2)])  # no activation
        self.pred_arm_act, self.pred_gripper_act = nn.Linear(d // 2, 6), nn.Linear(d // 2, 1)
        # video decoder (MAE's): [OBS] outputs + a mask token per patch at fixed 2-D sin-cos positions
        side = cfg.image_size // cfg.patch
        self.decoder_embed = nn.Linear(d, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.register_buffer("decoder_pos_embed", sincos_2d(d, side)[None])  # (1, P, d), official: frozen param
        self.decoder_blocks = nn.ModuleList(Block(d, cfg.decoder_heads, eps=1e-5) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, cfg.patch ** 2 * 3)
        self.register_buffer("mean", torch.tensor(MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(3, 1, 1), persistent=False)

    def image_tokens(self, images, embed_patch, embed_img):  # uint8 (N, 3, H, W) -> (N, latents + 1, d)
        x = (images.float() / 255 - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vit):
            cls, patches = self.model_mae(x)
        return torch.cat([embed_patch(self.perceiver_resampler(patches)), embed_img(cls)[:, None]], 1)

    def observation_tokens(self, rgb, hand_rgb, arm, gripper):
        """One frame's tokens, without language and timestep: (B, T, 21, d) = [state][static 10][hand 10].
        They depend on that frame only, so the policy caches them."""
        B, T = rgb.shape[:2]
        state = self.embed_state(torch.cat([self.embed_arm_state(arm), self.embed_gripper_state(gripper)], -1))
        static = self.image_tokens(rgb.flatten(0, 1), self.embed_patch, self.embed_img).unflatten(0, (B, T))
        hand = self.image_tokens(hand_rgb.flatten(0, 1), self.embed_hand_patch, self.embed_hand_img)
        hand = hand.unflatten(0, (B, T))
        return torch.cat([state[:, :, None], static, hand], 2)

    def queries(self):  # (K + 20, d): [ACT] x K, [OBS] x 10, [OBS_HAND] x 10
        act = self.action_queries.weight
        if self.cfg.variant == "gr-chunk":
            act = act + self.action_chunk_queries.weight  # (K, d)
        return torch.cat([act, self.obs_queries.weight, self.obs_hand_queries.weight])

    def decode(self, q):  # [OBS] outputs (B, T, latents + 1, d) -> patches (B, T, P, patch*patch*3)
        B, T, n, d = q.shape
        x = self.decoder_embed(q.flatten(0, 1))
        mask = (self.mask_token[0] + self.decoder_pos_embed).expand(B * T, -1, -1)  # (B*T, P, d)
        x = torch.cat([x, mask], 1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, n:].unflatten(0, (B, T))

    def predict(self, obs_tokens, instruction, valid):
        """obs_tokens (B, T, 21, d), instruction (B strings or (B, lang_dim) features), valid (B, T) bool with
        the valid steps first -> arm (B, T, K, 6), gripper logits (B, T, K), static and hand patches."""
        B, T = obs_tokens.shape[:2]
        K = self.cfg.chunk_size
        obs, queries = self.sequence(obs_tokens, instruction)  # (B, T, 22, d), (B, T, K + 20, d)
        x = self.embed_ln(torch.cat([obs, queries], 2).flatten(1, 2))  # (B, T * (22 + K + 20), d)
        x = self.transformer(x, attention_mask(valid, obs.shape[2], queries.shape[2]))
        x = x.unflatten(1, (T, -1))[:, :, obs.shape[2]:]  # the query outputs (B, T, K + 20, d)
        act, o, o_hand = x[:, :, :K], x[:, :, K:K + self.cfg.latents + 1], x[:, :, K + self.cfg.latents + 1:]
        return (*self.action_head(act),  # (B, T, K, 6), (B, T, K)
                self.decode(o), self.decode(o_hand))  # (B, T, P, p*p*3) x 2

    def predict_last_actions(self, obs_tokens, instruction):
        """What the Policy needs, faster: predict()'s arm and gripper of the last step of a window of valid
        steps, (B, K, 6) and (B, K). No token attends to a query token, so only the observation tokens and
        the last step's [ACT] queries go through the GPT, each at its position in predict's flat sequence
        (GR-Chunk's position table) and with predict's mask: the same actions (tested), ~2x less work."""
        B, T = obs_tokens.shape[:2]
        K = self.cfg.chunk_size
        obs, queries = self.sequence(obs_tokens, instruction)
        n_obs, N = obs.shape[2], obs.shape[2] + queries.shape[2]
        index = torch.arange(T * N, device=obs.device).view(T, N)
        keep = torch.cat([index[:, :n_obs].flatten(), index[-1, n_obs:n_obs + K]])  # (T * 22 + K,)
        x = self.embed_ln(torch.cat([obs.flatten(1, 2), queries[:, -1, :K]], 1))  # (B, T * 22 + K, d)
        valid = torch.ones(B, T, dtype=torch.bool, device=obs.device)
        mask = attention_mask(valid, n_obs, N - n_obs)[:, :, keep][:, :, :, keep]
        return self.action_head(self.transformer(x, mask, keep)[:, -K:])

    def sequence(self, obs_tokens, instruction):  # -> per step: [lang, obs tokens] + time (B, T, 22, d), queries
        B, T = obs_tokens.shape[:2]
        time = self.embed_timestep.weight[:T, None]  # (T, 1, d): relative step in the window
        lang = self.embed_lang(self.language(instruction))[:, None, None].expand(B, T, 1, self.cfg.d_model)
        queries = self.queries().expand(B, T, -1, -1)  # (B, T, K + 20, d): no timestep embedding (official)
        return torch.cat([lang, obs_tokens], 2) + time, queries

    def action_head(self, act):  # [ACT] outputs (..., K, d) -> arm (..., K, 6), gripper logits (..., K)
        for layer in self.pred_act_mlps:
            act = layer(act)
        return self.pred_arm_act(act), self.pred_gripper_act(act)[..., 0]

    def forward(self, rgb, hand_rgb, arm, gripper, instruction, valid):  # rgb, hand_rgb uint8 (B, T, 3, H, W)
        return self.predict(self.observation_tokens(rgb, hand_rgb, arm, gripper), instruction, valid)


def sincos_2d(dim, side):
    """MAE's fixed 2-D sine-cosine position table (side*side, dim): half the channels encode the row, half
    the column, each as sin/cos of the position at geometric frequencies 1/10000^(2i/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    grid = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    enc = lambda pos: torch.cat([torch.sin(pos.flatten()[:, None] * omega), torch.cos(pos.flatten()[:, None] * omega)],
                                1)
    return torch.cat([enc(cols), enc(rows)], 1).float()  # MAE: w-coordinates first, then h


def patchify(images, patch):  # float (..., 3, H, W) -> (..., P, patch*patch*3), MAE's (row, col, channel) order
    *lead, C, H, W = images.shape
    n, h, w = len(lead), H // patch, W // patch
    x = images.reshape(*lead, C, h, patch, w, patch).permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return x.reshape(*lead, h * w, patch * patch * C)  # (..., h, w, p, p, C) flattened


def unpatchify(x, patch, side):  # (..., P, patch*patch*3) -> (..., 3, H, W)
    *lead, P, _ = x.shape
    n = len(lead)
    x = x.reshape(*lead, side, side, patch, patch, 3).permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, 3, side * patch, side * patch)


# ---------------------------------------------------------------------------------------------------
# 5. Inputs and targets per source: state -> (arm 6, gripper one-hot 2), actions normalised

class Inputs:
    """Per-source conversions, from the statistics a checkpoint keeps.
    State: for CALVIN (15-d robot_obs) exactly GR-1's: arm = robot_obs[0:6] raw (tcp xyz, euler xyz), gripper =
    one-hot of the commanded gripper robot_obs[14] (index 1 = open). Other sources have no such layout: arm =
    the first 6 state dims z-scored (zero-padded), gripper = one-hot of the last state dim above the middle of
    its 1st-99th percentile range (MetaWorld's 4-d state: hand xyz + finger opening).
    Arm action: CALVIN's rel_actions as they are, both ways (official: GR1-Training trains on the raw rel_actions,
    already scaled to [-1, 1], and both official evaluations send the raw, unclamped prediction). Other sources:
    mapped from [q01, q99] to [-1, 1] and clipped (a dimension of zero width gives 0), the prediction clamped to
    [-1, 1] and mapped back. Gripper: 1 open / 0 closed (BCE)."""

    def __init__(self, stats):
        self.calvin = [len(s["state"]["mean"]) == 15 and "calvin" in s["name"].lower() for s in stats]
        self.raw = torch.tensor(self.calvin)  # (sources,) arm actions used as they are
        self.names = [s["name"] for s in stats]
        self.state_dim = [len(s["state"]["mean"]) for s in stats]
        t = lambda key, part: [torch.tensor(s[part][key], dtype=torch.float32) for s in stats]
        self.s_mean, self.s_std = t("mean", "state"), t("std", "state")
        self.s_lo, self.s_hi = t("q01", "state"), t("q99", "state")
        self.a_lo = torch.stack([x[:6] for x in t("q01", "action")])  # (sources, 6)
        self.a_width = torch.stack([x[:6] for x in t("q99", "action")]) - self.a_lo

    def describe(self):  # for the run line
        return ", ".join(f"{n} {'raw (official)' if raw else '[q01, q99] -> [-1, 1]'}"
                         for n, raw in zip(self.names, self.calvin))

    def state(self, state, dataset_id):  # state (B, T, S), dataset_id (B,) -> arm (B, T, 6), gripper (B, T, 2)
        arm, open_ = state.new_zeros(*state.shape[:2], 6), state.new_zeros(state.shape[:2], dtype=torch.bool)
        for i in dataset_id.unique().tolist():
            rows, S = dataset_id == i, self.state_dim[i]
            s = state[rows][..., :S]
            if self.calvin[i]:
                arm[rows], open_[rows] = s[..., :6], s[..., 14] > 0
            else:
                z = (s - self.s_mean[i].to(s)) / self.s_std[i].to(s).clamp(min=1e-6)
                arm[rows] = F.pad(z[..., :6], (0, max(0, 6 - S)))
                open_[rows] = s[..., -1] > (self.s_lo[i][-1] + self.s_hi[i][-1]).to(s) / 2
        return arm, F.one_hot(open_.long(), 2).to(state.dtype)

    def arm_target(self, action, dataset_id):  # (B, T, K, 6) -> the regression target
        lo, width = (x.to(action)[dataset_id][:, None, None] for x in (self.a_lo, self.a_width))  # (B, 1, 1, 6)
        scaled = torch.where(width > 0, 2 * (action - lo) / width.clamp(min=1e-12) - 1, 0.0).clamp(-1, 1)
        return torch.where(self.raw.to(action.device)[dataset_id][:, None, None, None], action, scaled)

    def arm_action(self, arm, dataset_id):  # inverse of arm_target: (..., N, 6), dataset_id (N,) -> source units
        lo, width = (x.to(arm)[dataset_id] for x in (self.a_lo, self.a_width))  # (N, 6)
        scaled = lo + (arm.clamp(-1, 1) + 1) / 2 * width
        return torch.where(self.raw.to(arm.device)[dataset_id][:, None], arm, scaled)


# ---------------------------------------------------------------------------------------------------
# 6. Loss (GR1-Training Main.py): static + hand frame MSE + 100 x arm smooth L1 + gripper BCE

TIME_KEYS = ("obs_pad", "state", "action", "action_pad", "future_pad")


def left_align(batch):
    """data.py repeats the first frame before an episode start (obs_pad); GR-1 instead puts the valid steps
    first and masks the rest (its windows start at the sample and are zero-padded at the end). Shift every
    time-indexed entry so; returns (valid (B, T) bool, batch)."""
    pad = batch["obs_pad"]
    B, T = pad.shape
    n = pad.sum(1, keepdim=True)  # (B, 1) padded steps at the start
    steps = torch.arange(T, device=pad.device)[None]
    index = (steps + n).clamp(max=T - 1)  # (B, T)
    rows = torch.arange(B, device=pad.device)[:, None]
    out = {k: v[rows, index] if (k in TIME_KEYS or k.startswith(("image_", "future_image_"))) and torch.is_tensor(v)
           else v for k, v in batch.items()}
    return steps < T - n, out


def random_shift(views, fraction):
    """DrQ shift (GR1-Training): replicate-pad by `fraction` of the side, crop back at a random integer offset,
    one offset per sample shared by all its frames and by every tensor in `views` (inputs and targets)."""
    B, H = views[0].shape[0], views[0].shape[-1]
    p = round(fraction * H)
    if p == 0:
        return views
    offsets = torch.randint(0, 2 * p + 1, (B, 2)).tolist()
    out = []
    for v in views:  # (B, T, 3, H, W) uint8
        padded = F.pad(v.flatten(0, 1).float(), (p, p, p, p), mode="replicate").unflatten(0, v.shape[:2])
        out.append(torch.stack([padded[b, ..., y:y + H, x:x + H] for b, (y, x) in enumerate(offsets)]).to(v.dtype))
    return out


def frame_target(images, model_cfg):
    """uint8 (B, T, 3, H, W) -> ImageNet-normalised patches (B, T, P, p*p*3), then per patch (x - mean) /
    (std + 1e-6) with the unbiased variance (MAE's norm_pix_loss) unless norm_pix_loss is off."""
    x = (images.float() / 255 - torch.tensor(MEAN, device=images.device).view(3, 1, 1)) / \
        torch.tensor(STD, device=images.device).view(3, 1, 1)
    x = patchify(x, model_cfg.patch)
    if model_cfg.norm_pix_loss:
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True).sqrt() + 1e-6)
    return x


def masked_mean(x, mask):  # x (..., *rest), mask broadcastable to x over the leading dims
    mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).expand_as(x).float()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def loss(model, batch, inputs, cfg):
    """Masked means over valid elements (Main.py). Frame t+3 comes from data.py (future=3), masked past the
    episode end. As the official code, which compares pred[:, :-3] with the window's own frames[:, 3:], the
    window's last 3 steps get no frame target, unless cfg.future_all_steps. Chunk targets past the episode
    end are masked (action_pad)."""
    valid, batch = left_align(batch)
    rgb, hand = batch["image_primary"], batch["image_wrist"]
    future, future_hand = batch["future_image_primary"], batch["future_image_wrist"]
    if model.training and cfg.shift > 0:  # independent per camera, shared by a sample's frames and targets
        rgb, future = random_shift([rgb, future], cfg.shift)
        hand, future_hand = random_shift([hand, future_hand], cfg.shift)
    arm, gripper = inputs.state(batch["state"], batch["dataset_id"])
    pred_arm, pred_gripper, pred_rgb, pred_hand = model(rgb, hand, arm, gripper, batch["instruction"], valid)
    seen = valid & ~batch["future_pad"]  # (B, T)
    if not cfg.future_all_steps:  # official: step t's target must lie inside the window
        seen = seen & (torch.arange(seen.shape[1], device=seen.device) < seen.shape[1] - cfg.future)
    l_rgb = masked_mean((pred_rgb.float() - frame_target(future, cfg)) ** 2, seen)
    l_hand = masked_mean((pred_hand.float() - frame_target(future_hand, cfg)) ** 2, seen)
    metrics = {"loss_static": l_rgb.detach(), "loss_hand": l_hand.detach()}
    total = l_rgb + l_hand
    if not cfg.pretrain:
        act = valid[..., None] & ~batch["action_pad"]  # (B, T, K)
        target = batch["action"]
        l_arm = masked_mean(F.smooth_l1_loss(pred_arm.float(), inputs.arm_target(target[..., :6], batch["dataset_id"]),
                                             reduction="none"), act)
        grip = target[..., 6].clamp(0, 1)  # 1 open, 0 closed
        l_grip = masked_mean(F.binary_cross_entropy_with_logits(pred_gripper.float(), grip, reduction="none"), act)
        total = total + cfg.arm_loss_weight * l_arm + l_grip
        metrics.update(loss_arm=l_arm.detach(), loss_gripper=l_grip.detach(),
                       gripper_acc=masked_mean(((pred_gripper > 0) == (grip > 0.5)).float(), act))
    return total, metrics


# ---------------------------------------------------------------------------------------------------
# 7. Predicted next to real frames

@torch.no_grad()
def render(model, batch, inputs, path, n=4):
    """A PNG grid, one row per sample at its last step t: static frame t | real t+3 | predicted t+3, then the
    same for the hand camera. With norm_pix_loss the model predicts each patch up to its mean and spread;
    these are taken from the real frame (as MAE's visualisation does), so only the structure inside a patch
    is the model's. Returns the grid (rows, 3, H, 6 W)."""
    import torchvision
    cfg, was_training = model.cfg, model.training
    model.eval()
    batch = {k: v[:n] for k, v in batch.items()}
    valid, batch = left_align(batch)
    arm, gripper = inputs.state(batch["state"], batch["dataset_id"])
    _, _, pred_rgb, pred_hand = model(batch["image_primary"], batch["image_wrist"], arm, gripper,
                                      batch["instruction"], valid)
    last = valid.sum(1) - 1  # (n,)
    rows = torch.arange(len(last))
    side = cfg.image_size // cfg.patch
    mean, std = (torch.tensor(x, device=pred_rgb.device).view(3, 1, 1) for x in (MEAN, STD))
    columns = []
    for now, future, pred in ((batch["image_primary"], batch["future_image_primary"], pred_rgb),
                              (batch["image_wrist"], batch["future_image_wrist"], pred_hand)):
        real = (future[rows, last].float() / 255 - mean) / std  # (n, 3, H, W) normalised
        pred = pred[rows, last].float()
        if cfg.norm_pix_loss:
            patches = patchify(real, cfg.patch)
            pred = pred * (patches.var(-1, keepdim=True).sqrt() + 1e-6) + patches.mean(-1, keepdim=True)
        pred = (unpatchify(pred, cfg.patch, side) * std + mean).clamp(0, 1)
        columns += [now[rows, last].float() / 255, future[rows, last].float() / 255, pred]
    model.train(was_training)
    grid = torch.stack(columns, 1)  # (n, 6, 3, H, W)
    torchvision.utils.save_image(grid.flatten(0, 1), path, nrow=6, padding=2)
    return grid


# ---------------------------------------------------------------------------------------------------
# 8. Loading official weights

def load_mae(model, path):
    """MAE's release (`mae_pretrain_vit_base.pth`: {"model": timm ViT state_dict}) into model.model_mae."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    own = model.model_mae.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"--mae_ckpt {path}: missing {missing[:5]} (expected MAE's {{'model': ViT state_dict}})")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"--mae_ckpt {path}: shapes differ from this config's ViT: {bad[:3]}")
    model.model_mae.load_state_dict({k: state[k] for k in own})


GPT_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
IGNORED = re.compile(r"^(model_clip\.|transformer\.wte\.|transformer\.h\.\d+\.attn\.(bias|masked_bias)$)")


def official_to_ours(state):
    """A Bytedance GR-1 (`snapshot_ABC.pt`) or GR1-Training (`GR1_*.pth`) state_dict -> this file's keys.
    Same names; the GPT's Conv1D weights are stored (in, out) and are transposed; CLIP (precomputed here),
    the unused `wte` and the attention mask buffers are dropped."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if IGNORED.match(k):
            continue
        out[k] = v.t() if GPT_CONV1D.match(k) else v
    return out


def load_official(model, path, log=print):
    """Load official GR-1 / GR-Chunk weights. model_mae.* loads if present (else keep --mae_ckpt's); a
    Bytedance checkpoint has no position table or chunk queries: as in GR1-Training they keep their init."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = official_to_ours(state.get("state_dict", state))
    own = model.state_dict()
    optional = ("model_mae.", "language.", "transformer.wpe.", "action_chunk_queries.")
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise KeyError(f"--gr1_ckpt {path}: missing {missing[:5]}, unexpected {unexpected[:5]} "
                       f"(is --variant {model.cfg.variant} right?)")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"--gr1_ckpt {path}: shapes differ (chunk size? image size?): {bad[:3]}")
    model.load_state_dict(state, strict=False)
    kept = sorted({k.split(".")[0] if not k.startswith("transformer.") else "transformer.wpe"
                   for k in own if k not in state and not k.startswith("language.")})
    log(f"gr1: loaded {len(state)} tensors from {path}; kept their own values: {kept or 'none'}")


def checkpoint_config(config):
    """The Config a checkpoint was trained with; those written before future_all_steps existed supervised
    every step (a loss setting: it changes nothing at evaluation)."""
    return Config(**{f.name: config.get(f.name, True) if f.name == "future_all_steps" else config[f.name]
                     for f in fields(Config)})


# ---------------------------------------------------------------------------------------------------
# 9. Policy: the simulator's interface (eval_sim.py)

class Policy:
    """Batched over environments. Keeps each environment's last T frames as observation tokens (the frozen
    encoders make a frame's tokens independent of the others, spec pitfall 9), left-aligned as in the official
    evaluation: at an episode's start the window holds 1 step, then 2, ... up to T. Every `test_chunk_size`
    steps it predicts and then executes the first `test_chunk_size` actions of the last step's chunk;
    frames seen in between do not enter the window (official). Statistics: the source whose state width
    matches the observation (MetaWorld 4, CALVIN 15)."""
    views = ("image_primary", "image_wrist")  # the observation images it reads

    def __init__(self, model, stats, clip_ckpt=None):
        self.model, self.inputs, self.stats, self.clip_ckpt = model.eval(), Inputs(stats), stats, clip_ckpt
        self.device = next(model.parameters()).device
        self.features = {}

    @classmethod
    def from_checkpoint(cls, ckpt, device):
        """The checkpoint's clip_ckpt is only ever read as weights: a TorchScript file there is refused."""
        config = ckpt["config"]
        cfg = checkpoint_config(config)
        table = torch.zeros(len(config["vocabulary"]), cfg.lang_dim) if config["language"] != "learned" else None
        model = GR1(cfg, config["vocabulary"], table)
        model.load_state_dict(ckpt["model"])
        return cls(model.to(device), ckpt["stats"], config.get("clip_ckpt"))

    def reset(self, num_envs):
        self.tokens, self.pending = None, []

    def source(self, state_dim):
        for i, s in enumerate(self.stats):
            if len(s["state"]["mean"]) == state_dim:
                return i
        raise ValueError(f"no training source has a {state_dim}-d state: "
                         f"{[(s['name'], len(s['state']['mean'])) for s in self.stats]}")

    def language(self, instructions):
        """Strings the model knows; else CLIP features when it was trained on CLIP's (--clip_ckpt)."""
        if all(s in self.model.language.vocabulary for s in instructions) or not self.clip_ckpt:
            return instructions
        new = sorted({s for s in instructions if s not in self.features and s not in self.model.language.vocabulary})
        if new:
            self.features.update(zip(new, clip_features(new, self.clip_ckpt)))
        known = self.model.language.table
        return torch.stack([self.features[s] if s in self.features else known[self.model.language.vocabulary[s]].cpu()
                            for s in instructions]).to(self.device)

    def _image(self, x):  # uint8 (N, 3, h, w) numpy -> uint8 (N, 1, 3, S, S) on the device
        """Resized as main's data.load(interpolation="bicubic_float") (data.resize): bicubic with antialias on float,
        as GR1-Training's PreProcess, then rounded back to uint8 as the training frames are stored."""
        x = torch.as_tensor(np.asarray(x))  # (N, 3, h, w) uint8
        size = self.model.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = TF.resize(x.float(), [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            x = x.round_().clamp_(0, 255).to(torch.uint8)  # (N, 3, S, S)
        return x.to(self.device)[:, None]

    @torch.inference_mode()
    def act(self, obs, instructions):  # -> (N, 7) standard actions, gripper 1 open / 0 closed
        if self.pending:
            return self.pending.pop(0)
        state = torch.as_tensor(obs["state"], dtype=torch.float32)[:, None]  # (N, 1, S)
        ids = torch.full((len(state),), self.source(state.shape[-1]))
        arm, gripper = self.inputs.state(state, ids)
        tokens = self.model.observation_tokens(self._image(obs["image_primary"]), self._image(obs["image_wrist"]),
                                               arm.to(self.device), gripper.to(self.device))  # (N, 1, 21, d)
        if self.tokens is not None:
            tokens = torch.cat([self.tokens, tokens], 1)[:, -self.model.cfg.history:]  # the last T frames
        self.tokens = tokens
        pred_arm, pred_gripper = self.model.predict_last_actions(self.tokens, self.language(instructions))
        n = max(1, min(self.model.cfg.test_chunk_size, self.model.cfg.chunk_size))
        arm = self.inputs.arm_action(pred_arm[:, :n].float().cpu().transpose(0, 1), ids)  # (n, N, 6)
        grip = (pred_gripper[:, :n].float().cpu().t() > 0).float()  # (n, N): 1 open
        actions = torch.cat([arm, grip[..., None]], -1).numpy().astype(np.float32)  # (n, N, 7)
        self.pending = list(actions[1:])
        return actions[0]


# ---------------------------------------------------------------------------------------------------
# 10. Command line: data -> train -> predicted frames -> MetaWorld evaluation

# The CPU default: the paper's model is ~1 TFLOP per training sample (the frozen MAE ViT-B: 88%) and cannot
# train on 2 cores. Same architecture and losses, cut in size (see main's print). With 4 steps of history the
# official rule would give a frame target to step 0 only: every step gets its frame t+3. No random shift:
# at this budget the DrQ shift cost success (README, GR-1: 48.2% without it over two seeds, 36.8% with it).
CPU_STEPS = 1600
CPU = dict(image_size=64, history=4, patch=16, vit_dim=128, vit_layers=4, vit_heads=4, freeze_vit=False,
           resampler_depth=2, resampler_heads=4, resampler_dim_head=32, d_model=128, layers=4, heads=4, mlp=512,
           decoder_layers=1, decoder_heads=4, dropout=0.0, future_all_steps=True, shift=0.0)


def language_table(ds, clip_ckpt, torchscript=False):
    """-> (kind, table or None, description): CLIP features per distinct instruction when --clip_ckpt is
    given (the paper), else the dataset's own embedding per instruction, else a learned embedding."""
    if clip_ckpt:
        return ("clip", clip_features(ds.instructions, clip_ckpt, torchscript),
                f"frozen CLIP ViT-B/32 text features ({clip_ckpt})")
    if ds.has_embedding:
        index = {s: i for i, s in enumerate(ds.instructions)}
        table = np.zeros((len(index), ds.sources[0].embedding.shape[1]), np.float32)
        for src in ds.sources:
            for e in range(len(src.embedding)):
                table[index[src.instructions[src.instruction[e]]]] = src.embedding[e]
        return "dataset", torch.from_numpy(table), f"the dataset's {table.shape[1]}-d instruction embedding"
    return "learned", None, "a learned embedding per instruction (no --clip_ckpt, no dataset embedding)"


def main():
    import argparse
    import data
    import eval_sim
    import train

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_args(p)
    p.add_argument("--mae_ckpt", help="MAE ViT-B/16 weights (mae_pretrain_vit_base.pth); without: see the prints")
    p.add_argument("--clip_ckpt", help="OpenAI CLIP ViT-B/32 weights (a state_dict with OpenAI's key names); without: "
                                       "the dataset's instruction embedding, else a learned one per instruction")
    p.add_argument("--clip_torchscript", action="store_true",
                   help="--clip_ckpt may be a TorchScript archive (OpenAI's ViT-B-32.pt): loading one runs the code "
                        "it holds, so only for a file you trust; the run keeps its text tower as OUT_DIR/clip_text.pt")
    p.add_argument("--gr1_ckpt", help="start from official weights: Bytedance snapshot_ABC.pt or GR1-Training "
                                      "GR1_*.pth")
    p.add_argument("--render", metavar="CKPT", help="only write predicted vs real frames of CKPT for --data")
    p.add_argument("--eval_tasks", default="mt10")
    p.add_argument("--eval_episodes", type=int, default=None,
                   help="MetaWorld episodes per task after training (default: 20 with the default MetaWorld data, "
                        "else 0: none)")
    known = p.parse_known_args()[0]
    small = not gpu and not known.mae_ckpt and not known.gr1_ckpt
    # GR1-Training's GR-Chunk recipe: AdamW lr 9e-4, weight decay 1e-4, batch 456 (19 x 8 GPUs x 3 accumulation),
    # cosine after a warm-up of one epoch, no clipping, bf16; 20 epochs of CALVIN ABC (~40k steps).
    # Deviation (train.py): no weight decay on biases and norms.
    cfg = Config(**CPU) if small else Config()
    tcfg = train.TrainConfig(out_dir="runs/gr1", steps=40_000, batch_size=456, grad_accum=3, lr=9e-4, min_lr=0.0,
                             warmup=2_000, weight_decay=1e-4, grad_clip=0.0, ckpt_every=2_000, log_every=50)
    if not gpu:  # a short run from scratch: a higher lr, a 10% warm-up, clipping as a guard (official: none);
        # CPU_STEPS of batch 16 and the mt10 evaluation fit ~30 minutes on 2 cores (README, Results)
        tcfg = train.TrainConfig(out_dir="runs/gr1", steps=CPU_STEPS, batch_size=16, lr=1e-3, min_lr=1e-4,
                                 warmup=CPU_STEPS // 10, weight_decay=1e-4, grad_clip=1.0, ckpt_every=250, log_every=10)
    args, (cfg, tcfg) = train.parse_args(cfg, tcfg, parser=p)
    if cfg.variant == "gr-1" and cfg.chunk_size != 1:
        raise SystemExit("gr1.py: --variant gr-1 is Bytedance's single-action GR-1: add --chunk_size 1")
    if args.render:
        ckpt = train.load_checkpoint(args.render)
        cfg = checkpoint_config(ckpt["config"])  # the checkpoint's window
    elif cfg.history <= cfg.future and not cfg.future_all_steps:
        raise SystemExit(f"gr1.py: a {cfg.history}-step window holds no frame t+{cfg.future} to predict (the official "
                         f"rule): add --future_all_steps or use --history above {cfg.future}")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    log = print if rank0 else (lambda *a: None)
    if small and not args.render:
        patches = (cfg.image_size // cfg.patch) ** 2
        log(f"gr1: no GPU, so the CPU default (the paper's in brackets): {cfg.image_size} px [224], "
            f"{cfg.history} steps [10], a {cfg.vit_layers} x {cfg.vit_dim} ViT/{cfg.patch} with {patches} patches "
            f"TRAINED from scratch [frozen MAE ViT-B/16, 12 x 768, 196 patches: no --mae_ckpt], resampler "
            f"{cfg.resampler_depth} layers of {cfg.vit_dim} [3 of 768], GPT {cfg.layers} x {cfg.d_model} [12 x 384], "
            f"decoder {cfg.decoder_layers} block [2], no dropout [0.1], random shift {cfg.shift:g} "
            f"[{Config().shift:g}], frame t+3 at every step [the first {Config().history - Config().future} of "
            f"{Config().history}]; {tcfg.steps} steps of batch {tcfg.batch_size} [~40k of 456]")

    spec = args.data or eval_sim.default_data()
    ds = data.load(spec, args.split, data.keys_from(args), args.calvin_all_frames, history=cfg.history,
                   chunk=cfg.chunk_size, image_size=cfg.image_size, views=("primary", "wrist"), future=cfg.future,
                   seed=tcfg.seed, interpolation="bicubic_float",  # GR1-Training's resize (Policy._image: the same)
                   cache_frames=args.cache_frames)
    inputs = Inputs(ds.stats)
    if args.render:  # the batch's dataset_id must index the checkpoint's sources: render on its own data
        batch = next(iter(data.loader(ds, 4, 0, 1, tcfg.seed, 0, 0)))
        path = os.path.join(os.path.dirname(args.render), "predictions.png")
        render(Policy.from_checkpoint(ckpt, "cpu").model, batch, Inputs(ckpt["stats"]), path)
        return print(f"gr1: predicted vs real frames t+{cfg.future} in {path}")

    kind, table, language = language_table(ds, args.clip_ckpt, args.clip_torchscript)
    clip_ckpt = args.clip_ckpt
    if clip_ckpt and args.clip_torchscript:  # the checkpoint names a plain state_dict: evaluation loads no TorchScript
        clip_ckpt = os.path.abspath(os.path.join(tcfg.out_dir, "clip_text.pt"))
        if rank0:
            save_clip_text(args.clip_ckpt, clip_ckpt)
    if table is not None:
        cfg = replace(cfg, lang_dim=table.shape[1])  # CLIP 512, CALVIN's MiniLM 384, OXE's USE 512
    torch.manual_seed(tcfg.seed)  # the initial weights: the same run twice starts from the same model
    model = GR1(cfg, ds.instructions, table)
    if args.mae_ckpt:
        load_mae(model, args.mae_ckpt)
    if args.gr1_ckpt:
        load_official(model, args.gr1_ckpt, log)
    vit = (f"MAE weights from {args.mae_ckpt}" if args.mae_ckpt else f"official weights ({args.gr1_ckpt})"
           if args.gr1_ckpt else "random init") + (", frozen" if cfg.freeze_vit else ", trained")
    if cfg.freeze_vit and not (args.mae_ckpt or args.gr1_ckpt):
        log("gr1: WARNING: a frozen, randomly initialised ViT: give --mae_ckpt or --no-freeze_vit")
    log(f"gr1: data {spec} | language: {language} | ViT: {vit} | {cfg.variant}, chunk {cfg.chunk_size} | "
        f"{'video prediction only (--pretrain)' if cfg.pretrain else 'actions + video prediction'} | arm actions: "
        f"{inputs.describe()} | frame t+{cfg.future}: "
        f"{'every step' if cfg.future_all_steps else f'the first {cfg.history - cfg.future} steps (official)'}")
    config = {**asdict(cfg), "vocabulary": ds.instructions, "language": kind, "clip_ckpt": clip_ckpt}
    if cfg.pretrain:  # the action head gets no gradient: DDP must be told
        tcfg = replace(tcfg, find_unused=True)
    model = train.train(model, lambda m, b: loss(m, b, inputs, cfg), ds, tcfg, method="gr1", config=config)

    if rank0:
        batch = next(iter(data.loader(ds, 4, 0, 1, tcfg.seed + 1, 0, 0)))
        device = next(model.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        render(model, batch, inputs, os.path.join(tcfg.out_dir, "predictions.png"))
        log(f"gr1: predicted vs real frames t+{cfg.future} in {os.path.join(tcfg.out_dir, 'predictions.png')}")
    episodes = args.eval_episodes if args.eval_episodes is not None else 20 * (args.data is None)
    if rank0 and episodes > 0 and not cfg.pretrain:
        results = eval_sim.evaluate(Policy(model, ds.stats, clip_ckpt), args.eval_tasks, episodes,
                                    out_dir=os.path.join(tcfg.out_dir, "eval"), method="gr1", size=128)
        train.log_evaluation(tcfg, results)  # --log: the success rates beside the training's rows


if __name__ == "__main__":
    import train
    train.cli(main)  # bad input (data, checkpoint, flags): one line and exit status 2

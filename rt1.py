"""rt1.py: RT-1, the Robotics Transformer (Brohan et al., "RT-1: Robotics Transformer for Real-World Control at
Scale", arXiv 2212.06817, 2022), in one file.

Official code: google-research/robotics_transformer (TF/Keras; transformer_network.py, transformer.py,
tokenizers/{image_tokenizer,token_learner,action_tokenizer}.py, film_efficientnet/). Where the paper and
that code differ, this file follows the code and says so (facts: ../shared/specs/rt1_gcbc.md, Part A).

    6 frames --FiLM-EfficientNet-B3 (instruction)--> 9x9 (here 10x10) x 512 --TokenLearner--> 8 tokens/frame
    [8 image tokens | 7 action slots] x 6 steps --8-layer causal transformer--> 256-way logits per action dim

    python rt1.py                                       # MetaWorld MT10: collect (once), train, evaluate
    python rt1.py --data PATH --out_dir runs/rt1        # any data.py source or mixture (a:0.7,b:0.3)
    torchrun --nproc_per_node=8 rt1.py --data PATH      # DDP on 8 GPUs
    python eval_sim.py evaluate --ckpt runs/rt1/ckpt.pt --tasks mt10 --episodes 20
    python rt1.py --token_accuracy runs/rt1/ckpt.pt     # does it read its frames? (vs a frame-blind baseline)
"""
import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torchvision.models.efficientnet import MBConvConfig


@dataclass
class Config:
    image_size: int = 300          # frames are resized to image_size x image_size (A1: 300x300, aspect ignored)
    history: int = 6               # T: frames of history (gin SEQUENCE_LENGTH)
    width_mult: float = 1.2        # EfficientNet-B3 width multiplier
    depth_mult: float = 1.4        # EfficientNet-B3 depth multiplier (26 MBConv blocks)
    stochastic_depth: float = 0.2  # EfficientNet's drop-path rate, scaled by block index
    lang_dim: int = 512            # instruction embedding (Universal Sentence Encoder large v5: 512-d)
    tokens_per_image: int = 8      # TokenLearner output tokens per frame
    d_model: int = 512             # transformer width (the official code calls it feed_forward_size)
    layers: int = 8                # transformer blocks
    heads: int = 8                 # attention heads
    head_dim: int = 128            # per-head key/value width (the official code calls it layer_size)
    dropout: float = 0.1           # on attention probabilities and after the feed-forward layer
    action_dim: int = 7            # action tokens per step: the standard 7-d action (official: 11, see RT1)
    bins: int = 256                # uniform bins per action dimension (A3)
    shift: tuple = (20 / 256, 50 / 320)  # training: random translation up to these fractions of (H, W): the
                                         # official 20 of 256 rows and 50 of 320 columns ((0, 0): none)
    torchvision_bn: bool = field(default=False, metadata={"from_data": True})  # EfficientNet BatchNorm: Keras's
                                         # eps and momentum, or torchvision's (set by --imagenet_weights)


# ---------------------------------------------------------------------------------------------------
# 1. Image tokenizer: FiLM-conditioned EfficientNet-B3 + TokenLearner

class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018): x * (1 + gamma(c)) + beta(c). Both projections
    start at zero (weights and biases), so the layer is the identity at init and pretrained features pass
    through unchanged (official film_conditioning_layer.py)."""

    def __init__(self, cond_dim, channels):
        super().__init__()
        self.add, self.mult = nn.Linear(cond_dim, channels), nn.Linear(cond_dim, channels)
        for layer in (self.add, self.mult):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, cond):  # x (N, C, H, W), cond (N, D)
        beta, gamma = self.add(cond)[:, :, None, None], self.mult(cond)[:, :, None, None]
        return x * (1 + gamma) + beta


def efficientnet_features(width_mult, depth_mult, stochastic_depth, torchvision_bn=False):
    """torchvision's EfficientNet trunk (stem, MBConv stages, 1x1 head conv); B3 = (1.2, 1.4). Its keys are
    those of torchvision's `features`, so an ImageNet state_dict loads into it as is.

    BatchNorm: from random weights, the official Keras graph's eps 1e-3 and momentum 0.99 (Keras keeps 0.99 of
    the running statistic: torch momentum 0.01). For torchvision's ImageNet weights (`torchvision_bn`), the
    eps 1e-5 they were trained with (ported from timm, trained in PyTorch) and torch's momentum 0.1. (The
    official loads Keras ImageNet weights, trained with Keras's BatchNorm; those are not used here.)"""
    conf = lambda *a: MBConvConfig(*a, width_mult=width_mult, depth_mult=depth_mult)
    stages = [conf(1, 3, 1, 32, 16, 1), conf(6, 3, 2, 16, 24, 2), conf(6, 5, 2, 24, 40, 2),  # EfficientNet-B0,
              conf(6, 3, 2, 40, 80, 3), conf(6, 5, 1, 80, 112, 3), conf(6, 5, 2, 112, 192, 4),  # Tan & Le 2019,
              conf(6, 3, 1, 192, 320, 1)]                                                     # Table 1
    norm = nn.BatchNorm2d if torchvision_bn else lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
    net = torchvision.models.EfficientNet(stages, dropout=0.0, stochastic_depth_prob=stochastic_depth,
                                          norm_layer=norm).features
    for m in net.modules():  # Keras EfficientNet CONV_KERNEL_INITIALIZER (torchvision: an untruncated normal)
        if isinstance(m, nn.Conv2d):
            # mode fan_out: Keras's fan_out of a (k, k, in, out) kernel is k*k*out and of a depthwise (k, k, C, 1)
            # kernel k*k; torch's kaiming counts all C channels of a depthwise conv, a sqrt(C) x smaller std
            variance_scaling_(m.weight, 2.0, fan=m.out_channels // m.groups * math.prod(m.kernel_size))
    return net


def variance_scaling_(weight, scale, fan):
    """Keras VarianceScaling(scale, distribution="truncated_normal"): a normal cut at 2 std whose std after the
    cut is sqrt(scale / fan); 0.8796 is the std of a standard normal truncated to [-2, 2]."""
    std = math.sqrt(scale / fan) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class FiLMEfficientNet(nn.Module):
    """Frames + instruction -> (N, d_model, h, w) feature map. A FiLM layer after every MBConv block, then
    a 1x1 conv to d_model and one more FiLM. At 300x300 torchvision's symmetric padding gives a 10x10 map
    where the Keras graph gives 9x9 (spec A2.4); TokenLearner makes 8 tokens of either."""

    def __init__(self, cfg):
        super().__init__()
        self.net = efficientnet_features(cfg.width_mult, cfg.depth_mult, cfg.stochastic_depth, cfg.torchvision_bn)
        blocks = [b for stage in self.net[1:-1] for b in stage]  # 26 MBConv blocks in B3
        self.films = nn.ModuleList(FiLM(cfg.lang_dim, b.out_channels) for b in blocks)
        self.conv1x1 = nn.Conv2d(self.net[-1].out_channels, cfg.d_model, 1, bias=False)  # 1536 -> 512
        variance_scaling_(self.conv1x1.weight, 1.0, fan=self.conv1x1.in_channels)  # official VarianceScaling():
        # scale 1, fan_in, truncated normal: std 1/sqrt(1536) = 0.0255 (torch's default would be 0.0147)
        self.film = FiLM(cfg.lang_dim, cfg.d_model)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, cond):  # images uint8 (N, 3, H, W), cond (N, lang_dim)
        x = (images.float() / 255 - self.mean) / self.std  # ImageNet normalisation (spec A1)
        x = self.net[0](x)  # stem
        films = iter(self.films)
        for stage in self.net[1:-1]:
            for block in stage:
                x = next(films)(block(x), cond)
        x = self.net[-1](x)  # (N, 1536, h, w)
        return self.film(self.conv1x1(x), cond)  # (N, 512, h, w)


class TokenLearner(nn.Module):
    """TokenLearner v1.1 (Ryoo et al. 2021; official token_learner.py): an MLP on the layer-normed features
    gives `num_tokens` attention maps over the h*w positions; each token is a weighted sum of the
    un-normalised features."""

    def __init__(self, dim, num_tokens, hidden=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, num_tokens))
        for layer in (self.mlp[0], self.mlp[2]):  # Keras: glorot-uniform kernels, N(0, 1e-6) biases
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x):  # (N, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, hw, C)
        weights = self.mlp(self.norm(x)).softmax(dim=1)  # (N, hw, S): softmax over positions
        return weights.transpose(1, 2) @ x  # (N, S, C)


# ---------------------------------------------------------------------------------------------------
# 2. Transformer: decoder-only, causal over time (official transformer.py, transformer_network.py)

class Block(nn.Module):
    """Pre-LN block as in the official code: x += MHA(LN(x)); x += Dropout(FF(LN(x))), where FF is a single
    d_model -> d_model linear layer with no activation, and the attention is 8 heads x 128 (1024 wide)."""

    def __init__(self, cfg):
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-6), nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner) for _ in range(3))
        self.out = nn.Linear(inner, cfg.d_model)
        self.ff = nn.Linear(cfg.d_model, cfg.d_model)
        self.heads, self.dropout = cfg.heads, cfg.dropout
        # Keras MultiHeadAttention keeps 3-D kernels, Q/K/V (d_model, heads, head_dim) and output (heads,
        # head_dim, d_model), and Keras 2's glorot multiplies both fans by the leading axes (glorot_uniform_): a
        # std of 0.0054 for Q/K/V and 0.020 for the output here, not the 0.036 of a glorot on the 1024 x 512
        # matrix. (Keras 3 computes the fans from the einsum's axes and gets the 0.036; the official code and
        # its checkpoints are Keras 2.) Biases and the feed-forward Dense: zeros and a plain glorot, as Keras.
        qkv, out = (cfg.d_model, cfg.heads, cfg.head_dim), (cfg.heads, cfg.head_dim, cfg.d_model)
        ff = (cfg.d_model, cfg.d_model)
        for layer, shape in [(self.q, qkv), (self.k, qkv), (self.v, qkv), (self.out, out), (self.ff, ff)]:
            glorot_uniform_(layer.weight, shape)
            nn.init.zeros_(layer.bias)

    def forward(self, x, mask):  # x (B, L, d), mask bool (L, L), True = may attend
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, head_dim)
        h = self.norm1(x)
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(a.transpose(1, 2).flatten(2))
        return x + F.dropout(self.ff(self.norm2(x)), self.dropout, self.training)


def glorot_uniform_(weight, keras_shape):
    """Keras 2 glorot_uniform for a kernel of `keras_shape`, held here as the 2-D `weight`: U(-l, l) with
    l = sqrt(6 / (fan_in + fan_out)), fan_in = shape[-2] * r, fan_out = shape[-1] * r, r = prod(shape[:-2])."""
    r = math.prod(keras_shape[:-2])
    limit = math.sqrt(6 / (keras_shape[-2] * r + keras_shape[-1] * r))
    return nn.init.uniform_(weight, -limit, limit)


def attention_mask(steps, n_image, n_action):
    """(L, L) bool, True = may attend, L = steps * (n_image + n_action). Causal, minus every action slot ->
    action slot pair: an action slot sees only the image tokens of its own and earlier steps (A2)."""
    L, per_step = steps * (n_image + n_action), n_image + n_action
    is_action = torch.arange(L) % per_step >= n_image
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return causal & ~(is_action[:, None] & is_action[None, :])


class Transformer(nn.Module):
    """Image tokens (B, T, n, d) -> action logits (B, T, A, bins). Each step is [n image tokens][A action
    slots]; the slots hold no action (the official code embeds the actions and then replaces them with
    zeros, issue #16), so one forward pass gives every action dimension: RT-1 is not autoregressive."""

    def __init__(self, cfg):
        super().__init__()
        n, A = cfg.tokens_per_image, cfg.action_dim
        self.n_image, self.n_action = n, A
        self.token_emb = nn.Linear(cfg.d_model, cfg.d_model)
        self.position = nn.Linear(cfg.history * (n + A), cfg.d_model)  # official: Dense on a one-hot position
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.d_model, cfg.bins)  # no final LayerNorm in the official code
        # Keras Dense defaults: glorot-uniform kernel, zero bias (the blocks initialise their own layers).
        # With 16 residual additions and no final LayerNorm the initial logits have a std of ~3.5 (measured on
        # random 64 px frames): the loss starts well above ln(256) = 5.5.
        for m in (self.token_emb, self.position, self.head):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.register_buffer("mask", attention_mask(cfg.history, n, A), persistent=False)
        # the logits for action dim k of step t come from one position earlier: t*(n+A) + n - 1 + k
        readout = torch.arange(cfg.history)[:, None] * (n + A) + n - 1 + torch.arange(A)[None]
        self.register_buffer("readout", readout, persistent=False)  # (T, A)

    def forward(self, image_tokens):  # (B, T, n, d)
        B, T, n, d = image_tokens.shape
        slots = image_tokens.new_zeros(B, T, self.n_action, d)
        x = torch.cat([image_tokens, slots], 2).flatten(1, 2)  # (B, L, d), L = T * (n + A)
        L = x.shape[1]
        position = self.position.weight[:, :L].t() + self.position.bias  # one-hot(position) @ W + b: (L, d)
        x = self.token_emb(x) + position
        for block in self.blocks:
            x = block(x, self.mask[:L, :L])
        return self.head(x)[:, self.readout[:T]]  # (B, T, A, bins)


class RT1(nn.Module):
    """Frames + instruction -> action-token logits for every history step.

    Language: the dataset's embedding (`embedding`, (B, lang_dim)) or, for closed-vocabulary data, a learned
    embedding per instruction string (`vocabulary` given, `instruction` a list of strings).
    Parameters (paper config with the official 11 action tokens, test_rt1.py): tokenizer 15,744,160 and
    transformer 19,376,384 exactly as the official 35,252,128, less the official _action_token_emb
    (256 -> 512, 131,584) whose output the official code replaces by zeros and which is omitted here."""

    def __init__(self, cfg, vocabulary=None):
        super().__init__()
        self.cfg = cfg
        self.vocabulary = {s: i for i, s in enumerate(vocabulary)} if vocabulary else None
        if self.vocabulary:
            self.instruction_emb = nn.Embedding(len(self.vocabulary), cfg.lang_dim)
        self.encoder = FiLMEfficientNet(cfg)
        self.token_learner = TokenLearner(cfg.d_model, cfg.tokens_per_image)
        self.transformer = Transformer(cfg)

    def language(self, instruction=None, embedding=None):  # -> (B, lang_dim)
        if self.vocabulary is None:
            if embedding is None:
                raise ValueError("this model was trained on the dataset's instruction embeddings: pass embedding")
            return embedding
        unknown = sorted({s for s in instruction if s not in self.vocabulary})
        if unknown:
            raise KeyError(f"instruction(s) {unknown} are not among the {len(self.vocabulary)} this model learned")
        index = torch.tensor([self.vocabulary[s] for s in instruction], device=self.instruction_emb.weight.device)
        return self.instruction_emb(index)

    def tokenize(self, images, instruction=None, embedding=None):  # images uint8 (B, T, 3, H, W)
        B, T = images.shape[:2]
        if self.training and any(self.cfg.shift):
            images = random_shift(images, self.cfg.shift)
        cond = self.language(instruction, embedding).repeat_interleave(T, 0)  # the instruction tiled over T
        features = self.encoder(images.flatten(0, 1), cond)  # (B*T, d, h, w)
        return self.token_learner(features).unflatten(0, (B, T))  # (B, T, n, d)

    def forward(self, images, instruction=None, embedding=None):
        return self.transformer(self.tokenize(images, instruction, embedding))  # (B, T, A, bins)


def random_shift(images, fraction):
    """Pad with zeros, then crop back at one random offset for the whole batch: a translation of up to
    fraction[0] * H rows and fraction[1] * W columns either way. The official
    convert_dtype_and_crop_images(pad_then_crop=True) does this to the 256 x 320 frame before its resize to
    300 x 300, by up to 20 rows and 50 columns; our frames arrive resized (data.py), so the default shifts the
    same proportion of each axis, 20/256 of the rows and 50/320 of the columns, in whole pixels of the resized
    frame (at 300 px up to 23 rows and 47 columns; the official's whole source pixels are up to 23.4 and 46.9
    resized ones). The offset stays a tensor: no host sync, no graph break under torch.compile."""
    H, W = images.shape[-2:]
    ph, pw = round(fraction[0] * H), round(fraction[1] * W)
    padded = F.pad(images, (pw, pw, ph, ph))  # (..., H + 2ph, W + 2pw)
    top = torch.randint(0, 2 * ph + 1, (), device=images.device)
    left = torch.randint(0, 2 * pw + 1, (), device=images.device)
    rows, cols = top + torch.arange(H, device=images.device), left + torch.arange(W, device=images.device)
    return padded.index_select(-2, rows).index_select(-1, cols)  # (..., H, W)


# ---------------------------------------------------------------------------------------------------
# 3. Actions: each source's 1st/99th percentiles as the bounds, 256 uniform bins between them

class ActionTokenizer:
    """Standard actions <-> tokens, per source of a mixture (`dataset_id`), with the official arithmetic
    (action_tokenizer.py) and each dimension's [q01, q99] in the place of the official action spec's
    [minimum, maximum] (the official data lies in fixed bounds; ours comes from many sources):
    encode: a = clip(a, low, high); token = floor((a - low) / (high - low) * 255), computed in this order in
    float32, so an action exactly on a bin edge gets the official token; decode: the bin's lower edge,
    token / 255 * (high - low) + low. A round trip loses less than one bin width, always downwards, and the
    bounds come back exactly. A dimension of zero width (MetaWorld's rotations are always 0) is divided by 1
    instead of 0 on encode (token 0) and decodes to its constant."""

    def __init__(self, stats, bins=256):
        self.low = torch.tensor([s["action"]["q01"] for s in stats], dtype=torch.float32)  # (sources, A)
        self.high = torch.tensor([s["action"]["q99"] for s in stats], dtype=torch.float32)
        self.width = self.high - self.low
        self.bins = bins

    def encode(self, action, dataset_id):  # action (B, ..., A), dataset_id (B,) -> long tokens (B, ..., A)
        shape = (len(dataset_id),) + (1,) * (action.ndim - 2) + (-1,)
        low, high, width = (x.to(action.device)[dataset_id].view(shape) for x in (self.low, self.high, self.width))
        width = torch.where(width > 0, width, torch.ones_like(width))
        a = torch.minimum(torch.maximum(action.float(), low), high)  # tf.clip_by_value
        return torch.floor((a - low) / width * (self.bins - 1)).long()  # the official int cast of a value >= 0

    def decode(self, tokens, dataset_id):  # tokens (B, A), dataset_id (B,) -> action (B, A)
        low, width = (x.to(tokens.device)[dataset_id] for x in (self.low, self.width))
        return tokens.float() / (self.bins - 1) * width + low


# ---------------------------------------------------------------------------------------------------
# 4. Loss: cross-entropy over the 256 bins of every action dimension of every history step

def loss(model, batch, tokenizer):
    """Mean cross-entropy over all valid (sample, step, dimension) tokens. The official loss divides by a
    batch-size constant and masks each episode's last step (a tf_agents artefact: data.py gives that step
    its real action); this is the plain mean (spec A4). History steps before the episode start repeat the
    first frame (obs_pad) and are not supervised: their target would repeat step 0's."""
    logits = model(batch["image_primary"], batch["instruction"], batch.get("language_embedding"))  # (B,T,A,bins)
    A = logits.shape[2]
    target = tokenizer.encode(batch["action"][:, :, 0, :A], batch["dataset_id"])  # (B, T, A)
    valid = ~(batch["obs_pad"] | batch["action_pad"][:, :, 0])  # (B, T)
    ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view(target.shape)
    weight = valid[..., None].expand_as(ce).float()
    correct = (logits.argmax(-1) == target).float()
    return (ce * weight).sum() / weight.sum(), {"token_acc": (correct * weight).sum() / weight.sum(),
                  "last_step_acc": correct[:, -1].mean()}  # the step the policy acts on


# ---------------------------------------------------------------------------------------------------
# 5. Policy: the simulator's interface (eval_sim.py)

class Policy:
    """Batched over environments. Keeps each environment's last T frames as image tokens (the official
    policy's "token reuse": with BatchNorm in eval mode a frame's tokens do not depend on other frames), so
    every step runs the tokenizer on one new frame only. At an episode start the history is the first
    frame repeated, as data.py pads training windows, and the action is read at the last step."""
    views = ("image_primary",)  # the observation images it reads: eval_sim draws no other camera

    def __init__(self, model, tokenizer, dataset_id=0):
        self.model, self.tokenizer, self.dataset_id = model.eval(), tokenizer, dataset_id
        self.device = next(model.parameters()).device
        self.history = None

    @classmethod
    def from_checkpoint(cls, ckpt, device):
        config = ckpt["config"]
        cfg = Config(**{f.name: config[f.name] for f in fields(Config)})
        model = RT1(cfg, vocabulary=config["vocabulary"])
        model.load_state_dict(ckpt["model"])
        return cls(model.to(device), ActionTokenizer(ckpt["stats"], cfg.bins), metaworld_source(ckpt["stats"]))

    def reset(self, num_envs):
        self.history = None

    @torch.inference_mode()
    def act(self, obs, instructions):  # obs["image_primary"] uint8 (N, 3, H, W) -> (N, 7)
        size = self.model.cfg.image_size
        images = torch.from_numpy(obs["image_primary"])
        if images.shape[-2:] != (size, size):
            images = TF.resize(images, [size, size], antialias=True)  # uint8 on the CPU, as data.py resizes
        images = images.to(self.device)
        tokens = self.model.tokenize(images[:, None], instructions)  # (N, 1, n, d)
        if self.history is None:
            self.history = tokens.repeat(1, self.model.cfg.history, 1, 1)  # (N, T, n, d)
        else:
            self.history = torch.cat([self.history[:, 1:], tokens], 1)
        logits = self.model.transformer(self.history)[:, -1]  # (N, A, bins); the action decodes from argmax tokens
        dataset_id = torch.full((len(images),), self.dataset_id, device=self.device)
        action = self.tokenizer.decode(logits.argmax(-1), dataset_id).cpu().numpy()
        out = np.zeros((len(images), 7), np.float32)
        out[:, :action.shape[1]] = action[:, :7]
        return out


def metaworld_source(stats):
    """The source whose statistics a MetaWorld policy acts with: the one named metaworld, else the first."""
    names = [s.get("name") for s in stats]
    return names.index("metaworld") if "metaworld" in names else 0


# ---------------------------------------------------------------------------------------------------
# 6. Diagnosis: does the model read its frames? (python rt1.py --token_accuracy CKPT)

DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


@torch.inference_mode()
def token_accuracy(model, tokenizer, ds, samples=2048, batch=128, seed=0):
    """Per action dimension, on `samples` windows of the first source (seeded): how often the argmax token at the
    acting step (the window's last) is the target token, and its mean distance in bins, beside the same two for
    each instruction's most frequent token, the best a model blind to the frames can do. -> {dim: 4 numbers}."""
    src, model = ds.sources[0], model.eval()
    steps = np.random.default_rng(seed).choice(len(src.action), min(samples, len(src.action)), replace=False)
    tasks = src.instruction[np.searchsorted(src.start, np.arange(len(src.action)), side="right") - 1]  # per step
    predicted, target = [], []
    for i in range(0, len(steps), batch):
        b = torch.utils.data.default_collate([ds[(0, int(s), 0)] for s in steps[i:i + batch]])
        logits = model(b["image_primary"], b["instruction"], b.get("language_embedding"))[:, -1]  # (B, A, bins)
        predicted.append(logits.argmax(-1))
        target.append(tokenizer.encode(b["action"][:, -1, 0, :logits.shape[1]], b["dataset_id"]))
    predicted, target = torch.cat(predicted).numpy(), torch.cat(target).numpy()  # (samples, A)
    zero = torch.zeros(len(src.action), dtype=torch.long)
    every = tokenizer.encode(torch.from_numpy(np.array(src.action[:, :target.shape[1]], np.float32)), zero).numpy()
    majority = {t: [np.bincount(column, minlength=tokenizer.bins).argmax() for column in every[tasks == t].T]
                for t in np.unique(tasks)}
    blind = np.array([majority[t] for t in tasks[steps]])  # (samples, A)
    names = DIMS if target.shape[1] == len(DIMS) else [str(d) for d in range(target.shape[1])]
    hit = lambda p, d: float(np.mean(p[:, d] == target[:, d]))  # token accuracy
    off = lambda p, d: float(np.mean(np.abs(p[:, d] - target[:, d])))  # mean distance in bins
    return {name: [hit(predicted, d), hit(blind, d), off(predicted, d), off(blind, d)] for d, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------
# 7. Command line: data -> train -> evaluate in MetaWorld

# The CPU default. The paper's model runs its 8 x 512 transformer over 90 tokens (~3.7 GFLOP a sample forward)
# and reached 0/30 on mt10 after 340 steps of batch 8 on 2 cores (README, RT-1). Same architecture and loss, cut
# in size (main prints the cuts): EfficientNet-B0's multipliers, 2 frames, a 4 x 256 transformer; 64 px frames;
# and no regularisation: with the official dropout, stochastic depth and random shift, the first such run predicted
# each task's most frequent token whatever the frame (10% on mt10, all of it drawer-close), and the random shift
# alone does that at this budget; dropout or stochastic depth alone cost nothing (README, RT-1).
CPU_STEPS, CPU_BATCH = 1400, 32  # ~0.7 s a step on 2 idle cores: with the mt10 evaluation ~30 minutes
CPU = dict(image_size=64, history=2, width_mult=1.0, depth_mult=1.0, layers=4, d_model=256, heads=4, head_dim=64,
           dropout=0.0, stochastic_depth=0.0, shift=(0.0, 0.0))


def main():
    import argparse
    import os
    import data
    import eval_sim
    import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_args(parser)
    parser.add_argument("--imagenet_weights", default=None,
                        help="torchvision EfficientNet_B3 ImageNet state_dict (.pth), with torchvision's BatchNorm "
                             "eps and momentum; without it: random init and the official Keras BatchNorm")
    parser.add_argument("--token_accuracy", metavar="CKPT", help="only print CKPT's per-dimension token accuracy on "
                        "--data's windows beside a frame-blind baseline (section 6)")
    gpu = torch.cuda.is_available()
    parser.add_argument("--eval_tasks", default="mt10", help="MetaWorld tasks to evaluate after training")
    parser.add_argument("--eval_episodes", type=int, default=None,
                        help="episodes per task after training (default: 20 with the default MetaWorld data, "
                             "else 0: none)")
    early = data.add_args(argparse.ArgumentParser(add_help=False))  # the flags the defaults depend on
    early.add_argument("--imagenet_weights")
    known = early.parse_known_args()[0]
    metaworld, small = known.data is None, not gpu and not known.imagenet_weights  # ImageNet weights need B3
    # The paper's recipe (spec A5): Adam at 1e-4, no schedule, no weight decay, no clipping; batch size and
    # step count are not in the official repository.
    cfg = Config(image_size=128) if metaworld else Config()  # MetaWorld is 128 px: no upsampling
    tcfg = train.TrainConfig(out_dir="runs/rt1", steps=100_000, batch_size=64, lr=1e-4, min_lr=1e-4, warmup=1000,
                             weight_decay=0.0, grad_clip=0.0, ckpt_every=5000, log_every=50)
    if small:  # the CPU default (CPU above); a short run from scratch: a higher lr, cosine to a tenth of it
        cfg = replace(cfg, **CPU)
        tcfg = replace(tcfg, steps=CPU_STEPS, batch_size=CPU_BATCH, lr=3e-4, min_lr=3e-5, warmup=CPU_STEPS // 10,
                       ckpt_every=CPU_STEPS // 4, log_every=10)
    args, (cfg, tcfg) = train.parse_args(cfg, tcfg, parser=parser)
    if len(cfg.shift) != 2:
        parser.error(f"--shift: expected two fractions, of the rows and of the columns (e.g. 0.078 0.156), "
                     f"got {list(cfg.shift)}")
    cfg = replace(cfg, torchvision_bn=bool(args.imagenet_weights))  # the BatchNorm its weights were trained with
    path = args.data or eval_sim.default_data()
    if args.token_accuracy:
        return print_token_accuracy(args.token_accuracy, path, args)
    ds = data.load(path, args.split, data.keys_from(args), args.calvin_all_frames, history=cfg.history,
                   image_size=cfg.image_size, cache_frames=args.cache_frames)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if ds.has_embedding:
        dim = ds.sources[0].embedding.shape[1]
        cfg = Config(**{**asdict(cfg), "lang_dim": dim})
        language, vocabulary = f"the dataset's {dim}-d instruction embedding", None
    else:
        language = f"a learned {cfg.lang_dim}-d embedding per instruction ({len(ds.instructions)} distinct)"
        vocabulary = ds.instructions
    torch.manual_seed(tcfg.seed)  # the initial weights: the same run twice starts from the same model
    model = RT1(cfg, vocabulary)
    if args.imagenet_weights:
        weights = torch.load(args.imagenet_weights, map_location="cpu", weights_only=True)
        model.encoder.net.load_state_dict({k[len("features."):]: v for k, v in weights.items()
                                           if k.startswith("features.")})
        backbone = f"ImageNet weights from {args.imagenet_weights}, torchvision BatchNorm"
    else:
        backbone = "random init, Keras BatchNorm (no --imagenet_weights)"
    if rank0:
        print(f"rt1: data {path} | language: {language} | EfficientNet ({cfg.width_mult} x {cfg.depth_mult}): "
              f"{backbone} | {cfg.image_size}px, {cfg.history} frames")
    if rank0 and small:
        paper = Config()
        print(f"rt1: no GPU, so the CPU default (the paper's in brackets): EfficientNet-B0's {cfg.width_mult} x "
              f"{cfg.depth_mult} [B3's {paper.width_mult} x {paper.depth_mult}], {cfg.image_size} px "
              f"[{paper.image_size}], {cfg.history} frames [{paper.history}], transformer {cfg.layers} x "
              f"{cfg.d_model}, {cfg.heads} heads of {cfg.head_dim} [{paper.layers} x {paper.d_model}, {paper.heads} "
              f"of {paper.head_dim}], dropout {cfg.dropout} [{paper.dropout}], stochastic depth "
              f"{cfg.stochastic_depth} [{paper.stochastic_depth}], shift {list(cfg.shift)} [{paper.shift[0]:.3f}, "
              f"{paper.shift[1]:.3f}]; {tcfg.steps} steps of batch {tcfg.batch_size}, Adam {tcfg.lr:g} cosine to "
              f"{tcfg.min_lr:g} [1e-4 constant]")
    tokenizer = ActionTokenizer(ds.stats, cfg.bins)
    model = train.train(model, lambda m, b: loss(m, b, tokenizer), ds, tcfg, method="rt1",
                        config={**asdict(cfg), "vocabulary": vocabulary})

    episodes = args.eval_episodes if args.eval_episodes is not None else 20 * metaworld
    if rank0 and episodes > 0:
        policy = Policy(model, tokenizer, metaworld_source(ds.stats))
        results = eval_sim.evaluate(policy, args.eval_tasks, episodes, out_dir=os.path.join(tcfg.out_dir, "eval"),
                                    method="rt1", size=128)
        train.log_evaluation(tcfg, results)  # --log: the success rates beside the training's rows


def print_token_accuracy(ckpt_path, path, args):
    """--token_accuracy: the checkpoint's model and tokenizer on the windows of `path`, one row per dimension."""
    import data
    import train
    policy = Policy.from_checkpoint(train.load_checkpoint(ckpt_path), "cpu")
    cfg = policy.model.cfg
    ds = data.load(path, args.split, data.keys_from(args), args.calvin_all_frames, history=cfg.history,
                   image_size=cfg.image_size, cache_frames=args.cache_frames)
    samples = 2048
    report = token_accuracy(policy.model, policy.tokenizer, ds, samples)
    windows = min(samples, len(ds.sources[0].action))
    print(f"rt1: {ckpt_path} on {windows:,} windows of {ds.sources[0].name}; blind = each instruction's most "
          f"frequent token")
    print("dim       accuracy  blind   bins off  blind")
    for name, (acc, blind_acc, off, blind_off) in report.items():
        print(f"{name:9s} {acc:8.3f}  {blind_acc:5.3f}   {off:8.1f}  {blind_off:5.1f}")
    return report


if __name__ == "__main__":
    import train
    train.cli(main)  # bad input (data, checkpoint, flags): one line and exit status 2

"""mcr.py: MCR, Manipulation-Centric Representations from robot data (Jiang et al., "Robots Pre-Train Robots:
Manipulation-Centric Robotic Representation from Large-Scale Robot Datasets", ICLR 2025), in one file.

Official code: luccachiang/robots-pretrain-robots (R3M-derived; mcr/models/models_mcr.py, mcr/trainer.py,
mcr/utils/data_loaders.py, mcr/train_mcr.sh at 09c8423). Where the paper and that code differ, this file
follows the code and says so (facts: ../shared/specs/hpt_mcr.md, Part B).

    one trajectory, one camera: frames [start, end, s0, s1, s2] --RandomResizedCrop--> ResNet-50 --> e (2048)
    dynamics chunk at s0, s2 (proprio, action, proprio, action, proprio) --MLP--> z (2048)
    time-contrastive:    e1 closer to e2 than e0 is, and to e0 than e2 is; 3 shuffled batch negatives
    dynamics alignment:  e0 <-> z0 against z2, e2 <-> z2 against z0                (similarity = -L2)
    action prediction:   actor(e) -> the 7-d action of every frame                  (MSE)

    python mcr.py                                       # MetaWorld MT10: pre-train, export, downstream BC test
    torchrun --nproc_per_node=8 mcr.py --data PATH      # pre-train on DROID (official inputs) or any data.py source
    python mcr.py --export encoder.pt --ckpt runs/mcr/ckpt.pt        # plain torchvision ResNet state_dict
    python mcr.py --downstream --encoder encoder.pt     # frozen encoder + MLP policy on MetaWorld, evaluated
    python mcr.py --downstream --encoder imagenet --imagenet_weights resnet50.pth   # baselines: imagenet | random

    from mcr import load_encoder; net = load_encoder("encoder.pt")  # torchvision ResNet, fc = Identity
    features = net(preprocess(uint8_images))                        # (N, 2048): the inputs MCR trained on
    model, step = load_snapshot("snapshot.pt")  # an official training snapshot: encoder, state encoder, actor
"""
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF


@dataclass
class Config:
    size: int = 50                  # ResNet depth: 50 (paper, train_mcr.sh), 18 or 34; random init, fc removed
    image_size: int = 224           # every frame is RandomResizedCrop'ed to image_size x image_size
    crop_scale: tuple = (0.5, 1.0)  # RandomResizedCrop area fraction (doaug=rctraj; ratio 3/4-4/3, bilinear)
    views: tuple = ("primary", "secondary")  # one of them per sample (DROID: exterior_image_1_left / _2_left)
    alpha: float = 0.2              # start frame within the first 20% of the episode, end frame within the last
    window: int = 3                 # dynamics chunk: proprio at 3 steps and the actions between them (state_window)
    # proprio and action per step, set from the data, not flags (DROID: cartesian 6 + gripper 1 + joints 7; `action` 7)
    state_dim: int = field(default=14, metadata={"from_data": True})
    action_dim: int = field(default=7, metadata={"from_data": True})
    hidden_dim: int = 1024          # state encoder: Linear(chunk, 1024) -> ReLU -> Linear(1024, encoder dim)
    actor_feature_dim: int = 50     # actor trunk: Linear(encoder dim, 50) -> LayerNorm -> Tanh (DrQ-v2 style)
    actor_hidden_dim: int = 512     # actor: Linear(50, 512) -> ReLU -> Linear(512, 512) -> ReLU -> Linear(512, 7)
    negatives: int = 3              # time-contrastive: negatives per anchor from shuffled copies of the batch
    tcn_weight: float = 1.0         # time-contrastive loss weight (tcnweight)
    align_weight: float = 1.0       # dynamics alignment loss weight (align_state_weight)
    bc_weight: float = 1.0          # action prediction loss weight (bc_weight)

    @property
    def chunk_dim(self):  # DROID: 3 x 14 + 2 x 7 = 56
        return self.window * self.state_dim + (self.window - 1) * self.action_dim


# ---------------------------------------------------------------------------------------------------
# 1. Frame sampling (official MCRBufferDroid._sample), over data.py's prepared sources

# DROID read with the official inputs (data.py's standard DROID mapping gives state = cartesian + gripper and a
# rebuilt delta action instead): both exterior cameras, proprio = cartesian (6) + gripper (1) + joints (7) in the
# official order, and the RLDS `action` (7) as stored, raw units, no normalisation.
DROID_KEYS = {"image_key": "observation/exterior_image_1_left", "secondary_key": "observation/exterior_image_2_left",
              "state_key": "observation/cartesian_position+observation/gripper_position+observation/joint_position",
              "action_key": "action", "instruction_key": "language_instruction"}
DROID_NAMES = ("r2d2_faceblur", "droid")  # the internal TFDS names of droid and droid_100


def sample_frames(length, alpha, rng):
    """[start, end, s0, s1, s2] of an episode of `length` steps, half-open ranges as the official code:
    start in [1, 2 + a L), end in [(1 - a) L - 1, L), s1 in [2, L), s0 in [1, s1), s2 in [s1, L). Frame 0 is
    never drawn and s2 may equal s1 (official)."""
    start = rng.integers(1, 2 + int(alpha * length))
    end = rng.integers(int((1 - alpha) * length) - 1, length)
    s1 = rng.integers(2, length)
    s0 = rng.integers(1, s1)
    s2 = rng.integers(s1, length)
    return np.array([start, end, s0, s1, s2])


def dynamics_chunk(state, action, t, window):
    """The alignment input around step t: frames f_i = min(max(1, t - w // 2) + i, L - 1), laid out as
    [p(f0), a(f0), p(f1), a(f1), p(f2)] (w = 3). state (L, S), action (L, A) -> (w S + (w - 1) A,)."""
    first, parts = max(1, t - window // 2), []
    for i in range(window):
        f = min(first + i, len(state) - 1)
        parts += [state[f], action[f]] if i < window - 1 else [state[f]]
    return np.concatenate(parts)


def random_resized_crops(frames, size, scale, seed):
    """One independent RandomResizedCrop per frame (the official "same crop for the whole trajectory" branch
    compares doaug with a list and never runs), with torchvision's own parameter search seeded by `seed`.
    uint8 (n, 3, H, W) -> uint8 (n, 3, size, size); the official code keeps floats in [0, 255] here."""
    crop = T.RandomResizedCrop(size, scale=scale, antialias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([crop(f) for f in frames])


class Frames(torch.utils.data.Dataset):
    """MCR's training samples over a data.Mixture's sources. An item is (source id, step, position) as
    data.Sampler yields them; everything random is drawn from (seed, position), so train.py's exact resume
    stays exact. The episode is uniform among the source's episodes (official: a uniform trajectory; the step
    the Sampler drew is not used), the camera uniform among cfg.views, the same camera for all five frames.

    A sample: images uint8 (5, 3, S, S) [start, end, s0, s1, s2]; chunks float32 (2, C) at s0, s2; actions
    float32 (5, A); state and action zero-padded to the mixture's widest source."""

    def __init__(self, mixture, cfg, seed=0):
        self.sources, self.weights, self.stats = mixture.sources, mixture.weights, mixture.stats
        self.instructions, self.cfg, self.seed = mixture.instructions, cfg, seed
        self.episodes = []  # per source: the episodes long enough for the five draws (>= 3 steps)
        for s in self.sources:
            long_enough = np.flatnonzero(np.diff(s.start) >= 3)
            if not len(long_enough):
                raise ValueError(f"{s.name} ({s.cache}): no episode has the 3 steps MCR's frame sampling needs")
            self.episodes.append(long_enough)

    def __len__(self):
        return sum(len(s) for s in self.sources)

    def __getitem__(self, item):
        sid, _, position = item
        rng, src, cfg = np.random.default_rng([self.seed, position]), self.sources[sid], self.cfg
        e = int(rng.choice(self.episodes[sid]))
        base, length = int(src.start[e]), int(src.start[e + 1] - src.start[e])
        view = cfg.views[rng.integers(len(cfg.views))]
        t = sample_frames(length, cfg.alpha, rng)  # (5,)
        state = np.zeros((length, cfg.state_dim), np.float32)
        action = np.zeros((length, cfg.action_dim), np.float32)
        state[:, :src.state.shape[1]] = src.state[base:base + length]
        action[:, :src.action.shape[1]] = src.action[base:base + length]
        frames = torch.stack(src.images(view, (base + t).tolist()))  # uint8 (5, 3, H, W), native size
        return {"images": random_resized_crops(frames, cfg.image_size, cfg.crop_scale, int(rng.integers(2**62))),
                "chunks": torch.from_numpy(np.stack([dynamics_chunk(state, action, int(t[k]), cfg.window)
                                                     for k in (2, 4)])),  # (2, C)
                "actions": torch.from_numpy(action[t]), "frames": torch.from_numpy(t), "dataset_id": sid,
                "episode": e, "view": cfg.views.index(view)}


# ---------------------------------------------------------------------------------------------------
# 2. The model: ResNet encoder, state encoder, actor (official module names, so official snapshots load)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet(depth):
    """torchvision ResNet-18/34/50, random init, fc = Identity: global-average-pooled features."""
    if depth not in (18, 34, 50):
        raise ValueError(f"ResNet depth {depth}: expected 18, 34 or 50")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    net.fc = nn.Identity()
    return net


def preprocess(images):
    """uint8 or float images in [0, 255], (N, 3, H, W) -> /255 -> ImageNet mean/std: what MCR trains on.
    (The official mcr.load_mcr returns the bare network and its example.py skips the normalisation.)"""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


class MCR(nn.Module):
    """convnet (ResNet, no projection head: the losses use its features), state_encoder (dynamics chunk ->
    feature space), bc_trunk + bc_policy (the actor). A loss with weight 0 has no module, as the official code."""

    def __init__(self, cfg):
        super().__init__()
        if max(cfg.tcn_weight, cfg.align_weight, cfg.bc_weight) <= 0:
            raise ValueError("--tcn_weight, --align_weight and --bc_weight are all 0: nothing to train")
        self.cfg = cfg
        self.convnet = resnet(cfg.size)
        dim = 2048 if cfg.size == 50 else 512
        if cfg.align_weight > 0:
            self.state_encoder = nn.Sequential(nn.Linear(cfg.chunk_dim, cfg.hidden_dim), nn.ReLU(),
                                               nn.Linear(cfg.hidden_dim, dim))
        if cfg.bc_weight > 0:
            self.bc_trunk = nn.Sequential(nn.Linear(dim, cfg.actor_feature_dim), nn.LayerNorm(cfg.actor_feature_dim),
                                          nn.Tanh())
            self.bc_policy = nn.Sequential(
                nn.Linear(cfg.actor_feature_dim, cfg.actor_hidden_dim), nn.ReLU(),
                nn.Linear(cfg.actor_hidden_dim, cfg.actor_hidden_dim), nn.ReLU(),
                nn.Linear(cfg.actor_hidden_dim, cfg.action_dim))

    def forward(self, images, chunks):  # [0, 255] (N, 3, H, W), (M, C) -> e (N, D), z (M, D) | None, a (N, A) | None
        e = self.convnet(preprocess(images))
        z = self.state_encoder(chunks) if hasattr(self, "state_encoder") else None
        a = self.bc_policy(self.bc_trunk(e)) if hasattr(self, "bc_trunk") else None
        return e, z, a


# ---------------------------------------------------------------------------------------------------
# 3. The losses (official trainer.py): similarity -L2, temperature 1, epsilon 1e-8 as written there

EPS = 1e-8


def similarity(a, b):  # (..., D) x 2 -> (...): negative Euclidean distance (l2dist=True)
    return -torch.linalg.norm(a - b, dim=-1)


def contrastive(positive, negatives):
    """-log(eps + e^p / (eps + e^p + sum_j e^n_j)) per row; positive (B,), negatives (B, J). Kept in the
    official form, not as a log-softmax: while all distances are >> -log(eps) = 18.4 (a fresh ResNet-50's
    features lie ~40-60 apart) the ratio drowns in eps, the loss sits at 18.42 with almost no gradient, and
    it comes alive as the features draw closer."""
    p = positive.exp()
    return -torch.log(EPS + p / (EPS + p + negatives.exp().sum(-1)))


def tcn_loss(e0, e1, e2, negatives):
    """R3M's time-contrastive loss on s0 < s1 <= s2: e1 must be closer to the anchor e2 than e0 is, and closer
    to the anchor e0 than e2 is; each anchor also gets `negatives` frames of other samples (batch shuffles
    with torch.randperm, which may pick the sample itself, as the official code). (B, D) x 3 -> loss, accuracy.
    The shuffles are drawn as the official Trainer.update draws them, so a seeded step gives the same
    negatives: one loop, a permutation for e0 then one for e2 in every pass, from the CPU generator
    (torch.randperm without a device, also when the features are on a GPU)."""
    sim_02, sim_12, sim_01 = similarity(e2, e0), similarity(e2, e1), similarity(e1, e0)
    neg0, neg2 = [], []
    for _ in range(negatives):
        perm0, perm2 = torch.randperm(len(e0)), torch.randperm(len(e2))  # (B,) each, in this order
        neg0.append(similarity(e0, e0[perm0.to(e0.device)]))
        neg2.append(similarity(e2, e2[perm2.to(e2.device)]))
    neg0, neg2 = torch.stack(neg0, -1), torch.stack(neg2, -1)  # (B, negatives)
    loss2 = contrastive(sim_12, torch.cat([sim_02[:, None], neg2], -1))  # anchor e2: e1 positive, e0 negative
    loss0 = contrastive(sim_01, torch.cat([sim_02[:, None], neg0], -1))  # anchor e0: e1 positive, e2 negative
    aligned = ((sim_02 < sim_12) & (sim_01 > sim_02)).float().mean()
    return ((loss2 + loss0) / 2).mean(), aligned


def alignment_loss(e0, e2, z0, z2):
    """Dynamics alignment: a frame's feature against the chunk embedding of the same step (positive) and of
    the sample's other step (the only negative). (B, D) x 4 -> loss, accuracy."""
    s00, s22, s02, s20 = similarity(e0, z0), similarity(e2, z2), similarity(e0, z2), similarity(e2, z0)
    loss = (contrastive(s00, s02[:, None]) + contrastive(s22, s20[:, None])) / 2
    return loss.mean(), ((s02 < s00) & (s20 < s22)).float().mean()


def loss(model, batch, cfg):
    """L = tcn_weight L_tcn + align_weight L_dyn + bc_weight L_act on a batch of Frames samples."""
    images = batch["images"]  # uint8 (B, 5, 3, S, S): start, end, s0, s1, s2
    b = len(images)
    e, z, a = model(images.flatten(0, 1), batch["chunks"].flatten(0, 1))  # (5B, D), (2B, D), (5B, A)
    _, _, e0, e1, e2 = e.float().view(b, 5, -1).unbind(1)
    total, metrics = 0.0, {}
    if cfg.tcn_weight > 0:
        metrics["tcn"], metrics["tcn_acc"] = tcn_loss(e0, e1, e2, cfg.negatives)
        total = total + cfg.tcn_weight * metrics["tcn"]
    if cfg.align_weight > 0:
        z0, z2 = z.float().view(b, 2, -1).unbind(1)
        metrics["align"], metrics["align_acc"] = alignment_loss(e0, e2, z0, z2)
        total = total + cfg.align_weight * metrics["align"]
    if cfg.bc_weight > 0:  # all five frames, raw actions (the official code does not normalise them)
        metrics["bc"] = F.mse_loss(a.float(), batch["actions"].flatten(0, 1))
        total = total + cfg.bc_weight * metrics["bc"]
    return total, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# 4. The encoder in and out (plain torchvision layout, official layouts); the whole official snapshot in

def encoder_state_dict(obj, where="encoder"):
    """The ResNet's state_dict from any of: a plain torchvision ResNet state_dict without fc.* (mcr.py
    --export, the official ckpts/mcr_resnet50.pth), an official training snapshot {"mcr": DataParallel
    state_dict, "global_step"}, an mcr.py pre-training or downstream checkpoint."""
    if isinstance(obj, dict) and "model" in obj and "method" in obj:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("mcr"), dict):
        obj = obj["mcr"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{where}: expected a ResNet state_dict, an official MCR snapshot or an mcr.py "
                         f"checkpoint, got {type(obj).__name__}")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    for prefix in ("convnet.", "encoder."):  # mcr.py pre-training (and official) / downstream checkpoints
        if any(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return {k: v for k, v in obj.items() if not k.startswith("fc.")}


def resnet_depth(state_dict, where="encoder"):
    """18, 34 or 50 from the keys: bottleneck blocks have conv3; layer3 has 2 blocks in ResNet-18, else 6."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("layer3.")}
    if "conv1.weight" not in state_dict or not blocks:
        raise ValueError(f"{where}: not a torchvision ResNet state_dict (keys: {', '.join(list(state_dict)[:6])} ...)")
    return 50 if "layer1.0.conv3.weight" in state_dict else 18 if len(blocks) == 2 else 34


def load_encoder(path):
    """A torchvision ResNet (fc = Identity, eval mode, on the CPU) with the weights in `path`, any layout
    of encoder_state_dict. Feed it preprocess(images)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such encoder file") from None
    state = encoder_state_dict(obj, str(path))
    net = resnet(resnet_depth(state, str(path)))
    net.load_state_dict(state)
    return net.eval()


def snapshot_config(state, cfg, where="snapshot"):
    """cfg with what an MCR state_dict fixes: the ResNet depth, the state encoder's hidden width, and which
    heads exist. The loss weights are not saved; the official code builds a head only for a positive weight,
    so a head in the file keeps cfg's weight (1, train_mcr.sh's, where cfg has 0) and a missing one gets 0."""
    convnet = {k.removeprefix("convnet."): v for k, v in state.items() if k.startswith("convnet.")}
    cfg = replace(cfg, size=resnet_depth(convnet, where),
                  align_weight=(cfg.align_weight or 1.0) if "state_encoder.0.weight" in state else 0.0,
                  bc_weight=(cfg.bc_weight or 1.0) if "bc_trunk.0.weight" in state else 0.0)
    if cfg.align_weight > 0:
        hidden, chunk = state["state_encoder.0.weight"].shape
        if chunk != cfg.chunk_dim:
            raise ValueError(f"{where}: state_encoder.0.weight takes a {chunk}-d dynamics chunk, the config gives "
                             f"{cfg.chunk_dim} (window {cfg.window} x state_dim {cfg.state_dim} + {cfg.window - 1} "
                             f"x action_dim {cfg.action_dim}): pass a matching Config")
        cfg = replace(cfg, hidden_dim=hidden)
    return cfg


def load_snapshot(path, cfg=None):
    """The whole MCR model (encoder, state encoder, actor) from an official training snapshot, as the official
    train_representation.py saves it: snapshot.pt = {"mcr": DataParallel state_dict, "global_step"},
    snapshot_<step>.pt = {"mcr": ...}, keys `module.convnet.…`, `module.state_encoder.…`. cfg (default: the
    paper's run, DROID's 56-d chunk) gives what the file does not hold (see snapshot_config). Returns
    (MCR in eval mode on the CPU, global_step or None)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such snapshot file") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("mcr"), dict):
        raise ValueError(f"{path}: expected an official MCR training snapshot {{'mcr': state_dict, 'global_step'}}, "
                         f"got {type(obj).__name__}" + (f" with keys {list(obj)[:4]}" if isinstance(obj, dict) else ""))
    state = {k.removeprefix("module."): v for k, v in obj["mcr"].items()}  # DataParallel's prefix
    model = MCR(snapshot_config(state, cfg or Config(), str(path)))
    model.load_state_dict(state)
    return model.eval(), obj.get("global_step")


# ---------------------------------------------------------------------------------------------------
# 5. Downstream: behaviour cloning on the frozen encoder's features (paper: "only an MLP"; the authors point to
# robomimic's BC, whose MLP is 2 x 1024 with ReLU and an MSE loss)

@dataclass
class Downstream:
    tasks: str = "mt10"                 # MetaWorld tasks: demonstrations to learn from and tasks to evaluate
    demos: int = 50                     # demonstrations per task (the first N of the dataset)
    bc_hidden: tuple = (1024, 1024)     # MLP widths (robomimic BC)
    bc_steps: int = 20_000              # Adam steps on the precomputed features
    bc_batch: int = 256
    bc_lr: float = 1e-4                 # robomimic BC learning rate
    eval_episodes: int = 20             # evaluation episodes per task (0: none)


class BCPolicy(nn.Module):
    """frozen encoder -> feature (D) ++ z-scored proprio (S) -> MLP -> z-scored 7-d action. The encoder is
    frozen (no gradients, eval-mode BatchNorm), so its features are computed once before training."""

    def __init__(self, encoder, feature_dim, state_stats, action_stats, hidden, image_size):
        super().__init__()
        self.encoder, self.image_size = encoder.eval().requires_grad_(False), image_size
        layers, d = [], feature_dim + len(state_stats["mean"])
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.mlp = nn.Sequential(*layers, nn.Linear(d, len(action_stats["mean"])))
        for name, st in (("state", state_stats), ("action", action_stats)):
            std = torch.tensor(st["std"], dtype=torch.float32)
            self.register_buffer(f"{name}_mean", torch.tensor(st["mean"], dtype=torch.float32))
            self.register_buffer(f"{name}_std", torch.where(std > 0, std, torch.ones_like(std)))

    def train(self, mode=True):  # the encoder stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images):  # uint8 (N, 3, H, W) -> (N, D) at the encoder's training size
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = TF.resize(images, [self.image_size, self.image_size], antialias=True)
        return self.encoder(preprocess(images))

    def head(self, features, state):  # (N, D), (N, S) -> z-scored action (N, 7)
        return self.mlp(torch.cat([features, (state - self.state_mean) / self.state_std], -1))

    def forward(self, images, state):  # uint8 (N, 3, H, W), (N, S) -> standard action (N, 7)
        return self.head(self.features(images), state) * self.action_std + self.action_mean


class Policy:
    """eval_sim's interface for a downstream checkpoint: the primary camera and the proprio -> 7-d action."""
    views = ("image_primary",)  # the observation images it reads: eval_sim draws no other camera

    def __init__(self, model, device="cpu"):
        self.model, self.device = model.to(device).eval(), torch.device(device)

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        cfg = ckpt["config"]
        if cfg.get("stage") != "downstream":
            raise ValueError("this is an MCR pre-training checkpoint (an encoder, not a policy): train a policy on "
                             "it with python mcr.py --downstream --encoder CKPT, and evaluate that checkpoint")
        model = BCPolicy(resnet(cfg["size"]), cfg["feature_dim"], cfg["state_stats"], cfg["action_stats"],
                         cfg["bc_hidden"], cfg["image_size"])
        model.load_state_dict(ckpt["model"])
        return cls(model, device)

    def reset(self, num_envs):
        pass  # one frame, no history

    @torch.inference_mode()
    def act(self, obs, instructions):  # instructions unused: one MLP over the tasks it was trained on
        images = torch.as_tensor(np.asarray(obs["image_primary"])).to(self.device)
        state = torch.as_tensor(np.asarray(obs["state"]), dtype=torch.float32).to(self.device)
        z = self.model.head(self.model.features(images), state).float()  # z-scored (N, 7): float32 before un-scoring
        return (z * self.model.action_std + self.model.action_mean).cpu().numpy()


def demonstrations(src, tasks, demos, instructions):
    """Global step indices of the first `demos` episodes of every task (matched by its instruction)."""
    steps = []
    for task in tasks:
        if instructions[task] not in src.instructions:
            raise ValueError(f"{src.name}: no demonstrations of {task} ('{instructions[task]}')")
        episodes = np.flatnonzero(src.instruction == src.instructions.index(instructions[task]))[:demos]
        steps += [np.arange(src.start[e], src.start[e + 1]) for e in episodes]
    return np.concatenate(steps)


def downstream(encoder, name, data_path, cfg, dcfg, out_dir, seed=0, log=print):
    """Fit BCPolicy on the frozen `encoder` to the MetaWorld demonstrations, save out_dir/ckpt.pt (loads
    through eval_sim.load_policy) and evaluate it. Returns (policy model, eval results or None)."""
    import os
    import data
    import eval_sim
    import train
    tasks = eval_sim.parse_tasks(dcfg.tasks)
    src = data.Source(data.prepare(data_path))
    steps = demonstrations(src, tasks, dcfg.demos, eval_sim.INSTRUCTIONS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state, action = torch.from_numpy(src.state[steps].copy()), torch.from_numpy(src.action[steps].copy())
    depth = resnet_depth(encoder.state_dict())
    state_stats, action_stats = data.statistics(state.numpy()), data.statistics(action.numpy())
    model = BCPolicy(encoder, 2048 if depth == 50 else 512, state_stats, action_stats, dcfg.bc_hidden,
                     cfg.image_size).to(device)
    features = torch.cat([model.features(torch.stack([src.image("primary", int(i)) for i in chunk]).to(device))
                          for chunk in np.array_split(steps, max(1, len(steps) // 128))])  # (N, D), once
    state, action = state.to(device), action.to(device)
    target = (action - model.action_mean) / model.action_std
    log(f"mcr downstream [{name}]: {len(tasks)} task(s) x {dcfg.demos} demos = {len(steps):,} frames, features "
        f"{tuple(features.shape)} at {cfg.image_size}px (computed once); MLP {dcfg.bc_hidden}, {dcfg.bc_steps} "
        f"steps of {dcfg.bc_batch}")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.mlp.parameters(), lr=dcfg.bc_lr)
    for step in range(dcfg.bc_steps):
        i = torch.randint(len(steps), (dcfg.bc_batch,), device=device)
        mse = F.mse_loss(model.head(features[i], state[i]), target[i])
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()
        if step == 0 or (step + 1) % max(1, dcfg.bc_steps // 5) == 0:
            log(f"mcr downstream [{name}]: step {step + 1} mse {mse.item():.4f} (z-scored actions)")
    os.makedirs(out_dir, exist_ok=True)
    config = {"stage": "downstream", "encoder": name, "size": depth, "feature_dim": features.shape[1],
              "state_stats": state_stats, "action_stats": action_stats, "image_size": cfg.image_size, **asdict(dcfg)}
    train.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
        "method": "mcr", "config": config, "model": model.state_dict(), "stats": [src.stats], "step": dcfg.bc_steps,
        "instructions": src.instructions})
    results = None
    if dcfg.eval_episodes > 0:
        results = eval_sim.evaluate(Policy(model, device), tasks, dcfg.eval_episodes, os.path.join(out_dir, "eval"),
                                    method=f"mcr-{name}")
    return model, results


# ---------------------------------------------------------------------------------------------------
# Command line: pre-train -> encoder.pt -> downstream test

def official_keys(path, keys):
    """The key flags the user gave, else DROID's official MCR inputs for a DROID dataset, else None
    (data.STANDARD's mapping)."""
    import data
    fmt, root = data.detect(path)
    if keys or fmt != "rlds":
        return keys or None
    return DROID_KEYS if data.read_info(root)["name"] in DROID_NAMES else None


def make_encoder(spec, imagenet_weights=None, seed=0):
    """--encoder PATH | imagenet | random -> (ResNet-50 or the file's ResNet, name)."""
    if spec == "random":
        torch.manual_seed(seed)
        return resnet(50).eval(), "random"
    if spec == "imagenet":
        if not imagenet_weights:
            raise SystemExit("mcr.py: --encoder imagenet needs --imagenet_weights PATH, a torchvision resnet50 "
                             "ImageNet state_dict (e.g. resnet50-11ad3fa6.pth from download.pytorch.org/models)")
        return load_encoder(imagenet_weights), "imagenet"
    return load_encoder(spec), "mcr"


# The CPU default: the real ResNet-50, but 64 px crops, CPU_STEPS steps of CPU_BATCH trajectories, and a
# downstream test on CPU_TASKS with CPU_DEMOS demonstrations each and CPU_EPISODES evaluation episodes.
CPU_SIZE, CPU_STEPS, CPU_BATCH = 64, 300, 16
CPU_TASKS, CPU_DEMOS, CPU_BC_STEPS, CPU_EPISODES = "drawer-close-v3,button-press-topdown-v3,reach-v3", 10, 5000, 3


def main():
    import argparse
    import os
    import data
    import eval_sim
    import train
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_args(p, cache_frames=False)  # frames are cropped at their native size from Source.image: no cache
    g = p.add_argument_group("mcr")
    g.add_argument("--export", metavar="ENCODER_PT", help="write the encoder of --ckpt as a plain torchvision "
                   "ResNet state_dict (no fc.*; loads into resnet50() with fc = Identity, strict), then exit")
    g.add_argument("--ckpt", help="checkpoint for --export (default: OUT_DIR/ckpt.pt)")
    g.add_argument("--downstream", action="store_true", help="only the downstream test of --encoder")
    g.add_argument("--encoder", help="for --downstream: PATH (an mcr.py encoder or checkpoint, the official "
                   "mcr_resnet50.pth or snapshot) | imagenet | random")
    g.add_argument("--imagenet_weights", help="torchvision resnet50 ImageNet state_dict, for --encoder imagenet")
    # The paper's recipe (train_mcr.sh, Table 6): Adam 1e-4, batch 32, 500k steps, no weight decay, no schedule,
    # no clipping. On MetaWorld with a GPU: 20k steps at 224 px; on a CPU: the cuts printed below.
    metaworld = data.add_args(argparse.ArgumentParser(add_help=False)).parse_known_args()[0].data is None
    cfg = Config(views=("primary", "wrist") if metaworld else Config.views, image_size=224 if gpu else CPU_SIZE)
    tcfg = train.TrainConfig(out_dir="runs/mcr", steps=500_000 if not metaworld else 20_000 if gpu else CPU_STEPS,
                             batch_size=32 if gpu else CPU_BATCH, lr=1e-4, min_lr=1e-4, warmup=0, weight_decay=0.0,
                             grad_clip=0.0, ckpt_every=20_000 if gpu else CPU_STEPS, log_every=100 if gpu else 5)
    dcfg = Downstream() if gpu else Downstream(tasks=CPU_TASKS, demos=CPU_DEMOS, bc_steps=CPU_BC_STEPS,
                                               eval_episodes=CPU_EPISODES)
    args, (cfg, dcfg, tcfg) = train.parse_args(cfg, dcfg, tcfg, parser=p)
    rank0 = int(os.environ.get("RANK", 0)) == 0

    if args.export:
        ckpt = args.ckpt or os.path.join(tcfg.out_dir, "ckpt.pt")
        torch.save(load_encoder(ckpt).state_dict(), args.export)
        return print(f"mcr: wrote the encoder of {ckpt} to {args.export}")
    if args.downstream:
        if not args.encoder:
            raise SystemExit("mcr.py: --downstream needs --encoder PATH | imagenet | random")
        encoder, name = make_encoder(args.encoder, args.imagenet_weights, tcfg.seed)
        _, results = downstream(encoder, name, eval_sim.default_data(), cfg, dcfg,
                                os.path.join(tcfg.out_dir, f"downstream_{name}"), tcfg.seed)
        if results:  # --log: the success rates after the BC steps
            train.log_evaluation(tcfg, results, step=dcfg.bc_steps)
        return

    spec = args.data or eval_sim.default_data()
    paths, weights = data.parse_sources(spec)
    sources = [data.Source(data.prepare(path, args.split, official_keys(path, data.keys_from(args)),
                                        args.calvin_all_frames)) for path in paths]
    mixture = data.Mixture(sources, weights, image_size=cfg.image_size, views=cfg.views, seed=tcfg.seed)
    cfg = replace(cfg, state_dim=mixture.state_dim, action_dim=mixture.action_dim)
    if rank0:
        for s, w in zip(mixture.stats, mixture.weights):
            print(f"mcr: {s['name']}: {s['num_episodes']:,} episodes, {s['num_steps']:,} steps, weight {w:.3f}, "
                  f"state {len(s['state']['mean'])}-d, action {len(s['action']['mean'])}-d")
        print(f"mcr: ResNet-{cfg.size} from scratch, {cfg.image_size}px crops of views {list(cfg.views)}, dynamics "
              f"chunk {cfg.chunk_dim}-d, loss weights tcn {cfg.tcn_weight} align {cfg.align_weight} bc {cfg.bc_weight}")
        if not gpu:
            print(f"mcr: no GPU, so the CPU default: {tcfg.steps} steps of batch {tcfg.batch_size} at "
                  f"{cfg.image_size}px (paper: 500k steps of 32 at 224px on DROID)" + (
                      f"; downstream on {dcfg.tasks} with {dcfg.demos} demos each, {dcfg.bc_steps} BC steps, "
                      f"{dcfg.eval_episodes} evaluation episodes (paper: 3 seeds per task on 20 tasks in 4 "
                      f"simulators)" if metaworld else ""))
    # With torchrun, BatchNorm statistics and the shuffled time-contrastive negatives are per rank (the official
    # run: DataParallel on one GPU, batch 32); --batch_size stays the global batch.
    torch.manual_seed(tcfg.seed)
    model = train.train(MCR(cfg), lambda m, b: loss(m, b, cfg), Frames(mixture, cfg, tcfg.seed), tcfg,
                        method="mcr", config={"stage": "pretrain", **asdict(cfg)})
    if not rank0:
        return
    encoder_path = os.path.join(tcfg.out_dir, "encoder.pt")
    torch.save(model.convnet.state_dict(), encoder_path)
    rows = [json.loads(r) for r in open(os.path.join(tcfg.out_dir, "metrics.jsonl"))]
    keys = [k for k in ("loss", "tcn", "tcn_acc", "align", "align_acc", "bc") if k in rows[0]]
    summary = (f"pre-training (logged mean of steps 1-{rows[0]['step']} -> of the last {tcfg.log_every} of "
               f"{rows[-1]['step']}): " + ", ".join(f"{k} {rows[0][k]:.3f} -> {rows[-1][k]:.3f}" for k in keys))
    print(f"mcr: {summary}; encoder: {encoder_path}")
    if metaworld and dcfg.eval_episodes > 0:
        _, results = downstream(load_encoder(encoder_path), "mcr", spec, cfg, dcfg,
                                os.path.join(tcfg.out_dir, "downstream_mcr"), tcfg.seed)
        train.log_evaluation(tcfg, results)  # --log: the downstream success rates beside the pre-training's rows
        print(f"mcr: {summary}\nmcr: downstream success of the frozen encoder + MLP: {results['mean']:.1%} on "
              f"{dcfg.tasks} ({dcfg.eval_episodes} episodes each); a baseline: python mcr.py --downstream --encoder "
              f"random --out_dir {tcfg.out_dir} --image_size {cfg.image_size} (same --tasks/--demos/--bc_steps)")


if __name__ == "__main__":
    import train
    train.cli(main)  # bad input (data, checkpoint, flags): one line and exit status 2

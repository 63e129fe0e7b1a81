"""gcbc.py: visual goal-conditioned behaviour cloning (GC-BC) on Open X-Embodiment.

The method of the PyTorch Open X-Embodiment repository (Stardust-hyx/Torch-X-Embodiment, `--method gc_bc`,
at commit 447305f), itself a port of the BridgeData V2 JAX GCBC (rail-berkeley/bridge_data_v2): the
policy sees the current camera frame and a goal frame (in training a later frame of the same episode, at
test time a picture of the finished task) stacked on channels with two coordinate channels, encodes them
with a ResNet-34 (GroupNorm, SiLU, trained from scratch), and an MLP and a linear head give the mean of a
unit-variance Gaussian over the 7-d action. The loss is its negative log-likelihood. No language: the
reference ignores the instruction, and so does this file.

    python gcbc.py                                            # MetaWorld MT10 demonstrations (collected on first use)
    python gcbc.py --data PATH --out_dir runs/gcbc            # any RLDS / CALVIN source or mixture (see data.py)
    torchrun --nproc_per_node=8 gcbc.py --data a,b --sample_weights balance --out_dir runs/gcbc
    python eval_sim.py evaluate --ckpt runs/gcbc/ckpt.pt      # MetaWorld success rate of a checkpoint

Action convention inside this file (the reference's): 6 movement dims z-scored per dataset, and the gripper
as -1 open / +1 closed. data.py's standard action has the gripper 1 open / 0 closed; ActionNorm converts
both ways, and at test time the predicted gripper is thresholded at 0.
"""
import argparse
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF


@dataclass
class Config:
    image_size: int = 224                     # current and goal frame, resized to 224x224 (447305f)
    stage_sizes: tuple = (3, 4, 6, 3)         # basic residual blocks per stage: ResNet-34 ("resnetv1-34-bridge")
    width: int = 64                           # channels of the stem and stage 1; doubled at every later stage
    groups: int = 4                           # GroupNorm groups after every convolution
    mlp_dims: tuple = (256, 256, 256)         # MLP after the encoder: Linear -> Dropout -> SiLU, three times
    dropout: float = 0.1                      # in the MLP
    action_dim: int = 7                       # 6 z-scored movement dims + gripper (-1 open, +1 closed)
    goal_last: int = 8                        # goal uniform among the episode's last 8 frames; 1 = the final frame
    sample_weights: str = "natural"           # natural (by size) | balance (the reference's repeat formula)
    augment: bool = True                      # random resized crop + colour jitter in training
    crop_scale: tuple = (0.8, 1.0)            # RandomResizedCrop area fraction
    crop_ratio: tuple = (0.9, 1.1)            # RandomResizedCrop aspect ratio
    brightness: float = 0.2                   # ColorJitter brightness factor in [0.8, 1.2]
    contrast: tuple = (0.8, 1.2)              # ColorJitter contrast factor range
    saturation: tuple = (0.8, 1.2)            # ColorJitter saturation factor range
    hue: float = 0.1                          # ColorJitter hue shift in [-0.1, 0.1]


# ---------------------------------------------------------------------------------------------------
# The model: [obs, goal, x, y] -> ResNet-34 (GroupNorm, SiLU) -> 512 -> MLP -> 7 action means

class AddCoordinates(nn.Module):
    """Appends an x and a y channel, each running from -1 to 1 across the image (a fixed buffer)."""

    def __init__(self, size):
        super().__init__()
        ramp = torch.linspace(-1, 1, size)
        self.register_buffer("grid", torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size)]))

    def forward(self, x):  # (B, C, H, W) -> (B, C + 2, H, W)
        return torch.cat([x, self.grid.expand(len(x), -1, -1, -1)], 1)


class Block(nn.Module):
    """Basic residual block: two 3x3 convs without bias, each followed by GroupNorm; SiLU after the first
    and after the sum. A 1x1 conv + GroupNorm projects the shortcut where the shape changes."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout))
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))
                           if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.silu(self.downsample(x) + self.layers(x))


class Encoder(nn.Module):
    """ResNet-v1 from scratch on 8 channels (obs RGB, goal RGB in [-1, 1], x, y).
    224 -> stem 112 -> pool 56 -> stages 56, 28, 14, 7 (x 512) -> global average pool -> 512."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        self.spatial_coordinates = AddCoordinates(cfg.image_size)
        layers = [nn.Conv2d(8, w, 7, 2, 3, bias=False), nn.GroupNorm(cfg.groups, w), nn.SiLU(),
                  nn.MaxPool2d(3, 2, 1)]
        cin = w
        for i, n in enumerate(cfg.stage_sizes):
            for j in range(n):
                layers.append(Block(cin, w * 2**i, 2 if i > 0 and j == 0 else 1, cfg.groups))
                cin = w * 2**i
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, obs, goal):  # uint8 (B, 3, H, W) x 2 -> (B, 512)
        x = torch.cat([obs, goal], 1).float() / 127.5 - 1  # (B, 6, H, W) in [-1, 1]
        x = self.layers(self.spatial_coordinates(x))  # (B, 512, H/32, W/32)
        return x.mean((2, 3))


class GCBC(nn.Module):
    """Encoder -> MLP (Linear, Dropout, SiLU per layer) -> linear head: the means of N(mu, I) over the
    7-d action. In training, forward first augments obs and goal (the reference does it there too)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        mlp, d = [], self.encoder.out_dim
        for h in cfg.mlp_dims:
            mlp += [nn.Linear(d, h), nn.Dropout(cfg.dropout), nn.SiLU()]
            d = h
        self.mlp = nn.Sequential(*mlp)
        self.action_mean_linear = nn.Linear(d, cfg.action_dim)

    def forward(self, obs, goal):  # uint8 (B, 3, H, W) x 2 -> action means (B, 7)
        if self.training and self.cfg.augment:
            obs, goal = augment(obs, goal, self.cfg)
        return self.action_mean_linear(self.mlp(self.encoder(obs, goal)))


# ---------------------------------------------------------------------------------------------------
# Augmentation (training only): one random resized crop and one colour jitter per sample, shared by the
# sample's observation and its goal. Deviation: the reference calls torchvision once on the whole batch,
# so every sample of a micro-batch gets the same crop and jitter; the JAX original (and this file) draw
# per sample, the same for observation and goal (augment_next_obs_goal_differently=False).

def augment(obs, goal, cfg):  # uint8 (B, 3, H, W) x 2 -> the same, augmented
    transform = T.Compose([
        T.RandomResizedCrop(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue)])
    pairs = torch.stack([transform(pair) for pair in torch.stack([obs, goal], 1)])  # (B, 2, 3, H, W): one draw each
    return pairs[:, 0], pairs[:, 1]


# ---------------------------------------------------------------------------------------------------
# Actions: data.py's standard action <-> the reference's targets, and the loss

class ActionNorm:
    """Per-dataset conversion (index = dataset_id of a mixture). Movement: z-scored with the dataset's
    mean and std (std 0 -> 1, as the reference). Gripper: standard 1 open / 0 closed <-> -1 open / +1
    closed (g_ref = 1 - 2 g), not normalised; a predicted gripper is thresholded at 0."""

    def __init__(self, stats):
        mean = torch.tensor([s["action"]["mean"][:6] for s in stats], dtype=torch.float32)  # (D, 6)
        std = torch.tensor([s["action"]["std"][:6] for s in stats], dtype=torch.float32)
        self.mean, self.std = mean, torch.where(std > 0, std, torch.ones_like(std))

    def encode(self, action, dataset_id):  # standard (B, 7) -> reference targets (B, 7)
        mean, std = self.mean.to(action.device)[dataset_id], self.std.to(action.device)[dataset_id]
        return torch.cat([(action[:, :6] - mean) / std, 1 - 2 * action[:, 6:]], 1)

    def decode(self, pred, dataset_id):  # reference prediction (B, 7) -> standard action (B, 7)
        mean, std = self.mean.to(pred.device)[dataset_id], self.std.to(pred.device)[dataset_id]
        return torch.cat([pred[:, :6] * std + mean, (pred[:, 6:] < 0).float()], 1)  # < 0: open -> 1


def loss(model, batch, norm):
    """-log N(a | mu, I) averaged over the batch = 0.5 sum_7 (mu - a)^2 + 3.5 log(2 pi): the reference's
    actor loss, all 7 dims with weight 1 (6 z-scored movement dims and the +-1 gripper)."""
    obs, goal = batch["image_primary"][:, -1], batch["goal_image_primary"]  # uint8 (B, 3, H, W)
    target = norm.encode(batch["action"][:, -1, 0], batch["dataset_id"])  # (B, 7)
    mu = model(obs, goal)  # (B, 7)
    sq = (mu.float() - target).square().sum(1)  # (B,)
    nll = 0.5 * sq.mean() + 0.5 * target.shape[1] * np.log(2 * np.pi)
    gripper_acc = ((mu[:, 6] > 0) == (target[:, 6] > 0)).float().mean()
    return nll, {"mse": sq.mean().detach(), "gripper_acc": gripper_acc}


def balance_weights(steps, episodes, avg_episodes=3500):
    """The reference's `--sample_weights balance`: every trajectory of dataset d is repeated
    min((r1 + r2) // 2, 10) times, r1 = max(1, int(N_max / N_d - 0.5)) with N = transitions and
    r2 = max(1, avg_episodes // T_d) with T = trajectories. Returns the resulting sampling weights
    (repeats x transitions), to be normalised by data.py."""
    repeats = [min((max(1, int(max(steps) / n - 0.5)) + max(1, avg_episodes // t)) // 2, 10)
               for n, t in zip(steps, episodes)]
    return [r * n for r, n in zip(repeats, steps)]


# ---------------------------------------------------------------------------------------------------
# Policy for the simulator

class Policy:
    """act(obs) -> standard 7-d actions. The goal image comes from the environment side: eval_sim gives
    the last frame of the expert's successful rollout of the same task variation (wants_goal_image)."""
    wants_goal_image, views = True, ("image_primary",)  # the observation images it reads (+ the goal image)

    def __init__(self, model, stats, device="cpu", dataset="metaworld"):
        self.model, self.device = model.to(device).eval(), torch.device(device)
        self.norm = ActionNorm(stats)
        # movement statistics of the training source named `dataset` (else the first)
        self.dataset_id = next((i for i, s in enumerate(stats) if s["name"] == dataset), 0)

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        cfg = Config(**ckpt["config"])
        model = GCBC(cfg)
        model.load_state_dict(ckpt["model"])
        return cls(model, ckpt["stats"], device)

    def reset(self, num_envs):
        pass  # single frame, no history

    def _image(self, x):  # uint8 (N, 3, h, w) numpy -> uint8 (N, 3, S, S) on the device
        x = torch.as_tensor(np.asarray(x)).to(self.device)
        size = self.model.cfg.image_size
        if x.shape[-2:] == (size, size):
            return x  # else as main's training frames (data.resize "bicubic") and the reference: uint8, antialiased
        return TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)

    @torch.inference_mode()
    def act(self, obs, instructions):  # instructions are ignored: GC-BC is conditioned on the goal image
        mu = self.model(self._image(obs["image_primary"]), self._image(obs["goal_image_primary"]))  # (N, 7)
        return self.norm.decode(mu.float(), self.dataset_id).cpu().numpy()  # (N, 7), gripper 1 open / 0 closed


# ---------------------------------------------------------------------------------------------------
# Command line: data -> train -> MetaWorld evaluation

# The CPU default run (see main): ~0.4 s a step on 2 cores, so training and the 200-episode mt10 evaluation
# (which first runs the expert on each variation for its goal image) fit ~30 minutes.
CPU_SIZE, CPU_STEPS, CPU_BATCH, CPU_EVAL_EPISODES = 64, 2000, 32, 20


def main():
    import functools
    import data
    import eval_sim
    import train
    cpu = not torch.cuda.is_available()
    # The reference's OXE pretraining recipe (README: 150k steps, global batch 288, AdamW with weight decay
    # 1e-5, lr 1e-4 after 10k linear warmup steps back down to 5e-6, grad clip 10). Deviations (train.py):
    # a cosine instead of a linear decay, and no weight decay on biases and norms.
    reference = Config(), train.TrainConfig(out_dir="runs/gcbc", steps=150_000, batch_size=288, lr=1e-4, min_lr=5e-6,
                                            warmup=10_000, weight_decay=1e-5, grad_clip=10.0, ckpt_every=5000,
                                            log_every=100)
    # On a CPU, a short run of the same network: MetaWorld's 128-px frames resized down to CPU_SIZE (the
    # parameter count does not depend on it), CPU_STEPS steps of CPU_BATCH, and the JAX original's lr 3e-4.
    cpu_defaults = Config(image_size=CPU_SIZE), replace(reference[1], steps=CPU_STEPS, batch_size=CPU_BATCH, lr=3e-4,
                                                        min_lr=3e-5, warmup=CPU_STEPS // 10, ckpt_every=CPU_STEPS,
                                                        log_every=10)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_args(p)
    p.add_argument("--eval_episodes", type=int, default=None,
                   help=f"MetaWorld episodes per task after training (default: {CPU_EVAL_EPISODES if cpu else 10} "
                        f"when training on the MetaWorld default, else 0)")
    p.add_argument("--eval_tasks", default="mt10", help="mt10, mt50 or a comma list of MetaWorld tasks")
    args, (cfg, tcfg) = train.parse_args(*(cpu_defaults if cpu else reference), parser=p)
    if cpu:
        print(f"gcbc: no GPU, so the CPU defaults: {tcfg.steps} steps of batch {tcfg.batch_size} at "
              f"{cfg.image_size}x{cfg.image_size} (the reference: 150k steps of 288 at 224x224)")

    # Goal relabelling is data.py's goal_last: uniform among the episode's last N frames, never before t.
    # (The reference draws among the last 8 and takes the final frame when the draw lies before t.)
    # Frames are resized bicubic with antialiasing on the uint8 tensor, as the reference's preprocess_and_save.py
    # and eval_calvin.py.
    spec = args.data or eval_sim.default_data()
    window = dict(split=args.split, keys=data.keys_from(args), calvin_all_frames=args.calvin_all_frames,
                  image_size=cfg.image_size, goal_last=cfg.goal_last, seed=tcfg.seed, interpolation="bicubic",
                  cache_frames=args.cache_frames)
    ds = data.load(spec, **window)
    if cfg.sample_weights == "balance":
        if data.parse_sources(spec)[1] is not None:
            raise SystemExit("gcbc.py: give --sample_weights balance or weights in --data, not both")
        ds = data.load(spec, weights=balance_weights([s["num_steps"] for s in ds.stats],
                                                     [s["num_episodes"] for s in ds.stats]), **window)
    elif cfg.sample_weights != "natural":
        raise SystemExit(f"gcbc.py: --sample_weights is natural or balance, not '{cfg.sample_weights}' "
                         f"(explicit proportions: --data a:0.7,b:0.3)")
    if int(os.environ.get("RANK", 0)) == 0:
        for s, w in zip(ds.stats, ds.weights):
            print(f"gcbc: {s['name']}: {s['num_episodes']:,} episodes, {s['num_steps']:,} steps, weight {w:.3f}")

    torch.manual_seed(tcfg.seed)  # the initial weights: the same run twice starts from the same model
    model = train.train(GCBC(cfg), functools.partial(loss, norm=ActionNorm(ds.stats)), ds, tcfg, method="gcbc",
                        config=asdict(cfg))
    episodes = args.eval_episodes if args.eval_episodes is not None else \
        (0 if args.data else CPU_EVAL_EPISODES if cpu else 10)
    if episodes and int(os.environ.get("RANK", 0)) == 0:
        device = next(model.parameters()).device
        results = eval_sim.evaluate(Policy(model, ds.stats, device), args.eval_tasks, episodes,
                                    os.path.join(tcfg.out_dir, "eval"), method="gcbc")
        train.log_evaluation(tcfg, results)  # --log: the success rates beside the training's rows


if __name__ == "__main__":
    import train
    train.cli(main)  # bad input (data, checkpoint, flags): one line and exit status 2

"""A tiny behaviour-cloning run on the real Bridge sample, for the train.py tests.

    python tests/tiny_job.py OUT                          # one process
    torchrun --nproc_per_node=2 tests/tiny_job.py OUT     # two ranks (gloo on CPU), same global batch
    python tests/tiny_job.py OUT --steps 100 --stall_at 2 # rank 0 stops (sleeps) in its 2nd step
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import train  # noqa: E402

BRIDGE = ROOT.parent / "shared" / "data" / "oxe" / "bridge_dataset" / "1.0.0"


class Tiny(nn.Module):
    """image + state -> 7-d action."""

    def __init__(self, dropout=0.0, width=32):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 + 7, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 7))

    def forward(self, batch):
        image = batch["image_primary"][:, -1].float() / 255  # (B, 3, H, W), newest frame
        return self.head(torch.cat([self.conv(image), batch["state"][:, -1]], -1))  # (B, 7)


def loss_fn(model, batch):
    pred = model(batch)
    target = batch["action"][:, -1, 0]  # (B, 7)
    return F.mse_loss(pred, target), {"mae": (pred - target).abs().mean()}


def run(out, steps=10, dropout=0.0, width=32, crash_at=None, stall_at=None, stall_rank=0, say=print, **overrides):
    """overrides: TrainConfig fields (log="tensorboard": --log; `say` is where train.train's lines go).
    crash_at: raise KeyboardInterrupt in that loss call, as a killed job would stop; stall_at: rank
    stall_rank sleeps in that loss call, as a stopped (SIGSTOP) or hung process would."""
    torch.manual_seed(0)
    model = Tiny(dropout, width)
    ds = data.load(str(BRIDGE), image_size=32)
    cfg = train.TrainConfig(**{**dict(out_dir=str(out), steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=2,
                                      ckpt_every=5, log_every=1, workers=0, seed=0), **overrides})
    rank, calls = int(os.environ.get("RANK", 0)), [0]

    def faulty(net, batch):
        if net is not model and getattr(net, "module", None) is not model:  # train.count_flops's copy: not a step
            return loss_fn(net, batch)
        calls[0] += 1
        if crash_at is not None and calls[0] > crash_at:
            raise KeyboardInterrupt("simulated kill")
        if calls[0] == stall_at and rank == stall_rank:
            time.sleep(600)
        return loss_fn(net, batch)

    return train.train(model, faulty, ds, cfg, method="tiny", config={"dropout": dropout, "width": width}, log=say)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--stall_at", type=int, default=None)
    p.add_argument("--stall_rank", type=int, default=0)
    p.add_argument("--dist_timeout", type=int, default=None)
    p.add_argument("--log", default="none")
    args = p.parse_args()
    timeout = {} if args.dist_timeout is None else {"dist_timeout": args.dist_timeout}
    model = run(args.out, args.steps, stall_at=args.stall_at, stall_rank=args.stall_rank, log=args.log, **timeout)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(model.state_dict(), Path(args.out) / "final.pt")


if __name__ == "__main__":
    train.cli(main)

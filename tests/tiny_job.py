"""A tiny behaviour-cloning run on the real Bridge sample, for the train.py tests.

    python tests/tiny_job.py OUT                          # one process
    torchrun --nproc_per_node=2 tests/tiny_job.py OUT     # two ranks (gloo on CPU), same global batch
"""
import sys
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

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8 + 7, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 7))

    def forward(self, batch):
        image = batch["image_primary"][:, -1].float() / 255  # (B, 3, H, W), newest frame
        return self.head(torch.cat([self.conv(image), batch["state"][:, -1]], -1))  # (B, 7)


def loss_fn(model, batch):
    pred = model(batch)
    target = batch["action"][:, -1, 0]  # (B, 7)
    return F.mse_loss(pred, target), {"mae": (pred - target).abs().mean()}


def run(out, steps=10, dropout=0.0, crash_at=None, **overrides):
    torch.manual_seed(0)
    model = Tiny(dropout)
    ds = data.load(str(BRIDGE), image_size=32)
    cfg = train.TrainConfig(out_dir=str(out), steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=2,
                            ckpt_every=5, log_every=1, workers=0, seed=0, **overrides)
    calls = [0]

    def maybe_crash(model, batch):  # a crash in the middle of a run, as a killed job would leave it
        calls[0] += 1
        if crash_at is not None and calls[0] > crash_at:
            raise KeyboardInterrupt("simulated kill")
        return loss_fn(model, batch)

    return train.train(model, maybe_crash, ds, cfg, method="tiny", config={"dropout": dropout})


if __name__ == "__main__":
    model = run(sys.argv[1])
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        torch.save(model.state_dict(), Path(sys.argv[1]) / "final.pt")

"""train.py: the one training loop every method's main() calls.

    train(model, loss_fn, dataset, cfg, method="rt1", config=asdict(model_cfg))

torchrun DDP (NCCL on GPU, gloo on CPU), bf16 autocast where supported, AdamW (fused on GPU) with warmup
then cosine, gradient clipping and accumulation, optional torch.compile, a tqdm bar with ETA and
samples/s, metrics.jsonl and loss.png, and atomic checkpoints that resume bit for bit.

Exactness: the data order is a function of (seed, step) alone (data.Sampler), and the torch RNG is
re-seeded from (seed, rank, step) before every step, so a resumed run draws the same dropout masks
as one that never stopped. Only rank 0 writes and prints.
"""
import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as data_lib


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000          # optimiser steps
    batch_size: int = 64       # global: summed over ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5       # end of the cosine
    warmup: int = 100          # linear warmup steps
    weight_decay: float = 0.01 # on matrices only, not on biases and norms
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0     # max global grad norm; 0 disables
    dtype: str = "auto"        # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp32
    compile: bool = False      # torch.compile the model
    workers: int = -1          # DataLoader workers per rank; -1: cores per rank - 1
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    resume: bool = True        # continue out_dir/ckpt.pt if it exists (--no-resume starts afresh)
    find_unused: bool = False  # DDP: some parameters get no gradient in a step (e.g. per-dataset heads)


class CheckpointError(ValueError):
    pass


def parse_args(*configs, parser=None, argv=None):
    """One --flag per dataclass field (defaults from the given instances), except fields marked
    field(metadata={"from_data": True}), which a method sets from its data. Returns (args, configs)."""
    parser = parser or argparse.ArgumentParser()
    seen = {a.dest for a in parser._actions}
    flags = lambda c: [f for f in fields(c) if not f.metadata.get("from_data")]
    for cfg in configs:
        group = parser.add_argument_group(type(cfg).__name__)
        for f in flags(cfg):
            if f.name in seen:
                raise ValueError(f"--{f.name} is defined twice ({type(cfg).__name__} and another config)")
            seen.add(f.name)
            default = getattr(cfg, f.name)
            if isinstance(default, bool):
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
            elif isinstance(default, (tuple, list)):
                group.add_argument(f"--{f.name}", nargs="+", type=type(default[0]), default=default)
            else:
                group.add_argument(f"--{f.name}", type=type(default) if default is not None else str, default=default)
    args = parser.parse_args(argv)
    out = [replace(c, **{f.name: type(getattr(c, f.name))(getattr(args, f.name))
                         if isinstance(getattr(c, f.name), tuple) else getattr(args, f.name) for f in flags(c)})
           for c in configs]
    return args, out


# ---------------------------------------------------------------------------------------------------
# distributed setup

def distributed():
    """(rank, world, device) from torchrun's environment; initialises the process group if world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def step_seed(seed, rank, step):
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary file, flushed, then renamed over the old one (atomic on POSIX)

def save_checkpoint(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """A nanorobot checkpoint (weights only), or a CheckpointError that names the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("method", "config", "model", "stats", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a nanorobot checkpoint (missing keys {missing})")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# the loop

def lr_at(step, cfg):
    """Linear warmup to cfg.lr, then cosine down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_dtype(cfg, device):
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def train(model, loss_fn, dataset, cfg, method, config, log=print):
    """Train `model` on `dataset` (a data.Mixture) with loss_fn(model, batch) -> (loss, metrics).
    loss_fn must call model(...) itself (DDP and torch.compile wrap the forward). Returns the model."""
    rank, world, device = distributed()
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by ranks x --grad_accum = "
                         f"{world} x {cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    model.to(device)
    opt = make_optimizer(model, cfg, device)
    start = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["method"] != method:
            raise CheckpointError(f"{ckpt_path} is a '{ckpt['method']}' run, not '{method}': use another --out_dir")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
        if rank == 0:
            log(f"resuming {ckpt_path} at step {start}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(dataset.stats, indent=1))
        _trim_log(out / "metrics.jsonl", start)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=cfg.find_unused) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    workers = max(1, (os.cpu_count() or 2) // world - 1) if cfg.workers < 0 else cfg.workers
    batches = iter(data_lib.loader(dataset, micro, rank, world, cfg.seed, start * cfg.batch_size, workers,
                                   pin_memory=device.type == "cuda"))
    amp = autocast_dtype(cfg, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        log(f"{method}: {n_params:,} trainable parameters | {world} rank(s) on {device.type} | "
            f"{amp or torch.float32} | global batch {cfg.batch_size} = {world} x {micro} x {cfg.grad_accum} | "
            f"steps {start} -> {cfg.steps}")
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True, unit="step")
    t_last, n_logged, sums = time.time(), 0, {}
    for step in range(start, cfg.steps):
        torch.manual_seed(step_seed(cfg.seed, rank, step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.train()
        for m in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else net.no_sync()
            with sync, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = loss_fn(net, batch)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():  # kept on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip).detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        done, n_logged = step + 1, n_logged + 1
        last, save = done == cfg.steps, done % cfg.ckpt_every == 0 or done == cfg.steps
        if done % cfg.log_every == 0 or save:
            row = _log_row(sums, n_logged, world, device)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"{method}: the loss became {row['loss']} before step {done}; "
                                         f"the last checkpoint is untouched")
            row = {"step": done, **row, "lr": lr_at(step, cfg),
                   "samples_per_s": n_logged * cfg.batch_size / (time.time() - t_last)}
            if rank == 0:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}")
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            t_last, n_logged, sums = time.time(), 0, {}
        if save:
            if rank == 0:
                save_checkpoint(ckpt_path, {
                    "method": method, "config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "step": done, "stats": dataset.stats, "instructions": dataset.instructions,
                    "train_config": asdict(cfg)})
            if world > 1:
                dist.barrier()
        if last and rank == 0:
            log(f"done: {out / 'ckpt.pt'} (loss {row['loss']:.4f})")
    bar.close()
    if rank == 0 and (out / "metrics.jsonl").exists():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if world > 1:
        dist.destroy_process_group()
    return model


def _log_row(sums, n_steps, world, device):
    """Mean of each metric over the logged steps and over ranks."""
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k]).to(device, torch.float64) for k in keys]) / n_steps
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def _trim_log(path, step):
    """On resume, forget rows logged after the checkpoint (they will be logged again)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def plot_losses(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(r) for r in Path(metrics_path).read_text().splitlines() if r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", title=Path(metrics_path).parent.name)
    ax.set_yscale("log" if min(r["loss"] for r in rows) > 0 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)

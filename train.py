"""train.py: the one training loop every method's main() calls.

    train(model, loss_fn, dataset, cfg, method="rt1", config=asdict(model_cfg))

torchrun DDP (NCCL on GPU, gloo on CPU), bf16 autocast where supported, fused AdamW with warmup
then cosine, gradient clipping and accumulation, optional torch.compile, a tqdm bar with ETA and
samples/s, metrics.jsonl and loss.png (and TensorBoard or wandb with --log), and atomic checkpoints that
resume bit for bit.

Exactness: the data order is a function of (seed, step) alone (data.Sampler), and the torch RNG is
re-seeded from (seed, rank, step) before every step, so a resumed run draws the same dropout masks
as one that never stopped. Only rank 0 writes and prints.

Reliability: rank 0 holds an exclusive lock on --out_dir for the whole run (a second run there is refused,
naming the holder's pid), removes temporary checkpoint files that killed runs left, and drops a cut last row
of metrics.jsonl; resuming with flags whose model the checkpoint's weights do not fit is refused, naming the
settings that differ, and other differing settings are a warning. A rank that waits more than --dist_timeout
seconds for its peers fails the job, naming itself and the step.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import fcntl
import json
import math
import os
import pickle
import re
import socket
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.flop_counter
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as data_lib


TRACKERS = ("none", "tensorboard", "wandb")  # --log


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
    dtype: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})  # auto: autocast_dtype
    channels_last: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})  # NHWC convolutions
    compile: bool = False      # torch.compile the model
    workers: int = -1          # DataLoader workers per rank; -1: cores per rank - 1
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep: int = 0              # also keep N evenly spaced weights-only snapshots ckpt_<step>.pt, the last included
    resume: bool = True        # continue out_dir/ckpt.pt if it exists (--no-resume starts afresh)
    find_unused: bool = False  # DDP: some parameters get no gradient in a step (e.g. per-dataset heads)
    dist_timeout: int = 600    # seconds a rank waits for the others before the job fails (gloo's default: 1800)
    log: str = field(default="none", metadata={"choices": TRACKERS})  # also send the metrics rows there (rank 0)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


class RunError(ValueError):
    """A run that cannot start or go on: the message names the flag, file or rank and what was expected."""


def cli(main):
    """Run a command line's main(). Bad input (a DataError, CheckpointError, RunError or eval_sim's EvalError,
    whose messages name the file, flag or key) ends it with one line on stderr and exit status 2, as argparse
    does for a bad flag; any other exception keeps its traceback. Each method file ends with cli(main)."""
    try:
        return main()
    except Exception as e:
        eval_sim = sys.modules.get("eval_sim")  # not imported here: it brings in MuJoCo
        bad_input = (data_lib.DataError, CheckpointError, RunError) + ((eval_sim.EvalError,) if eval_sim else ())
        if not isinstance(e, bad_input):
            raise
        exit_with(f"{os.path.basename(sys.argv[0])}: {e}")


def exit_with(message, status=2):
    """Print message on stderr and exit with status. The SystemExit's text is the message, for callers
    that catch it (tests, notebooks)."""
    print(message, file=sys.stderr)
    error = SystemExit(message)
    error.code = status
    raise error


def one_line(error):
    """An exception's message on one line: whitespace runs and terminal colour codes collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())


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
                group.add_argument(f"--{f.name}", type=type(default) if default is not None else str, default=default,
                                   choices=f.metadata.get("choices"))
    args = parser.parse_args(argv)
    out = [replace(c, **{f.name: type(getattr(c, f.name))(getattr(args, f.name))
                         if isinstance(getattr(c, f.name), tuple) else getattr(args, f.name) for f in flags(c)})
           for c in configs]
    return args, out


# ---------------------------------------------------------------------------------------------------
# distributed setup

def distributed(timeout=600):
    """(rank, world, device) from torchrun's environment; initialises the process group if world > 1, with
    collectives that fail after `timeout` seconds without an answer from every rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return rank, world, device


def step_seed(seed, rank, step):
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary file, flushed, then renamed over the old one (atomic on POSIX)

def save_checkpoint(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """A nanorobot checkpoint, read with weights_only=True (tensors and plain data only: no code runs), or
    a CheckpointError that names the file and what is wrong. A folder is an export (load_export)."""
    if Path(path).is_dir():
        return load_export(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:  # torch's text: a paragraph on weights_only, then the reason
        reason = one_line(e).partition("WeightsUnpickler error: ")[2].partition(" Check the documentation")[0]
        if not reason or reason.startswith("Unsupported operand"):  # garbage, not a refused object
            raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError: "
                                  f"{reason or one_line(e)})") from None
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True), which admits tensors and plain data only "
            f"({reason.split('. ')[0].rstrip('.')}); a nanorobot checkpoint holds nothing else. Load it with "
            f"weights_only=False only if you trust its source: unpickling runs the code a file names") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {one_line(e)})") from None
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: not a nanorobot checkpoint ({problem}); expected a dict with method (a "
                              f"string), config (a dict), model (a state_dict), stats (a dict per data source) "
                              f"and step (an int)")
    return ckpt


def checkpoint_problem(ckpt):
    """What keeps `ckpt` from being a nanorobot checkpoint, in a few words; None if nothing does."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    missing = [k for k in ("method", "config", "model", "stats", "step") if k not in ckpt]
    if missing:
        return f"missing keys {missing}"
    for key, kind, ok in [("method", "a string", isinstance(ckpt["method"], str) and ckpt["method"]),
                          ("config", "a dict", isinstance(ckpt["config"], dict)),
                          ("model", "a dict", isinstance(ckpt["model"], dict)),
                          ("step", "an int >= 0", type(ckpt["step"]) is int and ckpt["step"] >= 0)]:
        if not ok:
            return f"{key} is {ckpt[key]!r:.40}, not {kind}"
    stats = ckpt["stats"]
    if not isinstance(stats, list) or not stats or not all(isinstance(s, dict) for s in stats):
        return f"stats is {stats!r:.40}, not a list of one dict per data source"
    return None


# ---------------------------------------------------------------------------------------------------
# export: a checkpoint's policy as safetensors and JSON, which load back without pickle

EXPORTED = ("method", "config", "train_config", "step", "amp_dtype", "channels_last", "instructions",
            "train_seconds")  # config.json


def export(ckpt_path, out_dir):
    """Write checkpoint `ckpt_path`'s policy to the folder out_dir: model.safetensors (the weights; a tensor that
    shares its storage with another is stored once, and config.json's "shared" names it), config.json (the
    checkpoint's EXPORTED keys: what eval_sim.rebuild_policy reads besides tensors, without the optimizer state)
    and stats.json (the normalisation statistics). Returns out_dir as a Path."""
    from safetensors.torch import save
    ckpt, out = load_checkpoint(ckpt_path), Path(out_dir)
    weights, shared = stored_once(ckpt["model"])
    config = {k: ckpt[k] for k in EXPORTED if k in ckpt} | {"shared": shared}
    files = {"model.safetensors": save(weights, metadata={"format": "pt"}),
             "config.json": as_json(config, ckpt_path, "its config"),
             "stats.json": as_json(ckpt["stats"], ckpt_path, "its stats")}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot make the export folder ({e.strerror})") from None
    for name, blob in files.items():
        atomic_write(out / name, lambda f: f.write(blob))
    return out


def stored_once(state_dict):
    """-> (the tensors to store, {key: the stored key whose storage it shares}). safetensors refuses tensors that
    share memory (tied weights): each is stored once, contiguous, in a storage of its own."""
    tensors, shared, seen = {}, {}, {}
    for key, t in state_dict.items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if where in seen:
            shared[key] = seen[where]
        else:
            seen[where], tensors[key] = key, t.detach().clone(memory_format=torch.contiguous_format)
    return tensors, shared


def as_json(value, path, what):
    """value as indented JSON bytes, or a CheckpointError naming the checkpoint and what JSON cannot hold."""
    try:
        return json.dumps(value, indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {what} cannot be written as JSON ({one_line(e)}); an export holds plain "
                              f"numbers, strings, lists and dicts besides the weights") from None


def load_export(folder):
    """An exported folder -> the checkpoint dict load_checkpoint returns (method, config, model, stats, step, ...,
    without the optimizer state), read with json and safetensors only: no pickle, no code runs. A
    CheckpointError names the file and what is wrong."""
    from safetensors.torch import load_file
    folder = Path(folder)
    for name in ("config.json", "stats.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} there; expected an exported policy (model.safetensors, "
                                  f"config.json, stats.json: python eval_sim.py export) or a checkpoint file")
    try:
        config, stats = (json.loads((folder / name).read_text()) for name in ("config.json", "stats.json"))
        model = load_file(folder / "model.safetensors")
        model |= {alias: model[key] for alias, key in config.pop("shared", {}).items()}
    except Exception as e:
        raise CheckpointError(f"{folder}: not a readable export ({type(e).__name__}: {one_line(e)})") from None
    ckpt = config | {"model": model, "stats": stats}
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{folder}: not a nanorobot export ({problem})")
    return ckpt


def state_dict_misfit(error):
    """torch's load_state_dict error (a header, then one line per kind of problem) -> one line: the keys
    missing or unexpected, and the first shape mismatches."""
    parts, shapes = [], []
    for line in str(error).splitlines()[1:]:
        line, keys = line.strip(), re.findall(r'"([^"]+)"', line)
        size = re.match(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", line)
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            where = "the checkpoint lacks" if line.startswith("Missing") else "the model has no"
            parts.append(f"{where} {len(keys)} key(s): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
        elif size:
            shapes.append(f"{size[1]} is {size[2]} in the checkpoint, {size[3]} in the model")
    if shapes:
        parts.append("; ".join(shapes[:3]) + (f"; {len(shapes) - 3} more shapes differ" if len(shapes) > 3 else ""))
    return "; ".join(parts) or one_line(error)


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
    # fused: one kernel per step instead of a loop over the parameters, on a GPU and on a CPU alike (on the 2-core
    # CPU 3-4x faster than the loop, 2-40 ms of a step; its updates differ from the loop's in the last bit of a
    # few elements: docs/benchmarks.md, "Fused AdamW and bf16 attention on a CPU")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """Each gradient of a convolution (input, weight) costs what its forward does. torch's own formula counts
    a grouped convolution's weight gradient as if it were dense, `groups` times too many: it made RT-1's
    depthwise EfficientNet-B3 look 13x costlier than it is."""
    forward = torch.utils.flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def train_flops(model, loss_fn, batch, amp=None):
    """FLOPs of one training step's forward and backward on `batch` (the optimiser's are negligible), counted
    by torch.utils.flop_counter (matmuls and convolutions). Leaves the model's gradients cleared."""
    counter = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter, precision(next(model.parameters()).device, amp):
        loss_fn(model, batch)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@functools.lru_cache
def matmul_peak(device, dtype=torch.float32, threads=None):
    """This machine's own peak FLOP/s in `dtype`: the best of a few large square matmuls (n = 2048 on a CPU,
    with the current torch thread count; 8192 on a GPU). Cached per (device, dtype, threads): about 1 s."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.ones(n, n, device=device, dtype=dtype)  # the values do not change the time, and no RNG is drawn
    b = torch.ones(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(4):  # the first is a warm-up that rarely wins
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# What "auto" picks on a CPU, per method: the faster of fp32 / bf16 / NHWC in each method's CPU-default step,
# `python bench.py --levers` on the idle 2-core machine (AVX512-BF16 and AMX), bf16 only where `python bench.py
# --check dtype --steps 200` found the same loss as fp32 (docs/benchmarks.md, "Fused AdamW and bf16 attention on
# a CPU"). Samples/s before issue 16 -> chosen (2026-12-05): RT-1 39.5 -> 56.8 (NHWC; bf16 + NHWC 41.6: oneDNN's
# bf16 depthwise-convolution backward is slow), GC-BC 79.2 -> 108.1 (bf16), HPT 75.5 -> 107.5 (bf16 + NHWC, with
# the math attention kernel), GR-1 50.2 -> 50.8 (fp32: bf16 was 1.06x faster in its real run but its 200-step
# loss 8.10 against fp32's 7.73), MCR 12.7 -> 23.1 (bf16 + NHWC).
CPU_BF16 = frozenset({"gcbc", "hpt", "mcr"})
CPU_CHANNELS_LAST = frozenset({"rt1", "hpt", "mcr"})


def bf16_native(device):
    """Whether `device` computes bf16 natively: CUDA with bf16, or a CPU with oneDNN's bf16 (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(cfg, device, method=None):
    """-> torch.bfloat16 or None (fp32) for --dtype: auto is bf16 on a GPU that has it, and on a CPU with native
    bf16 for the methods in CPU_BF16."""
    if cfg.dtype == "auto":
        gpu = device.type == "cuda"
        return torch.bfloat16 if bf16_native(device) and (gpu or method in CPU_BF16) else None
    return torch.bfloat16 if cfg.dtype == "bf16" else None


@contextlib.contextmanager
def precision(device, amp):
    """The context of a training step's forward and backward: bf16 autocast when `amp`, else fp32. Under bf16 on a
    CPU, attention runs torch's math kernel (its matmuls and softmax, differentiated by autograd): torch's bf16
    flash-attention backward on a CPU is ~10x slower than its fp32 one, and the math kernel's matmuls use the
    CPU's bf16 units (docs/benchmarks.md, "Fused AdamW and bf16 attention on a CPU")."""
    if amp is None:
        yield
        return
    math_attention = sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=amp), math_attention:
        yield


def use_channels_last(cfg, device, method=None):
    """--channels_last: auto is on for the methods in CPU_CHANNELS_LAST on a CPU, off on a GPU."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cpu"
                                         and method in CPU_CHANNELS_LAST)


def train(model, loss_fn, dataset, cfg, method, config, log=print):
    """Train `model` on `dataset` (a data.Mixture) with loss_fn(model, batch) -> (loss, metrics).
    loss_fn must call model(...) itself (DDP and torch.compile wrap the forward). Returns the model."""
    rank, world, device = distributed(cfg.dist_timeout)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out_dir {out}: is a file; expected a folder for the run (made if missing)")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise RunError(f"--batch_size {cfg.batch_size} must be divisible by ranks x --grad_accum = "
                       f"{world} x {cfg.grad_accum}")
    with run_folder(out, log) if rank == 0 else contextlib.nullcontext():
        return _train(model, loss_fn, dataset, cfg, method, config, log, rank, world, device)


def _train(model, loss_fn, dataset, cfg, method, config, log, rank, world, device):
    """train() once rank 0 holds the run folder: resume, then the steps."""
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    micro = cfg.batch_size // (world * cfg.grad_accum)
    model.to(device)
    nhwc = use_channels_last(cfg, device, method)
    if nhwc:  # NHWC weights make every convolution compute in NHWC
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, device)
    start, seconds = 0, 0.0  # seconds: training time before this process, from the checkpoint
    if cfg.resume and ckpt_path.exists():
        start, seconds = resume(ckpt_path, model, opt, method, config, cfg, log if rank == 0 else lambda *a: None)
    if rank == 0:
        (out / "stats.json").write_text(json.dumps(dataset.stats, indent=1))
        _trim_log(out / "metrics.jsonl", start, log)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=cfg.find_unused) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    workers = max(1, (os.cpu_count() or 2) // world - 1) if cfg.workers < 0 else cfg.workers
    batches = iter(data_lib.loader(dataset, micro, rank, world, cfg.seed, start * cfg.batch_size, workers,
                                   pin_memory=device.type == "cuda"))
    amp = autocast_dtype(cfg, device, method)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        log(f"{method}: {n_params:,} trainable parameters | {world} rank(s) on {device.type} | "
            f"{amp or torch.float32}{' | channels_last' if nhwc else ''} | "
            f"global batch {cfg.batch_size} = {world} x {micro} x {cfg.grad_accum} | "
            f"steps {start} -> {cfg.steps}")
    peak = matmul_peak(device, amp or torch.float32, torch.get_num_threads())
    flops = None  # per sample, counted on the first micro-batch
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True, unit="step")
    t_last, n_logged, sums, step = time.time(), 0, {}, start
    t_start = t_last - seconds
    kept = {round(cfg.steps * i / cfg.keep) for i in range(1, cfg.keep + 1)}  # --keep's steps
    tracker = open_tracker(cfg, method, config, purge_step=start + 1) if rank == 0 else None  # its first row's step
    try:
        for step in range(start, cfg.steps):
            torch.manual_seed(step_seed(cfg.seed, rank, step))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            model.train()
            for m in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                if step == start and m == 0:
                    flops = count_flops(model, loss_fn, batch, amp, micro, log if rank == 0 else lambda *a: None)
                sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else net.no_sync()
                with sync, precision(device, amp):
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
            keep = done in kept
            if done % cfg.log_every == 0 or save:
                row = _log_row(sums, n_logged, world, device)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"{method}: the loss became {row['loss']} before step {done}; "
                                             f"the last checkpoint is untouched")
                row = {"step": done, **row, "lr": lr_at(step, cfg),
                       "samples_per_s": n_logged * cfg.batch_size / (time.time() - t_last)}
                if flops:  # achieved FLOP/s per device over its own measured peak
                    row["mfu"] = flops * row["samples_per_s"] / world / peak
                if rank == 0:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    sps=f"{row['samples_per_s']:.0f}",
                                    **({"mfu": f"{row['mfu']:.1%}"} if flops else {}))
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if tracker:
                        tracker.log(row)
                t_last, n_logged, sums = time.time(), 0, {}
            if save or keep:
                if rank == 0:
                    ckpt = {"method": method, "config": config, "model": model.state_dict(), "step": done,
                            "stats": dataset.stats, "instructions": dataset.instructions, "train_config": asdict(cfg),
                            "amp_dtype": "bf16" if amp == torch.bfloat16 else "fp32",  # resolved: eval runs in it
                            "channels_last": nhwc,  # resolved: and in this layout
                            "train_seconds": time.time() - t_start}  # wall time of the steps, over resumes
                    if keep:  # weights only: for evaluation, not for resuming
                        save_checkpoint(out / f"ckpt_{done}.pt", ckpt)
                    if save:
                        save_checkpoint(ckpt_path, {**ckpt, "optimizer": opt.state_dict()})
                if world > 1:
                    dist.barrier()
            if last and rank == 0:
                log(f"done: {out / 'ckpt.pt'} (loss {row['loss']:.4f})")
    except RuntimeError as e:
        if world > 1 and is_peer_failure(e):
            raise RunError(f"rank {rank} of {world}, step {step + 1}: the other ranks did not answer "
                           f"({peer_failure_reason(e)}): a rank died or stopped, or took longer than "
                           f"--dist_timeout {cfg.dist_timeout} s") from e
        raise
    finally:
        bar.close()  # an error's message starts on a line of its own
        if tracker:
            tracker.close()
    if rank == 0 and (out / "metrics.jsonl").exists():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if world > 1:
        dist.destroy_process_group()
    return model


def count_flops(model, loss_fn, batch, amp, micro, log):
    """FLOPs per sample of a training step, counted on a copy of the model (its BatchNorm statistics and
    gradients stay untouched) with the RNG restored after, so the run is exactly the one without it.
    None, after one logged line, if the counter cannot run the model."""
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return train_flops(copy.deepcopy(model), loss_fn, batch, amp) / micro
    except Exception as e:
        log(f"MFU not shown: counting the FLOPs failed ({one_line(e)})")
        return None


def is_peer_failure(error):
    """A collective that timed out or lost its connection (gloo raises a plain RuntimeError that names its
    own source file; NCCL a DistBackendError), not an error in the model or the loss."""
    return isinstance(error, dist.DistError) or "gloo" in str(error) or "NCCL" in str(error)


def peer_failure_reason(error):
    """gloo's '[.../unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete' -> the
    part after the source location, up to its first full stop."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", one_line(error))
    return text.split(". ")[0].rstrip(".")


# ---------------------------------------------------------------------------------------------------
# --log: the metrics rows also to TensorBoard or wandb (rank 0); with --log none nothing is imported

def open_tracker(cfg, method=None, config=None, purge_step=None):
    """--log -> a TensorBoard or Wandb tracker of the run in --out_dir (log(row), close()); None for none."""
    out = Path(cfg.out_dir)
    if cfg.log == "tensorboard":
        return TensorBoard(out, purge_step)
    if cfg.log == "wandb":
        return Wandb(out, method, config, cfg)
    if cfg.log != "none":
        raise RunError(f"--log {cfg.log}: expected one of {', '.join(TRACKERS)}")
    return None


def log_evaluation(cfg, results, step=None):
    """--log: an evaluation's success rates (eval/success, the mean, and eval/success/<task>) at `step` (default:
    the run's last), in the same TensorBoard folder or wandb run as its training. A method's main() calls it after
    eval_sim.evaluate."""
    tracker = open_tracker(cfg)
    if tracker:
        tracker.log({"step": cfg.steps if step is None else step, "eval/success": results["mean"],
                     **{f"eval/success/{task}": rate for task, rate in results["success"].items()}})
        tracker.close()


class TensorBoard:
    """--log tensorboard: every number of a metrics row as a scalar of the same name at its step, in
    out/tensorboard. A run marks the step of its first row (purge_step), and TensorBoard drops what earlier
    runs logged from that step on: the rows a resumed run logs again, as _trim_log drops them from metrics.jsonl."""

    def __init__(self, out, purge_step=None):
        # tensorboard's own switch (its no_tensorflow build): its TensorFlow stub writes the event files, so training
        # still never imports TensorFlow (which torch.utils.tensorboard would do where it is installed: 5 s here)
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RunError(f"--log tensorboard: needs the tensorboard package ({one_line(e)}): "
                           f"pip install tensorboard") from None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def log(self, row):
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()  # on disk when metrics.jsonl's row is

    def close(self):
        self.writer.close()


class Wandb:
    """--log wandb: the metrics rows in a wandb run whose files are in out/wandb (WANDB_MODE=offline: no network,
    `wandb sync` uploads them later). Its id is kept in out/wandb_id, so a resumed run and the evaluation after
    training log into the same run. A row's "step" is the x-axis of every other number in it."""

    def __init__(self, out, method=None, config=None, cfg=None):
        try:
            import wandb
        except ImportError as e:
            raise RunError(f"--log wandb: needs the wandb package ({one_line(e)}): pip install wandb") from None
        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        settings = {"method": method, "model": config, "train": asdict(cfg)} if method else None  # at the start
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanorobot"), name=out.name, id=run_id,
                                  resume="allow", dir=str(out), config=settings)
        except wandb.errors.Error as e:
            raise RunError(f"--log wandb: wandb.init failed ({one_line(e)}); log in with `wandb login`, or set "
                           f"WANDB_MODE=offline to keep the run in {out / 'wandb'}") from None
        id_file.write_text(self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # not wandb's own step, which a resumed run cannot rewind

    def log(self, row):
        self.run.log(row)

    def close(self):
        self.run.finish()


# ---------------------------------------------------------------------------------------------------
# the run folder: one run at a time, resumed only with the model its checkpoint was trained as

@contextlib.contextmanager
def run_folder(out, log=print):
    """Rank 0's hold on --out_dir for a whole run: makes the folder, takes an exclusive lock on out/.lock
    (a second run there is refused, naming the holder's pid), and removes the temporary checkpoint files
    of killed runs. The lock is flock's: the kernel drops it when its process ends, SIGKILL included, so it
    is never stale (on a local file system; over NFS it depends on the mount)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out_dir {out}: cannot make the folder ({e.strerror}: {e.filename})") from None
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown (it just started)"
            raise RunError(f"--out_dir {out}: another run is training there (pid {holder}); wait for it to end, "
                           f"stop it, or choose another --out_dir") from None
        except OSError as e:  # a file system without flock (some NFS mounts)
            locked = False
            log(f"WARNING: cannot lock {out / '.lock'} ({e.strerror}): nothing keeps a second run out of {out}")
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            stale = sorted(p.name for p in out.iterdir() if re.fullmatch(r"\.ckpt\.pt\.tmp\d+", p.name))
            for name in stale:  # under the lock no other run writes here: each is a killed run's
                (out / name).unlink(missing_ok=True)
            if stale:
                log(f"removed {len(stale)} temporary checkpoint file(s) that killed runs left in {out}: {stale}")
        yield  # the lock is released when the file closes


# settings that do not change what a run computes: a resumed run may differ in them without a word
BOOKKEEPING = {"out_dir", "resume", "workers", "log_every", "ckpt_every", "keep", "compile", "channels_last",
               "find_unused", "dist_timeout", "log"}


def resume(path, model, opt, method, config, cfg, log):
    """Load the model and optimiser state of checkpoint `path` -> (the step to continue from, the training
    seconds spent before it). Weights that do not fit the model these settings build are an error naming the
    settings that differ from the checkpoint's; other differences (dropout, lr, ...) are a warning, and the
    run goes on with the new values, which its next checkpoint records."""
    ckpt = load_checkpoint(path)
    if ckpt["method"] != method:
        raise CheckpointError(f"{path} is a '{ckpt['method']}' run, not '{method}': use another --out_dir")
    changed = differences(config, ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: its weights do not fit the model these settings build ({state_dict_misfit(e)}); "
            + (f"settings that differ from the checkpoint's: {'; '.join(changed)}" if changed else
               "its config is the same, so the data or the method's code must differ")
            + "; resume with the checkpoint's settings, or start afresh with --no-resume or another --out_dir"
        ) from None
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: has no optimizer state, so training cannot continue from it (a checkpoint "
                              f"for evaluation only?); start afresh with --no-resume or another --out_dir")
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit the trainable parameters ({one_line(e)}); "
                              f"were parameters frozen or unfrozen? resume with the checkpoint's settings") from None
    changed += differences(asdict(cfg), ckpt.get("train_config", asdict(cfg)), skip=BOOKKEEPING)
    log(f"resuming {path} at step {ckpt['step']}")
    if changed:
        log(f"{method}: WARNING: these settings differ from the checkpoint's: {'; '.join(changed)}. The run goes on "
            f"with the new values (the first of each pair), and its next checkpoint records them")
    return ckpt["step"], float(ckpt.get("train_seconds", 0.0))


def differences(new, old, skip=()):
    """['dropout 0.3 (checkpoint: 0.1)', ...] for every key of two configs whose values differ."""
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # a tuple saved is a tuple
    keys = [k for k in list(new) + [k for k in old if k not in new] if k not in skip]
    return [f"{k} {_brief(new, k)} (checkpoint: {_brief(old, k)})" for k in keys
            if k not in new or k not in old or plain(new[k]) != plain(old[k])]


def _brief(config, key):
    """A config value in a few words: itself if short, else its type and length."""
    if key not in config:
        return "absent"
    value, text = config[key], repr(config[key])
    if len(text) <= 40:
        return text
    return f"a {type(value).__name__} of {len(value)}" if hasattr(value, "__len__") else text[:37] + "..."


def _log_row(sums, n_steps, world, device):
    """Mean of each metric over the logged steps and over ranks."""
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k]).to(device, torch.float64) for k in keys]) / n_steps
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def _trim_log(path, step, log=print):
    """On resume, forget rows logged after the checkpoint (they will be logged again). A cut last row (the
    disk filled, or the run was killed, during an append) is dropped: it was written after the checkpoint,
    whose save follows it, so it is logged again too. A broken row before it is an error naming the line."""
    if not path.exists():
        return
    if step == 0:  # starting afresh: nothing to keep
        return path.write_text("")
    lines = [(n, r) for n, r in enumerate(path.read_bytes().decode(errors="replace").split("\n"), 1) if r.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if n == lines[-1][0]:
                log(f"{path}: dropped its last row, line {n}, which was cut short: {line[:60]!r}")
                break
            raise RunError(f"{path}, line {n}: not a metrics row ({e}); expected one JSON object with an "
                           f"integer 'step' per line: repair or delete that line to resume") from None
        rows.append((row["step"], line))
    path.write_text("".join(line + "\n" for row_step, line in rows if row_step <= step))


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

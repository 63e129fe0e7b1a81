"""bench.py: how fast nanorobot trains, reads data and evaluates, measured on this machine.

    python bench.py                        # every method at its paper configuration, data.py, eval_sim
    python bench.py --methods rt1,hpt-base --steps 20
    python bench.py --no_compile --no_eval # eager rows only: minutes on a CPU instead of half an hour
    python bench.py --quick                # tiny configurations on the CPU in under a minute (tests/test_bench.py)
    python bench.py --data PATH            # data.py's frames/s on PATH (default: the MetaWorld data, if collected)
    python bench.py --methods rt1 --no_eval --data_before /tmp/before   # + main's data.py (git worktree add ...)
    python bench.py --methods hpt-base --steps 6 --no_eval   # + HPT live frames vs cached features, feature pass
    python bench.py --levers               # each method's CPU-default step: before issue 16, fp32 / bf16 x NCHW / NHWC
    python bench.py --check dtype          # each method's real CPU-default run, fp32 vs bf16 (also: compile,
                                           # workers): loss, samples/s
    python bench.py --act runs/gr1/ckpt.pt # a checkpoint's Policy.act at batch 20, NCHW vs NHWC: ms per evaluation step
    python bench.py --profile rt1          # where one paper-config training step spends its time, by operator

Training rows: samples/s of whole training steps (forward, loss, backward, AdamW) in bf16 autocast on a GPU
and fp32 on a CPU, without and with torch.compile, on a synthetic batch with the shapes and dtypes each
method's loss reads (random pixels and actions: this measures the model, not the data, which has its own row).
FLOPs are counted with torch.utils.flop_counter over one training step (forward + backward); MFU is the
achieved FLOP/s (FLOPs per sample x the best samples/s) over this machine's own peak in the row's dtype,
measured by train.matmul_peak (large square matmuls, best of a few; printed in the header). Frozen
parts (GR-1's MAE, HPT's ResNet-18 when frozen) run their forward inside the step and count.

With an hpt method, a second table compares HPT's training step on live frames (the frozen ResNet-18 inside the
step, as in the rows above) with the step on the same frames' cached features (what hpt.py trains on with
--resnet_weights), Small with 1 frame and Base with 4, timed interleaved step by step on one batch; and the
one-time feature pass (hpt.cached_features: decode, resize, ResNet-18, write) over the data row's dataset.
"""
import argparse
import contextlib
import io
import os
import sys
import time

import torch

from train import matmul_peak, train_flops


# ---------------------------------------------------------------------------------------------------
# Synthetic batches in data.py's layout

def stats(state_dim, action_dim, name="bench"):
    """Statistics as data.py writes them: every dimension in [-1, 1]."""
    part = lambda n: {"mean": [0.0] * n, "std": [1.0] * n, "min": [-1.0] * n, "max": [1.0] * n,
                      "q01": [-1.0] * n, "q99": [1.0] * n}
    return {"name": name, "num_episodes": 1, "num_steps": 1, "dataset_id": 0, "state": part(state_dim),
            "action": part(action_dim)}


def batch(B, T=1, K=1, size=224, state_dim=7, views=("primary",), goal=False, future=False, seed=0):
    """A training batch of data.py's standard keys, random but well-formed (gripper 0/1, no padding)."""
    g = torch.Generator().manual_seed(seed)
    image = lambda *shape: torch.randint(0, 256, (*shape, 3, size, size), dtype=torch.uint8, generator=g)
    action = torch.rand(B, T, K, 7, generator=g) * 2 - 1
    action[..., 6] = action[..., 6] > 0
    out = {"state": torch.rand(B, T, state_dim, generator=g) * 2 - 1, "action": action,
           "obs_pad": torch.zeros(B, T, dtype=torch.bool), "action_pad": torch.zeros(B, T, K, dtype=torch.bool),
           "instruction": ["pick up the block"] * B, "dataset_id": torch.zeros(B, dtype=torch.long)}
    for v in views:
        out[f"image_{v}"] = image(B, T)
        if future:
            out[f"future_image_{v}"] = image(B, T)
    if future:
        out["future_pad"] = torch.zeros(B, T, dtype=torch.bool)
    if goal:
        out["goal_image_primary"] = image(B)
    return out


# ---------------------------------------------------------------------------------------------------
# One case per method: (model, loss_fn, batch) at the paper configuration, or tiny with quick

def rt1_case(B, quick):
    import rt1
    cfg = rt1.Config(image_size=32, history=2, width_mult=0.1, depth_mult=0.1, lang_dim=16, tokens_per_image=4,
                     d_model=32, layers=2, heads=2, head_dim=16) if quick else rt1.Config()
    tokenizer = rt1.ActionTokenizer([stats(7, 7)], cfg.bins)
    return (rt1.RT1(cfg, vocabulary=["pick up the block"]), lambda m, b: rt1.loss(m, b, tokenizer),
            batch(B, cfg.history, size=cfg.image_size))


def gcbc_case(B, quick):
    import gcbc
    cfg = gcbc.Config(image_size=32, width=8, stage_sizes=(1, 1, 1, 1), mlp_dims=(16, 16)) if quick else gcbc.Config()
    norm = gcbc.ActionNorm([stats(7, 7)])
    return gcbc.GCBC(cfg), lambda m, b: gcbc.loss(m, b, norm), batch(B, size=cfg.image_size, goal=True)


def hpt_case(size):
    def case(B, quick):
        import hpt
        cfg = hpt.Config(image_size=32, history=2, chunk=4, size=size) if quick else \
            hpt.Config(size=size, history=4)  # the pretraining horizons: 4 observations, chunks of 8
        s = [stats(7, 7)]
        norm = {"state": hpt.Limits(s, "state", 7), "action": hpt.Limits(s, "action", 7)}
        model = hpt.HPT(cfg, [{"name": "bench", "state_dim": 7, "action_dim": 7, "views": [0]}])
        return (model, lambda m, b: hpt.loss(m, b, norm, cfg, [7]),
                batch(B, cfg.history, cfg.chunk, cfg.image_size))
    return case


def gr1_case(B, quick):
    import gr1
    cfg = gr1.Config(chunk_size=3, history=3, image_size=32, d_model=32, layers=2, heads=2, mlp=64, patch=8,
                     vit_dim=24, vit_layers=1, vit_heads=2, resampler_depth=1, resampler_heads=2,
                     resampler_dim_head=8, latents=3, lang_dim=16, decoder_layers=1, decoder_heads=2) if quick \
        else gr1.Config()
    inputs = gr1.Inputs([stats(7, 7)])
    return (gr1.GR1(cfg, ["pick up the block"]), lambda m, b: gr1.loss(m, b, inputs, cfg),
            batch(B, cfg.history, cfg.chunk_size, cfg.image_size, views=("primary", "wrist"), future=True))


def mcr_case(B, quick):
    import mcr
    cfg = mcr.Config(size=18, image_size=32) if quick else mcr.Config()
    g = torch.Generator().manual_seed(0)
    b = {"images": torch.randint(0, 256, (B, 5, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g),
         "chunks": torch.randn(B, 2, cfg.chunk_dim, generator=g),
         "actions": torch.randn(B, 5, cfg.action_dim, generator=g)}
    return mcr.MCR(cfg), lambda m, x: mcr.loss(m, x, cfg), b


# name -> (case, per-device batch on a GPU); the GPU batches are the papers' per-GPU batches where known
CASES = {"rt1": (rt1_case, 32), "gcbc": (gcbc_case, 36), "hpt-base": (hpt_case("base"), 256),
         "hpt-large": (hpt_case("large"), 256), "gr1": (gr1_case, 19), "mcr": (mcr_case, 32)}


# ---------------------------------------------------------------------------------------------------
# Measurements

def step_fn(model, loss_fn, opt, amp, device):
    import train

    def step(b):
        with train.precision(device, amp):
            loss = loss_fn(model, b)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def samples_per_s(step, b, B, steps, device):
    step(b)  # warm-up (and compilation)
    step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return B * steps / (time.perf_counter() - start)


def bench_method(name, B, steps, quick, device, amp, compiles):
    """-> dict of the row: parameters, samples/s (eager, compiled), peak memory, FLOPs per sample, MFU."""
    import train
    case, _ = CASES[name]
    torch.manual_seed(0)
    model, loss_fn, b = case(B, quick)
    model.to(device).train()
    b = train.to_device(b, device)
    row = {"method": name, "batch": B, "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    row["flops"] = train_flops(model, loss_fn, b, amp) / B
    opt = train.make_optimizer(model, train.TrainConfig(), device)
    for compiled in compiles:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        net = torch.compile(model) if compiled else model
        try:
            sps = samples_per_s(step_fn(net, loss_fn, opt, amp, device), b, B, steps, device)
        except Exception as e:  # e.g. no C++ compiler for inductor on this machine
            sps, row["note"] = None, f"compile failed: {type(e).__name__}"
        row["compiled" if compiled else "eager"] = sps
        if device.type == "cuda" and not compiled:
            row["memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    best = max((row.get(k) or 0) for k in ("eager", "compiled"))
    row["flop_s"] = row["flops"] * best
    row["mfu"] = row["flop_s"] / matmul_peak(device, amp or torch.float32, torch.get_num_threads())
    return row


def bench_hpt_features(B, steps, quick, device, amp):
    """HPT with a frozen ResNet-18: samples/s of the training step on live frames and on their cached features,
    interleaved (live, cached, live, ...) so that a machine shared with other work slows both alike."""
    import hpt
    import train
    rows = []
    for size, history in (("small", 1), ("base", 4)):  # the transfer and the pretraining observation horizons
        cfg = hpt.Config(image_size=32, history=history, chunk=4, size=size) if quick else \
            hpt.Config(size=size, history=history)
        norm = {k: hpt.Limits([stats(7, 7)], k, 7) for k in ("state", "action")}
        torch.manual_seed(0)
        model = hpt.HPT(cfg, [{"name": "bench", "state_dim": 7, "action_dim": 7, "views": [0]}]).to(device).train()
        live = train.to_device(batch(B, history, cfg.chunk, cfg.image_size), device)
        with torch.no_grad():
            features = model.encoder(live["image_primary"].flatten(0, 1)).unflatten(0, (B, history))  # (B, T, N, 512)
        cached = {k: v for k, v in live.items() if k != "image_primary"} | {"features_primary": features}
        step = step_fn(model, lambda m, b: hpt.loss(m, b, norm, cfg, [7]), train.make_optimizer(
            model, train.TrainConfig(), device), amp, device)
        seconds = {"live": 0.0, "cached": 0.0}
        for i in range(1 + steps):  # a warm-up round, then the timed ones
            for name, b in (("live", live), ("cached", cached)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(b)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name] += (time.perf_counter() - start) * (i > 0)
        rows.append({"size": size, "history": history, "batch": B,
                     **{k: B * steps / v for k, v in seconds.items()}})
    return rows


def bench_feature_pass(path, quick, device):
    """hpt.cached_features over every primary frame of `path`, in a throw-away cache folder (data.prepare is
    not timed) -> (frames, seconds)."""
    import tempfile
    import data
    import hpt
    old = os.environ.get("NANOROBOT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NANOROBOT_CACHE"] = tmp
        try:
            ds = data.load(path, image_size=32 if quick else 224, cache_frames="off")  # the pass decodes itself
            encoder = hpt.ResNetFeatures(frozen=True)
            torch.save(encoder.net.state_dict(), os.path.join(tmp, "resnet18.pth"))
            start = time.perf_counter()
            hpt.cached_features(ds, encoder, os.path.join(tmp, "resnet18.pth"), device, batch_size=256,
                                workers=0 if quick else max(1, (os.cpu_count() or 2) - 1), log=lambda line: None)
            seconds = time.perf_counter() - start
        finally:
            if old is None:
                del os.environ["NANOROBOT_CACHE"]
            else:
                os.environ["NANOROBOT_CACHE"] = old
    return len(ds), seconds


# ---------------------------------------------------------------------------------------------------
# data.py: decoded+resized frames/s per core, on the JPEG path and from the decoded-frame cache

BRIDGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "oxe", "bridge_dataset",
                      "1.0.0")
DATA_CASES = (  # (source, size, resize, history, views, future): the Bridge sample at 224 px, the methods on MetaWorld
    ("bridge", 224, "bilinear", 1, ("primary", "secondary"), 0),
    ("metaworld", 64, "bilinear", 6, ("primary",), 0),                    # rt1 on a CPU
    ("metaworld", 128, "bilinear", 6, ("primary",), 0),                   # rt1 on a GPU
    ("metaworld", 128, "bilinear", 1, ("primary",), 0),                   # hpt on a CPU
    ("metaworld", 64, "bicubic_float", 10, ("primary", "wrist"), 3),      # gr1 on a CPU
)


def data_before(folder):
    """data.py of another checkout (git worktree add /tmp/before main) as the module data_before."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("data_before", os.path.join(folder, "data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frames_per_s(module, ds, batches, B=16):
    """Decoded+resized frames/s on one core: a DataLoader without workers, one torch thread."""
    it = iter(module.loader(ds, B, num_workers=0))
    first = next(it)
    frames = sum(v[0].numel() // (3 * ds.size[0] * ds.size[1]) for k, v in first.items() if "image_" in k)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return B * batches * frames / (time.perf_counter() - start)


def bench_data(metaworld, quick, before=None):
    """Per case: main's data.py (--data_before), this data.py's JPEG path and its decoded-frame cache, timed in
    interleaved rounds (best of 3) -> rows."""
    import data
    old = data_before(before) if before else None
    cases = [(metaworld, 32, "bilinear", 2, ("primary",), 0)] if quick else [
        (BRIDGE if name == "bridge" else metaworld, *rest) for name, *rest in DATA_CASES]
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path, size, resize, history, views, future in cases:
            if not os.path.exists(path):
                print(f"data.py: {path} not found: its row is skipped")
                continue
            window = dict(image_size=size, interpolation=resize, history=history, views=views, future=future)
            try:
                ways = {"jpeg": (data, data.load(path, cache_frames="off", **window)),
                        "cache": (data, data.load(path, cache_frames="on", **window))}
            except data.DataError as e:
                raise SystemExit(f"bench.py: --data: {e}") from None
            if old:
                ways["before"] = (old, old.load(path, **window))
            best = {}
            for _ in range(1 if quick else 3):
                for way, (module, ds) in ways.items():
                    best[way] = max(best.get(way, 0), frames_per_s(module, ds, 2 if quick else 8))
            rows.append(dict(path=path, size=size, resize=resize, history=history, views=len(views), future=future,
                             **best))
    finally:
        torch.set_num_threads(threads)
    return rows


def print_data(rows):
    print("\ndata.py: decoded+resized frames/s on one core (DataLoader without workers, one thread, best of 3 "
          "interleaved rounds); before = main's data.py (--data_before)")
    print(f"{'source':<16} {'size':>4} {'resize':<13} {'T':>2} {'cams':>4} {'before':>8} {'JPEG':>8} {'cache':>8} "
          f"{'JPEG/before':>11} {'cache/before':>12} {'cache/JPEG':>10}")
    for r in rows:
        name = os.path.basename(os.path.dirname(os.path.normpath(r["path"])))
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if r.get(a) and r.get(b) else "-"
        print(f"{name:<16} {r['size']:>4} {r['resize']:<13} {r['history']:>2} {r['views']:>4} "
              f"{fmt(r.get('before'), '8.0f')} {r['jpeg']:>8.0f} {r['cache']:>8.0f} {ratio('jpeg', 'before'):>11} "
              f"{ratio('cache', 'before'):>12} {ratio('cache', 'jpeg'):>10}"
              + (f"  future {r['future']}" if r["future"] else ""))


def eval_policies(quick):
    """{name: policy} for the eval rows: the random policy, and an untrained RT-1 of the CPU-default config
    (rt1.CPU; it fails every episode, so every episode runs the full 500 steps)."""
    import eval_sim
    import rt1
    stats = [{"name": "metaworld", "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}]
    cfg = rt1.Config(image_size=32, layers=1, d_model=64, heads=2) if quick else rt1.Config(**rt1.CPU)
    model = rt1.RT1(cfg, sorted(set(eval_sim.INSTRUCTIONS.values())))
    return {"random": eval_sim.RandomPolicy(), "rt1": rt1.Policy(model, rt1.ActionTokenizer(stats))}


def bench_eval(quick):
    """eval_sim: episodes/min/core on reach-v3 (every episode runs the full 500 steps) with one environment
    worker and one torch thread: the policy and the simulator take turns, so about one core is busy."""
    import eval_sim
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    try:
        for name, policy in eval_policies(quick).items():
            episodes = 1 if quick or name != "random" else 4
            with contextlib.redirect_stdout(io.StringIO()):  # evaluate's own success table
                results = eval_sim.evaluate(policy, "reach-v3", episodes, video=False, method=name, workers=1)
            rates[name] = results["episodes_per_minute"]
    finally:
        torch.set_num_threads(threads)
    return rates


def bench_act(ckpt, n=20, calls=15, warmup=4):
    """A checkpoint's Policy.act (through eval_sim.act, as an evaluation calls it) on n random 128-px
    observations, with the model's weights in NCHW and in NHWC alternating call by call (one run, a ratio: this
    machine is noisy), `warmup` calls of each first -> method, {layout: median ms per call}, the largest
    difference between the two layouts' actions, the layout the checkpoint records (evaluation acts in it).
    An evaluation of n episodes per task makes one such call per step; the environments are the rest."""
    import importlib
    import numpy as np
    import eval_sim
    import train
    checkpoint = train.load_checkpoint(ckpt)  # read once: the policy and the instructions it knows
    method = checkpoint["method"]
    policy = eval_sim.rebuild_policy(importlib.import_module(method), checkpoint, "cpu", ckpt)
    known = checkpoint.get("instructions") or []
    instruction = eval_sim.INSTRUCTIONS["push-v3"]
    instructions = [instruction if instruction in known or not known else known[0]] * n
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (n, 3, 128, 128), dtype=np.uint8)
    obs = {"image_primary": image(), "image_wrist": image(), "goal_image_primary": image(),
           "state": rng.normal(size=(n, 4)).astype(np.float32)}
    formats = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    times, actions = {k: [] for k in formats}, {}
    for i in range(2 * (warmup + calls)):
        layout = "NHWC" if i % 2 else "NCHW"
        policy.model.to(memory_format=formats[layout])
        policy.reset(n)  # each call starts an episode: the same history for both layouts
        start = time.perf_counter()
        actions[layout] = eval_sim.act(policy, obs, instructions)
        if i >= 2 * warmup:
            times[layout].append(1000 * (time.perf_counter() - start))
    recorded = {True: "NHWC", False: "NCHW"}.get(checkpoint.get("channels_last"), "NCHW (no layout recorded)")
    diff = float(np.abs(actions["NCHW"] - actions["NHWC"]).max())
    return method, {k: float(np.median(v)) for k, v in times.items()}, diff, recorded


METHOD_FILES = ("rt1", "gcbc", "hpt", "gr1", "mcr")


CHECKS = {  # --check KIND: the variants of each method's real CPU-default run, as extra command-line flags
    "dtype": {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"]},
    "compile": {"eager": [], "compiled": ["--compile"]},
    "workers": {f"workers={w}": ["--workers", str(w)] for w in (0, 1, 2)},
}


def run_check(kind, methods, steps):
    """Each method's CPU-default run (its own command line: default config, the default MetaWorld data, no
    evaluation) for `steps` steps in each variant of CHECKS[kind], from the same seed -> rows of the loss's mean
    over the last half of the logged steps and the samples/s after the first logged row (startup, warm-up and
    compilation)."""
    import json
    import subprocess
    import tempfile
    rows = []
    for name in methods:
        for variant, flags in CHECKS[kind].items():
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, f"{name}.py", "--steps", str(steps), *flags, "--out_dir", out,
                       "--log_every", "5", "--eval_episodes", "0", "--no-resume", "--seed", "0"]
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      cwd=os.path.dirname(os.path.abspath(__file__)))
                if done.returncode:
                    raise SystemExit(f"bench.py --check {kind}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                log = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
            tail = log[len(log) // 2:]
            rows.append({"method": name, "variant": variant, "steps": steps,
                         "loss": sum(r["loss"] for r in tail) / len(tail),
                         "samples_per_s": sum(r["samples_per_s"] for r in log[1:]) / max(1, len(log) - 1)})
            print(f"{name:<6} {variant:<9} last-half loss {rows[-1]['loss']:.4f}  samples/s "
                  f"{rows[-1]['samples_per_s']:.2f}", flush=True)
    return rows


def cpu_default_cases():
    """name -> (model, loss_fn, batch) at each method's CPU-default configuration and batch (synthetic batch)."""
    import gcbc
    import gr1
    import hpt
    import mcr
    import rt1
    s = [stats(7, 7)]

    def rt1_cpu():
        cfg = rt1.Config(**rt1.CPU)
        tokenizer = rt1.ActionTokenizer(s, cfg.bins)
        return (rt1.RT1(cfg, ["pick up the block"]), lambda m, b: rt1.loss(m, b, tokenizer),
                batch(rt1.CPU_BATCH, cfg.history, size=cfg.image_size))

    def gcbc_cpu():
        norm = gcbc.ActionNorm(s)
        return (gcbc.GCBC(gcbc.Config(image_size=gcbc.CPU_SIZE)), lambda m, b: gcbc.loss(m, b, norm),
                batch(gcbc.CPU_BATCH, size=gcbc.CPU_SIZE, goal=True))

    def hpt_cpu():
        cfg = hpt.Config(image_size=hpt.CPU_SIZE, finetune_encoder=True)  # hpt.main without --resnet_weights
        norm = {k: hpt.Limits(s, k, 7) for k in ("state", "action")}
        model = hpt.HPT(cfg, [{"name": "bench", "state_dim": 7, "action_dim": 7, "views": [0]}])
        return (model, lambda m, b: hpt.loss(m, b, norm, cfg, [7]),
                batch(hpt.CPU_BATCH, cfg.history, cfg.chunk, cfg.image_size))

    def gr1_cpu():
        cfg, inputs = gr1.Config(**gr1.CPU), gr1.Inputs(s)
        return (gr1.GR1(cfg, ["pick up the block"]), lambda m, b: gr1.loss(m, b, inputs, cfg),
                batch(16, cfg.history, cfg.chunk_size, cfg.image_size, views=("primary", "wrist"), future=True))

    def mcr_cpu():
        cfg, B, g = mcr.Config(image_size=mcr.CPU_SIZE), mcr.CPU_BATCH, torch.Generator().manual_seed(0)
        b = {"images": torch.randint(0, 256, (B, 5, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g),
             "chunks": torch.randn(B, 2, cfg.chunk_dim, generator=g),
             "actions": torch.randn(B, 5, cfg.action_dim, generator=g)}
        return mcr.MCR(cfg), lambda m, x: mcr.loss(m, x, cfg), b
    return {"rt1": rt1_cpu, "gcbc": gcbc_cpu, "hpt": hpt_cpu, "gr1": gr1_cpu, "mcr": mcr_cpu}


def auto_variant(method):
    """The --levers variant that --dtype auto and --channels_last auto pick for `method` on this CPU."""
    import train
    cfg, cpu = train.TrainConfig(), torch.device("cpu")
    return (("bf16" if train.autocast_dtype(cfg, cpu, method) else "fp32")
            + ("+NHWC" if train.use_channels_last(cfg, cpu, method) else ""))


def levers(methods, rounds):
    """Samples/s of each method's CPU-default training step (synthetic batch): `before` is the step before issue 16
    (fp32, contiguous, AdamW's loop over the parameters), then fp32 and bf16 autocast (train.precision) each with
    and without channels_last weights, all with fused AdamW; variants interleaved round by round, best of `rounds`
    after a warm-up round. `auto` is the variant --dtype auto and --channels_last auto pick."""
    import train
    cpu = torch.device("cpu")
    variants = {"before": (None, False, False), "fp32": (None, False, True), "bf16": (torch.bfloat16, False, True),
                "fp32+NHWC": (None, True, True), "bf16+NHWC": (torch.bfloat16, True, True)}
    print(f"{'method':<6} {'batch':>5} " + " ".join(f"{v:>10}" for v in variants) + f" {'auto':>10} {'auto/before':>11}"
          f"   samples/s, best of {rounds}; CPU default configuration, {torch.get_num_threads()} torch threads")
    for name, case in cpu_default_cases().items():
        if name not in methods:
            continue
        torch.manual_seed(0)
        model, loss_fn, b = case()
        model.train()
        opts = {False: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False),
                True: train.make_optimizer(model, train.TrainConfig(), cpu)}  # fused: AdamW's loop or train.py's
        B = len(b["action"] if "action" in b else b["actions"])
        seconds = {v: [] for v in variants}
        for _ in range(1 + rounds):
            for v, (amp, nhwc, fused) in variants.items():
                model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
                step = step_fn(model, loss_fn, opts[fused], amp, cpu)
                start = time.perf_counter()
                step(b)
                seconds[v].append(time.perf_counter() - start)
        speed = {v: B / min(t[1:]) for v, t in seconds.items()}
        auto = auto_variant(name)
        print(f"{name:<6} {B:>5} " + " ".join(f"{x:>10.1f}" for x in speed.values()) +
              f" {auto:>10} {speed[auto] / speed['before']:>10.2f}x", flush=True)


def kind_of(op, shapes):
    """An operator's share of a step: depthwise / other convolution, matmul, or the rest. A depthwise
    convolution's weight is (C, 1, k, k) with C > 1 and k > 1 among its recorded input shapes."""
    if "conv" in op:
        depthwise = any(len(s) == 4 and s[0] > 1 and s[1] == 1 and s[2] > 1 for s in shapes)
        return "depthwise convolutions" if depthwise else "other convolutions"
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu"):
        return "matmuls and attention"
    return "everything else"


def profile(name, B, device, amp, quick=False, top=12):
    """Where one training step of `name` at its paper configuration spends its time: torch.profiler's operators
    by self time after a warm-up step, then their sum by kind (kind_of). Prints both."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    import train
    torch.manual_seed(0)
    model, loss_fn, b = CASES[name][0](B, quick)
    model.to(device).train()
    b = train.to_device(b, device)
    step = step_fn(model, loss_fn, train.make_optimizer(model, train.TrainConfig(), device), amp, device)
    step(b)
    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        step(b)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    kinds = {}
    for e in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(e.key, [s for s in e.input_shapes if isinstance(s, list)])
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, key)
    total = sum(kinds.values())
    print(f"{name}, one training step at batch {B} ({'bf16' if amp else 'fp32'}), self time by kind: " + ", ".join(
        f"{k} {v / total:.1%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + f" of {total / 1e6:.2f} s")
    return kinds


def fmt(x, spec):  # spec like "10.1f": a right-aligned "-" of the same width for a missing value
    return f"{'-':>{int(spec.split('.')[0])}}" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configurations on the CPU (a smoke test, < 1 min)")
    p.add_argument("--methods", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default: the paper's on a GPU, "
                   "2 on a CPU, 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 on a GPU, 2 on a CPU)")
    p.add_argument("--data", default=None, help="data.py source for the data row (default: the MetaWorld data)")
    p.add_argument("--data_before", default=None, help="a checkout whose data.py is the data table's before "
                   "column (git worktree add /tmp/before main)")
    p.add_argument("--no_eval", action="store_true", help="skip the eval_sim row")
    p.add_argument("--no_compile", action="store_true", help="eager rows only (compiling the paper models takes "
                   "most of a 2-core CPU run's 26 minutes)")
    p.add_argument("--levers", type=int, nargs="?", const=3, metavar="ROUNDS",
                   help="each method's CPU-default step before issue 16's levers and in fp32 / bf16, with and "
                   "without channels_last (best of 3)")
    p.add_argument("--check", choices=CHECKS, help="train each method's CPU default for --steps (60) steps in each "
                   "variant (dtype: fp32/bf16; compile: eager/compiled; workers: 0/1/2 DataLoader workers) and compare")
    p.add_argument("--profile", metavar="METHOD", choices=CASES, help="only where one paper-configuration "
                   "training step of METHOD spends its time (torch.profiler, by operator and by kind)")
    p.add_argument("--act", metavar="CKPT", help="only time CKPT's Policy.act at batch 20 in NCHW and NHWC, "
                                                 "interleaved (ms per evaluation step)")
    args = p.parse_args(argv)
    if args.act:
        calls = 15
        method, ms, diff, recorded = bench_act(args.act, calls=calls)
        return print(f"{method} policy.act at batch 20 (random 128-px observations, {torch.get_num_threads()} "
                     f"threads, {args.act}; evaluated in {recorded}), median of {calls} calls each, layouts "
                     f"interleaved: NCHW {ms['NCHW']:.1f} ms, NHWC {ms['NHWC']:.1f} ms "
                     f"({ms['NCHW'] / ms['NHWC']:.2f}x); largest action difference {diff:.1e}")
    if args.levers:
        return levers(args.methods.split(",") if "--methods" in (argv or sys.argv) else list(METHOD_FILES), args.levers)
    if args.check:
        methods = [m for m in args.methods.split(",") if m in METHOD_FILES] if "--methods" in (argv or sys.argv) \
            else list(METHOD_FILES)
        return run_check(args.check, methods, args.steps or 60)
    unknown = [m for m in args.methods.split(",") if m not in CASES]
    if unknown:
        raise SystemExit(f"bench.py: --methods {unknown}: expected some of {list(CASES)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    batch_of = lambda name: args.batch or (4 if args.quick else CASES[name][1] if device.type == "cuda" else 2)
    if args.profile:
        return profile(args.profile, batch_of(args.profile), device, amp, args.quick)
    compiles = (False,) if args.quick or args.no_compile else (False, True)
    steps = args.steps or (10 if device.type == "cuda" else 2)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"bench: {machine} | {'bf16 autocast' if amp else 'fp32'} | torch {torch.__version__} | "
          f"{steps} timed steps per row{' | quick: tiny configurations' if args.quick else ''}")
    peak = matmul_peak(device, amp or torch.float32, torch.get_num_threads())
    print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({'bf16' if amp else 'fp32'} {'8192' if device.type == 'cuda' else '2048'}"
          f"-square matmul, best of 4, {torch.get_num_threads()} torch threads)")

    rows = []
    for name in args.methods.split(","):
        B = batch_of(name)
        rows.append(bench_method(name, B, steps, args.quick, device, amp, compiles))
    print(f"\n{'method':<10} {'batch':>5} {'params':>12} {'GFLOP/sample':>12} {'samples/s':>10} "
          f"{'compiled':>9} {'GFLOP/s':>9} {'peak GB':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['method']:<10} {r['batch']:>5} {r['params']:>12,} {r['flops'] / 1e9:>12.2f} "
              f"{fmt(r['eager'], '10.1f')} {fmt(r.get('compiled'), '9.1f')} {r['flop_s'] / 1e9:>9.1f} "
              f"{fmt(r.get('memory_gb'), '8.1f')} {fmt(r['mfu'], '6.1%')}{'  ' + r['note'] if 'note' in r else ''}")

    import eval_sim
    path = args.data or os.path.join(eval_sim.data_dir("mt10", 50), eval_sim.VERSION)
    if any(name.startswith("hpt") for name in args.methods.split(",")):
        B = batch_of("hpt-base")
        print(f"\nHPT, frozen ResNet-18 at {32 if args.quick else 224} px: live frames vs cached features "
              f"(interleaved steps, batch {B})")
        print(f"{'trunk':<6} {'frames':>6} {'live samples/s':>15} {'cached samples/s':>17} {'speed-up':>9}")
        for r in bench_hpt_features(B, 1 if args.quick else steps, args.quick, device, amp):
            print(f"{r['size']:<6} {r['history']:>6} {r['live']:>15.2f} {r['cached']:>17.2f} "
                  f"{r['cached'] / r['live']:>8.2f}x")
        if os.path.exists(path):
            frames, seconds = bench_feature_pass(path, args.quick, device)
            print(f"feature pass, once: {frames:,} frames in {seconds:.1f} s, {frames / seconds:,.1f} frames/s "
                  f"(decode, resize, ResNet-18, write) from {path}")
    if os.path.exists(path) or not args.quick:
        print_data(bench_data(path, args.quick, args.data_before))
    else:
        print(f"\ndata.py: skipped ({path} not found: give --data or run python eval_sim.py collect)")
    if not args.no_eval:
        for name, rate in bench_eval(args.quick).items():
            print(f"eval_sim, {name} policy: {rate:.1f} episodes/min/core (reach-v3, 500 steps each, 1 worker, "
                  f"1 torch thread)")
    return rows


if __name__ == "__main__":
    main()

"""train.py: exact resume, DDP equivalence, atomic checkpoints, one run per folder, clear errors (CPU, real
Bridge sample)."""
import argparse
import importlib
import json
import os
import pickle
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import train
from tests import tiny_job

ROOT = Path(__file__).resolve().parents[1]
bridge = pytest.mark.skipif(not tiny_job.BRIDGE.exists(), reason="needs ../shared/data (the Bridge sample)")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
JOB = str(ROOT / "tests" / "tiny_job.py")


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@bridge
def test_kill_and_resume_is_bit_exact(tmp_path):
    # dropout makes the test sensitive to the RNG as well as to data order and optimiser state
    straight = params(tiny_job.run(tmp_path / "a", steps=10, dropout=0.3))
    with pytest.raises(KeyboardInterrupt):
        tiny_job.run(tmp_path / "b", steps=10, dropout=0.3, crash_at=7)  # dies during step 8
    assert train.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 5  # the last checkpoint
    resumed = params(tiny_job.run(tmp_path / "b", steps=10, dropout=0.3))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    steps = [json.loads(r)["step"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # rows after the checkpoint were dropped and logged again
    # (counting FLOPs at each start, on a copy with the RNG restored, left both runs bit-exact above)
    for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines():
        assert 0 < json.loads(r)["mfu"] <= 1.5, r
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


@bridge
def test_kept_snapshots_hold_each_steps_weights_and_the_training_time_over_a_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tiny_job.run(tmp_path, steps=10, keep=3, crash_at=7)  # dies during step 8: ckpt.pt at 5, kept 3
    model = tiny_job.run(tmp_path, steps=10, keep=3)  # resumes at 5
    kept = {p.name: train.load_checkpoint(p) for p in sorted(tmp_path.glob("ckpt_*.pt"))}
    assert sorted(kept) == ["ckpt_10.pt", "ckpt_3.pt", "ckpt_7.pt"]  # 10/3, 20/3 and 10 steps, rounded
    assert all("optimizer" not in c for c in kept.values())  # for evaluation: weights only
    for k, v in model.state_dict().items():
        assert torch.equal(kept["ckpt_10.pt"]["model"][k], v), k
    final = train.load_checkpoint(tmp_path / "ckpt.pt")
    seconds = [kept[f"ckpt_{s}.pt"]["train_seconds"] for s in (3, 7, 10)]
    assert 0 < seconds[0] < seconds[1] < seconds[2] == final["train_seconds"]  # time carries over the resume


@bridge
def test_two_ranks_equal_one_rank(tmp_path):
    # two processes (torchrun, gloo) with 4 samples each vs one with the same global batch of 8
    # (the same parameters only because this model draws no random numbers: see the README)
    subprocess.run([sys.executable, JOB, str(tmp_path / "one")], check=True, env=ENV, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", JOB, str(tmp_path / "two")],
                   check=True, env=ENV, capture_output=True)
    one, two = (torch.load(tmp_path / d / "final.pt") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), (k, (one[k] - two[k]).abs().max())


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"method": "tiny", "config": {}, "model": {"w": torch.ones(3)}, "stats": [{"name": "x"}], "step": 5}
    train.save_checkpoint(path, good)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        train.save_checkpoint(path, dict(good, step=10))
    assert train.load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_gives_one_clear_error(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: not a readable checkpoint"):
        train.load_checkpoint(bad)
    torch.save({"model": {}}, bad)
    with pytest.raises(train.CheckpointError, match=r"missing keys \['method', 'config', 'stats', 'step'\]"):
        train.load_checkpoint(bad)
    with pytest.raises(train.CheckpointError, match="no such checkpoint"):
        train.load_checkpoint(tmp_path / "nope.pt")


@bridge
def test_resuming_another_methods_run_is_refused(tmp_path):
    tiny_job.run(tmp_path, steps=5)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    train.save_checkpoint(tmp_path / "ckpt.pt", dict(ckpt, method="rt1"))
    with pytest.raises(train.CheckpointError, match="is a 'rt1' run, not 'tiny'"):
        tiny_job.run(tmp_path, steps=10)


@bridge
def test_checkpoint_holds_what_eval_needs(tmp_path):
    tiny_job.run(tmp_path, steps=5)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["method"] == "tiny" and ckpt["step"] == 5 and ckpt["config"] == {"dropout": 0.0, "width": 32}
    assert ckpt["stats"][0]["name"] == "bridge_dataset" and len(ckpt["stats"][0]["action"]["q99"]) == 7
    assert ckpt["instructions"] and "optimizer" in ckpt and ckpt["train_config"]["steps"] == 5
    assert json.loads((tmp_path / "stats.json").read_text()) == ckpt["stats"]
    assert ckpt["amp_dtype"] == "fp32"  # the resolved autocast dtype (tiny_job asks for none: auto on a CPU)
    assert ckpt["channels_last"] is False  # resolved too: auto, and tiny is not in CPU_CHANNELS_LAST


@bridge
def test_checkpoint_records_the_resolved_autocast_dtype(tmp_path):
    tiny_job.run(tmp_path, steps=5, dtype="bf16")
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["amp_dtype"] == "bf16"


def test_auto_dtype_is_bf16_on_a_cpu_only_for_the_methods_in_cpu_bf16(monkeypatch):
    cpu, auto = torch.device("cpu"), train.TrainConfig()
    monkeypatch.setattr(train, "bf16_native", lambda device: True)
    monkeypatch.setattr(train, "CPU_BF16", {"gcbc"})  # today none: the rule, not the measured set
    assert {m: train.autocast_dtype(auto, cpu, m) for m in ("gcbc", "rt1")} == {"gcbc": torch.bfloat16, "rt1": None}
    assert train.autocast_dtype(train.TrainConfig(dtype="bf16"), cpu, "rt1") == torch.bfloat16
    assert train.autocast_dtype(train.TrainConfig(dtype="fp32"), cpu, "gcbc") is None
    monkeypatch.setattr(train, "bf16_native", lambda device: False)  # a CPU without AVX512-BF16 / AMX: fp32
    assert train.autocast_dtype(auto, cpu, "gcbc") is None
    with pytest.raises(SystemExit):  # argparse: "--dtype: invalid choice: 'bf61' (choose from ...)"
        train.parse_args(train.TrainConfig(), argv=["--dtype", "bf61"])


def test_precision_is_fp32_or_bf16_autocast_with_math_attention_on_a_cpu():
    """bf16 on a CPU: autocast, and attention by the math kernel (its bf16 flash backward there is ~10x slower)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cpu, lin = torch.device("cpu"), torch.nn.Linear(4, 4)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with train.precision(cpu, None):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    with train.precision(cpu, torch.bfloat16):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
        with_precision = attend()
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
        math = attend()
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = attend()
    assert torch.equal(with_precision, math) and not torch.equal(math, flash)  # the kernels round differently


def test_adamw_is_fused_on_a_cpu_and_steps_as_the_loop_does_to_float_rounding():
    """Fused AdamW (one kernel for all parameters) against AdamW's loop over them with the same groups."""
    cfg, cpu = train.TrainConfig(), torch.device("cpu")
    fused, looped = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    looped.load_state_dict(fused.state_dict())
    opts = {fused: train.make_optimizer(fused, cfg, cpu)}
    assert all(group["fused"] for group in opts[fused].param_groups)
    opts[looped] = torch.optim.AdamW([{"params": [looped.weight], "weight_decay": cfg.weight_decay},
                                      {"params": [looped.bias], "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
    for step in range(5):
        for model, opt in opts.items():
            model(torch.full((3, 6), float(step))).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused.parameters(), looped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@bridge
def test_channels_last_trains_the_same_model(tmp_path):
    """NHWC changes how the convolution is computed, not what: the same losses to float rounding."""
    losses = {}
    for flag in ("off", "on"):
        model = tiny_job.run(tmp_path / flag, steps=4, channels_last=flag)
        assert model.conv[0].weight.is_contiguous(memory_format=torch.channels_last) == (flag == "on")
        rows = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        losses[flag] = [json.loads(r)["loss"] for r in rows]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_flop_count_of_a_linear_layer_forward_and_backward():
    model = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    flops = train.train_flops(model, lambda m, b: (m(b).sum(), {}), x)
    assert flops == 6 * 8 * 4 * 3  # forward, input gradient, weight gradient: 2 B in out each
    assert model.weight.grad is None


def test_matmul_peak_is_measured():
    peak = train.matmul_peak(torch.device("cpu"), torch.float32, torch.get_num_threads())
    assert 0 < peak < float("inf")


def test_flops_that_cannot_be_counted_are_one_line_and_no_mfu():
    lines = []
    def loss_fn(model, batch):
        raise NotImplementedError("no formula for aten.weird_op")
    assert train.count_flops(torch.nn.Linear(2, 2), loss_fn, torch.zeros(1, 2), None, 1, lines.append) is None
    assert lines == ["MFU not shown: counting the FLOPs failed (no formula for aten.weird_op)"]


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = train.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.lr_at(100, cfg) == pytest.approx(0.1)


def test_parse_args_makes_one_flag_per_field():
    args, (cfg,) = train.parse_args(train.TrainConfig(steps=7), argv=["--lr", "0.5", "--no-resume", "--compile"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.compile) == (7, 0.5, False, True)


@bridge
def test_batch_must_split_over_ranks_and_accumulation(tmp_path):
    with pytest.raises(train.RunError, match="must be divisible"):
        tiny_job.run(tmp_path, steps=1, grad_accum=3)


# --- the run folder: metrics log, lock, temporary files ---------------------------------------------------

@bridge
def test_cut_last_metrics_row_is_dropped_on_resume(tmp_path, capsys):
    tiny_job.run(tmp_path, steps=5)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.0')  # the disk filled in the middle of step 6's row
    tiny_job.run(tmp_path, steps=7)
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    assert "metrics.jsonl: dropped its last row, line 6, which was cut short" in capsys.readouterr().out


def test_broken_metrics_row_in_the_middle_names_the_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(train.RunError, match=r"metrics\.jsonl, line 2: not a metrics row .*repair or delete"):
        train._trim_log(log, 3)
    log.write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(train.RunError, match=r"line 2: not a metrics row \(no integer 'step'\)"):
        train._trim_log(log, 3)
    train._trim_log(log, 0)  # --no-resume: nothing is kept, so nothing needs reading
    assert log.read_text() == ""


def wait_for(condition, what, timeout=120):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


@bridge
def test_second_run_in_the_same_out_dir_is_refused_naming_the_holder(tmp_path):
    """~10-20 s: two processes start (torch + data import each); the first holds the folder while stalled."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, JOB, str(out), "--steps", "100", "--stall_at", "2"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), "the first run's step 1")  # it holds the lock
        second = subprocess.run([sys.executable, JOB, str(out), "--steps", "3"], env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"tiny_job.py: --out_dir {out}: another run is training there (pid {first.pid} on "
            f"{__import__('socket').gethostname()}); wait for it to end, stop it, or choose another --out_dir")
        assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    finally:
        first.kill()  # SIGKILL: no clean-up runs, yet the kernel drops the lock with the process
        first.wait()
    with train.run_folder(out):  # so the next run may start
        assert (out / ".lock").read_text().startswith(f"{os.getpid()} on ")


@bridge
def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path, capsys):
    (tmp_path / ".ckpt.pt.tmp4242").write_bytes(b"\0" * 100_000)  # what a SIGKILL during a save leaves
    (tmp_path / ".ckpt.pt.tmp4243").write_bytes(b"PK")
    (tmp_path / "notes.txt").write_text("mine")
    tiny_job.run(tmp_path, steps=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".ckpt", "notes"))) == ["notes.txt"]
    assert "removed 2 temporary checkpoint file(s)" in capsys.readouterr().out


def test_without_flock_the_run_goes_on_and_says_so(tmp_path, monkeypatch, capsys):
    def no_locks(f, how):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    (tmp_path / ".ckpt.pt.tmp4242").write_bytes(b"PK")  # maybe another run's: without the lock, left alone
    with train.run_folder(tmp_path):
        pass
    assert "WARNING: cannot lock" in capsys.readouterr().out and (tmp_path / ".ckpt.pt.tmp4242").exists()


@bridge
def test_out_dir_naming_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(train.RunError, match=r"--out_dir .*file: is a file; expected a folder"):
        tiny_job.run(tmp_path / "file", steps=1)
    with pytest.raises(train.RunError, match=r"--out_dir .*file/run: cannot make the folder"):
        tiny_job.run(tmp_path / "file" / "run", steps=1)


# --- resuming with other settings ------------------------------------------------------------------------

@bridge
def test_resuming_with_another_architecture_names_the_flags_that_differ(tmp_path):
    tiny_job.run(tmp_path, steps=5, width=32)
    with pytest.raises(train.CheckpointError) as e:
        tiny_job.run(tmp_path, steps=10, width=16)
    assert "its weights do not fit the model these settings build" in str(e.value)
    assert "head.0.weight is [32, 15] in the checkpoint, [16, 15] in the model" in str(e.value)
    assert "settings that differ from the checkpoint's: width 16 (checkpoint: 32)" in str(e.value)
    assert "\n" not in str(e.value)
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5  # untouched


@bridge
def test_resuming_with_another_dropout_warns_and_says_which_values_are_used(tmp_path, capsys):
    tiny_job.run(tmp_path, steps=5, dropout=0.0)
    capsys.readouterr()
    tiny_job.run(tmp_path, steps=10, dropout=0.3, lr=5e-3)
    out = capsys.readouterr().out
    assert ("tiny: WARNING: these settings differ from the checkpoint's: dropout 0.3 (checkpoint: 0.0); "
            "steps 10 (checkpoint: 5); lr 0.005 (checkpoint: 0.01). The run goes on with the new values (the first "
            "of each pair), and its next checkpoint records them") in out
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["config"]["dropout"] == 0.3 and ckpt["train_config"]["lr"] == 5e-3  # what the run used
    capsys.readouterr()
    tiny_job.run(tmp_path, steps=12, dropout=0.3, lr=5e-3, log_every=3, ckpt_every=4)  # bookkeeping only
    assert "differ" in capsys.readouterr().out  # but --steps moves the end of the cosine: said
    tiny_job.run(tmp_path, steps=12, dropout=0.3, lr=5e-3, log_every=2, ckpt_every=3)
    assert "differ" not in capsys.readouterr().out


@bridge
def test_checkpoint_without_optimizer_state_cannot_resume(tmp_path):
    tiny_job.run(tmp_path, steps=5)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    del ckpt["optimizer"]
    train.save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    with pytest.raises(train.CheckpointError, match=r"ckpt\.pt: has no optimizer state, so training cannot "
                                                    r"continue from it .*--no-resume"):
        tiny_job.run(tmp_path, steps=10)


# --- ranks --------------------------------------------------------------------------------------------------

@bridge
def test_a_stalled_rank_fails_the_job_naming_the_rank_and_step(tmp_path):
    """~15-25 s: torchrun starts two ranks; rank 1 stops in step 3 and rank 0 gives up after 5 s."""
    start = time.time()
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", JOB, str(tmp_path),
                          "--steps", "10", "--stall_at", "3", "--stall_rank", "1", "--dist_timeout", "5"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert job.returncode != 0 and time.time() - start < 200  # not gloo's 30 minutes, nor rank 1's 600 s sleep
    lines = [l for l in job.stderr.splitlines() if l.startswith("tiny_job.py: ")]
    assert len(lines) == 1, job.stderr[-3000:]
    assert lines[0].startswith("tiny_job.py: rank 0 of 2, step 3: the other ranks did not answer (Timed out waiting")
    assert lines[0].endswith("a rank died or stopped, or took longer than --dist_timeout 5 s")


# --- checkpoints and the command line ---------------------------------------------------------------------

def test_a_refused_pickle_is_one_line_that_names_the_global(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"method": "rt1", "config": argparse.Namespace(a=1)}, path)
    with pytest.raises(train.CheckpointError) as e:
        train.load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"{path}: refused by torch.load(weights_only=True), which admits tensors and plain "
                              f"data only (Unsupported global: GLOBAL argparse.Namespace was not an allowed global")
    assert message.endswith("only if you trust its source: unpickling runs the code a file names")
    assert "\n" not in message and "\x1b" not in message


def test_checkpoint_of_the_wrong_types_is_one_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    good = {"method": "tiny", "config": {}, "model": {}, "stats": [{"name": "x"}], "step": 5}
    for bad, what in [({"stats": []}, r"stats is \[\], not a list of one dict per data source"),
                      ({"config": [1]}, r"config is \[1\], not a dict"), ({"method": 7}, "method is 7, not a string"),
                      ({"step": "5"}, "step is '5', not an int >= 0")]:
        torch.save(good | bad, path)
        with pytest.raises(train.CheckpointError, match=f"ckpt.pt: not a nanorobot checkpoint \\({what}\\)"):
            train.load_checkpoint(path)


def test_cli_prints_bad_input_as_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mine.py"])

    def bad_data():
        raise data.DataError("/x: no such file or directory")
    with pytest.raises(SystemExit) as e:
        train.cli(bad_data)
    assert e.value.code == 2 and capsys.readouterr().err == "mine.py: /x: no such file or directory\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        train.cli(lambda: 1 / 0)
    assert train.cli(lambda: "ran") == "ran"


@pytest.mark.parametrize("method", ["rt1", "gcbc", "hpt", "gr1", "mcr"])
def test_method_command_lines_print_bad_input_as_one_line(method, tmp_path, capsys, monkeypatch):
    # run as `python METHOD.py --data MISSING` runs it (in this process: the imports are paid once)
    monkeypatch.setattr(sys, "argv", [f"{method}.py", "--data", str(tmp_path / "missing")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / f"{method}.py"), run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"{method}.py: {tmp_path / 'missing'}: no such file or directory (expected an "
                                       f"RLDS dataset, a CALVIN folder or a LeRobot dataset)\n")


class Built(Exception):
    """Raised by train.train in place of training: carries the initial weights main built."""


@pytest.mark.parametrize("method", ["rt1", "gcbc", "hpt", "gr1", "mcr"])
def test_seed_fixes_each_methods_initial_weights(method, request, tmp_path, monkeypatch):
    # ~3-8 s each (the first also imports eval_sim): main() up to train.train, three times: --seed 0 twice builds
    # one model, --seed 1 another (compare.py's seeds are training runs: a seed names its initial weights too)
    module = importlib.import_module(method)
    path = request.getfixturevalue("calvin_path" if method == "gr1" else "bridge_path")  # GR-1 reads a wrist camera

    def built(model, *args, **kwargs):
        raise Built({k: v.clone() for k, v in model.state_dict().items()})
    monkeypatch.setattr(train, "train", built)

    def weights(seed):
        monkeypatch.setattr(sys, "argv", [f"{method}.py", "--data", str(path), "--seed", str(seed),
                                          "--out_dir", str(tmp_path / "run")])
        with pytest.raises(Built) as b:
            module.main()
        return b.value.args[0]
    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


# --- --log tensorboard | wandb: the metrics rows, also to an experiment tracker -------------------------------------

def rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


@bridge
def test_log_tensorboard_holds_the_metrics_rows_over_a_resume(tmp_path):
    # ~10 s: a run killed in step 8 (checkpoint at 5, rows 1-7 logged), resumed to 10, then an evaluation's rates
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with pytest.raises(KeyboardInterrupt):
        tiny_job.run(tmp_path, steps=10, dropout=0.3, log="tensorboard", crash_at=7)
    tiny_job.run(tmp_path, steps=10, dropout=0.3, log="tensorboard")
    cfg = train.TrainConfig(out_dir=str(tmp_path), steps=10, log="tensorboard")
    train.log_evaluation(cfg, {"mean": 0.25, "success": {"reach-v3": 0.5, "push-v3": 0.0}})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    table = rows(tmp_path)
    expected = {key: [(r["step"], np.float32(r[key])) for r in table] for key in table[0] if key != "step"}
    assert set(expected) == {"loss", "mae", "grad_norm", "lr", "samples_per_s", "mfu"}
    assert {tag: v for tag, v in logged.items() if not tag.startswith("eval/")} == expected  # steps 6-7 once, resumed
    assert logged["eval/success"] == [(10, 0.25)] and logged["eval/success/reach-v3"] == [(10, 0.5)]


def wandb_history(out):
    """{step: the numbers logged at it} from the offline run folders in out/wandb, oldest first, and the run ids.
    A .wandb file is a LevelDB-style log of protobuf records: a 7-byte file header, then 32 KiB blocks of records,
    each with a 7-byte header (CRC-32C, length, type: 1 whole, 2 first, 3 middle, 4 last piece)."""
    from wandb.proto import wandb_internal_pb2
    history, ids = {}, []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        raw, pos, pieces = path.read_bytes(), 7, b""
        assert raw[:4] == b":W&B", path
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
            pieces, pos = pieces + raw[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                pieces = b""
                if record.WhichOneof("record_type") == "run":
                    ids.append(record.run.run_id)
                if record.WhichOneof("record_type") == "history":
                    row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    row = {k: v for k, v in row.items() if not k.startswith("_")}  # wandb's own _step, _runtime
                    history.setdefault(row["step"], {}).update(row)
    return history, ids


@bridge
def test_log_wandb_offline_holds_the_metrics_rows_in_one_run_over_a_resume(tmp_path, monkeypatch):
    # ~10 s: as the TensorBoard test, with wandb offline (no network): a run killed in step 8, resumed to 10
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(KeyboardInterrupt):
        tiny_job.run(tmp_path, steps=10, log="wandb", crash_at=7)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    tiny_job.run(tmp_path, steps=10, log="wandb")
    train.log_evaluation(train.TrainConfig(out_dir=str(tmp_path), steps=10, log="wandb"),
                         {"mean": 0.25, "success": {"reach-v3": 0.5}})
    history, ids = wandb_history(tmp_path)
    assert ids == [run_id] * 3  # the first run, its resume and the evaluation: one wandb run
    evaluation = {k: history[10].pop(k) for k in ("eval/success", "eval/success/reach-v3")}
    assert evaluation == {"eval/success": 0.25, "eval/success/reach-v3": 0.5}
    assert history == {r["step"]: r for r in rows(tmp_path)}  # the resumed run's rows 6-7 logged last


def test_log_without_its_package_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for tracker in ("wandb", "tensorboard"):
        with pytest.raises(train.RunError, match=rf"^--log {tracker}: needs the {tracker} package \(.*\): "
                                                 rf"pip install {tracker}$"):
            train.open_tracker(train.TrainConfig(out_dir=str(tmp_path), log=tracker))
    assert train.open_tracker(train.TrainConfig(out_dir=str(tmp_path))) is None  # --log none


def test_log_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def init(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(train.RunError, match=r"^--log wandb: wandb.init failed \(No API key configured. .*\); log in "
                                             r"with `wandb login`, or set WANDB_MODE=offline to keep the run in "):
        train.open_tracker(train.TrainConfig(out_dir=str(tmp_path), log="wandb"))


def test_log_may_change_on_resume_without_a_warning():
    old, new = asdict(train.TrainConfig()), asdict(train.TrainConfig(log="wandb"))
    assert train.differences(new, old, skip=train.BOOKKEEPING) == []
    assert train.differences(new, old) == ["log 'wandb' (checkpoint: 'none')"]


@bridge
def test_log_none_imports_no_tracker_and_tensorboard_no_tensorflow(tmp_path):
    # ~15 s: one process runs tiny_job.py twice (2 steps each), first with --log none, then --log tensorboard
    code = ("import json, runpy, sys\n"
            "def job(*args):\n"
            "    sys.argv = ['tiny_job.py', *args, '--steps', '2']\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "    return sorted(m for m in sys.modules if m.partition('.')[0] in ('tensorboard', 'wandb', 'tensorflow')"
            " or m.startswith('torch.utils.tensorboard'))\n"
            f"print(json.dumps([job({str(tmp_path / 'a')!r}),\n"
            f"                  job({str(tmp_path / 'b')!r}, '--log', 'tensorboard')]))\n")
    job = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stderr
    none, tensorboard = json.loads(job.stdout.strip().splitlines()[-1])
    assert none == []
    assert "torch.utils.tensorboard" in tensorboard and not any(m.startswith("tensorflow") for m in tensorboard)
    assert (tmp_path / "b" / "tensorboard").is_dir() and not (tmp_path / "a" / "tensorboard").exists()


# --- export: safetensors + JSON, loaded back without pickle ---------------------------------------------------------

def refuse_pickle(monkeypatch):
    """Every way to unpickle raises from here on: an export must load without any."""
    def refused(*args, **kwargs):
        raise AssertionError("an export was read with pickle")
    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refused)


def test_export_stores_shared_tensors_once_and_loads_back_without_pickle(tmp_path, monkeypatch):
    tied = torch.arange(6.0).reshape(2, 3)  # e.g. an embedding and an output layer that share their weights
    ckpt = {"method": "tiny", "config": {"width": 3, "sizes": (1, 2), "vocabulary": ["open the door"]},
            "model": {"embed.weight": tied, "head.weight": tied, "head.bias": torch.ones(2, dtype=torch.bfloat16),
                      "norm.num_batches_tracked": torch.tensor(4)},
            "stats": [{"name": "x", "action": {"q01": [-1.0, 0.0], "q99": [1.0, 0.5]}}], "step": 7,
            "instructions": ["open the door"], "amp_dtype": "bf16", "train_config": {"lr": 0.01},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    out = train.export(tmp_path / "ckpt.pt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "stats.json"]
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "head.bias", "norm.num_batches_tracked"]  # the tied one once
    config = json.loads((out / "config.json").read_text())
    assert config["shared"] == {"head.weight": "embed.weight"} and "optimizer" not in config
    refuse_pickle(monkeypatch)
    back = train.load_checkpoint(out)
    assert sorted(back) == ["amp_dtype", "config", "instructions", "method", "model", "stats", "step", "train_config"]
    assert back["model"]["head.weight"] is back["model"]["embed.weight"]
    assert torch.equal(back["model"]["head.weight"], tied)
    assert back["model"]["head.bias"].dtype == torch.bfloat16 and back["model"]["norm.num_batches_tracked"].item() == 4
    assert back["config"] == {"width": 3, "sizes": [1, 2], "vocabulary": ["open the door"]}  # JSON: a tuple is a list
    assert (back["stats"], back["step"], back["amp_dtype"]) == (ckpt["stats"], 7, "bf16")


def test_export_errors_name_the_file(tmp_path):
    good = {"method": "tiny", "config": {}, "model": {"w": torch.ones(2)}, "stats": [{"name": "x"}], "step": 1}
    torch.save(good | {"config": {"scale": torch.ones(1)}}, tmp_path / "tensor.pt")  # weights_only admits it
    with pytest.raises(train.CheckpointError, match=r"tensor.pt: its config cannot be written as JSON \(Object of "
                                                    r"type Tensor is not JSON serializable\)"):
        train.export(tmp_path / "tensor.pt", tmp_path / "x")
    torch.save(good, tmp_path / "ckpt.pt")
    out = train.export(tmp_path / "ckpt.pt", tmp_path / "export")
    (out / "stats.json").unlink()
    with pytest.raises(train.CheckpointError, match=r"export: no stats.json there; expected an exported policy"):
        train.load_checkpoint(out)
    (out / "stats.json").write_text("[{]")
    with pytest.raises(train.CheckpointError, match=r"export: not a readable export \(JSONDecodeError: "):
        train.load_checkpoint(out)
    (out / "stats.json").write_text("[]")
    with pytest.raises(train.CheckpointError, match=r"export: not a nanorobot export \(stats is \[\], not a list"):
        train.load_checkpoint(out)

"""train.py: exact resume, DDP equivalence, atomic checkpoints, clear errors (CPU, real Bridge sample)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from tests import tiny_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not tiny_job.BRIDGE.exists(), reason="needs ../shared/data (the Bridge sample)")


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_two_ranks_equal_one_rank(tmp_path):
    # two processes (torchrun, gloo) with 4 samples each vs one with the same global batch of 8
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    job = str(ROOT / "tests" / "tiny_job.py")
    subprocess.run([sys.executable, job, str(tmp_path / "one")], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", job, str(tmp_path / "two")],
                   check=True, env=env, capture_output=True)
    one, two = (torch.load(tmp_path / d / "final.pt") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), (k, (one[k] - two[k]).abs().max())


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"method": "tiny", "config": {}, "model": {"w": torch.ones(3)}, "stats": [], "step": 5}
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


def test_resuming_another_methods_run_is_refused(tmp_path):
    tiny_job.run(tmp_path, steps=5)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    train.save_checkpoint(tmp_path / "ckpt.pt", dict(ckpt, method="rt1"))
    with pytest.raises(train.CheckpointError, match="is a 'rt1' run, not 'tiny'"):
        tiny_job.run(tmp_path, steps=10)


def test_checkpoint_holds_what_eval_needs(tmp_path):
    tiny_job.run(tmp_path, steps=5)
    ckpt = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["method"] == "tiny" and ckpt["step"] == 5 and ckpt["config"] == {"dropout": 0.0}
    assert ckpt["stats"][0]["name"] == "bridge_dataset" and len(ckpt["stats"][0]["action"]["q99"]) == 7
    assert ckpt["instructions"] and "optimizer" in ckpt and ckpt["train_config"]["steps"] == 5
    assert json.loads((tmp_path / "stats.json").read_text()) == ckpt["stats"]


def test_learning_rate_warms_up_then_decays_to_min():
    cfg = train.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.lr_at(100, cfg) == pytest.approx(0.1)


def test_parse_args_makes_one_flag_per_field():
    args, (cfg,) = train.parse_args(train.TrainConfig(steps=7), argv=["--lr", "0.5", "--no-resume", "--compile"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.compile) == (7, 0.5, False, True)


def test_batch_must_split_over_ranks_and_accumulation(tmp_path):
    with pytest.raises(ValueError, match="must be divisible"):
        tiny_job.run(tmp_path, steps=1, grad_accum=3)

"""bench.py --quick: every method's training step runs, its FLOPs are counted, the table, HPT's live-vs-cached
features table and the data and eval_sim rows print (tiny configurations on the CPU; the one real MetaWorld
episode takes ~10 s)."""
import pytest
import torch

import bench
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models; on the 2 cores shared with other
# work the quick run took 37 s and 177 s with 2 threads, 21 s with one at the same load


def test_quick_runs_every_method_and_prints_one_table(droid_path, capsys):
    rows = bench.main(["--quick", "--data", str(droid_path)])
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == list(bench.CASES)
    for r in rows:
        assert r["eager"] > 0 and r["flops"] > 0 and r["params"] > 0, r
        assert 0 < r["mfu"] < 1.5, r  # achieved FLOP/s over the measured fp32 matmul peak
        assert r["method"] in out
    assert "peak: " in out and "GFLOP/s" in out
    assert "decoded+resized frames/s on one core" in out and "episodes/min" in out
    # HPT's frozen ResNet: steps on live frames vs cached features (Small, Base), and the one-time feature pass
    table = out[out.index("live frames vs cached features"):].splitlines()
    for line, size in zip(table[2:4], ("small", "base")):
        name, frames, live, cached, speedup = line.split()
        assert name == size and float(live) > 0 and float(cached) > 0 and speedup.endswith("x"), line
    assert table[4].startswith("feature pass, once: ") and f"from {droid_path}" in table[4]


def test_flop_count_of_a_linear_layer():
    import torch
    model = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    flops = train.train_flops(model, lambda m, b: (m(b).square().sum(), {}), x)
    assert flops == 2 * (2 * 3 * 8 * 4)  # the forward and the weight's gradient, 2 B in out each (x needs none)


def test_flop_count_of_a_depthwise_convolution_is_not_counted_as_dense():
    import torch
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    flops = train.train_flops(conv, lambda m, b: (m(b).sum(), {}), x)
    forward = 2 * 2 * 16 * 9 * 8 * 8  # 2 B C k^2 H W: one 3x3 filter per channel
    assert flops == 3 * forward  # forward, input gradient, weight gradient (torch's own formula counts 18 forwards)


def test_levers_times_a_cpu_default_step_before_and_in_each_dtype_and_memory_format(capsys):
    """~12 s: GC-BC's real CPU-default step (batch 32 at 64 px), 5 variants x 2 rounds."""
    bench.levers(["gcbc"], rounds=1)
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["gcbc", "32"] and all(float(x) > 0 for x in row[2:7])
    cfg, cpu = train.TrainConfig(), torch.device("cpu")  # what train.py's auto picks for GC-BC on this CPU
    auto = ("bf16" if train.autocast_dtype(cfg, cpu, "gcbc") else "fp32") + (
        "+NHWC" if train.use_channels_last(cfg, cpu, "gcbc") else "")
    speed = dict(zip(["before", "fp32", "bf16", "fp32+NHWC", "bf16+NHWC"], map(float, row[2:7])))
    assert row[7] == auto and row[8] == f"{speed[auto] / speed['before']:.2f}x"


def test_profile_splits_a_training_step_by_operator_kind(capsys):
    """RT-1's tiny EfficientNet has depthwise convolutions; its transformer has matmuls. The shares add to one."""
    import torch
    assert bench.kind_of("aten::convolution", [[2, 8, 16, 16], [8, 1, 3, 3]]) == "depthwise convolutions"
    assert bench.kind_of("aten::mkldnn_convolution", [[2, 8, 16, 16], [16, 8, 1, 1]]) == "other convolutions"
    assert bench.kind_of("aten::addmm", [[4], [2, 8], [8, 4]]) == "matmuls and attention"
    kinds = bench.profile("rt1", 2, torch.device("cpu"), None, quick=True)
    out = capsys.readouterr().out
    assert kinds["depthwise convolutions"] > 0 and kinds["matmuls and attention"] > 0, kinds
    assert "self time by kind: " in out and "aten::" in out

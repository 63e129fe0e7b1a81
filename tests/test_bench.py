"""bench.py --quick: every method's training step runs, its FLOPs are counted, the table and the data and
eval_sim rows print (tiny configurations on the CPU; the one real MetaWorld episode takes ~10 s)."""
import bench


def test_quick_runs_every_method_and_prints_one_table(droid_path, capsys):
    rows = bench.main(["--quick", "--data", str(droid_path)])
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == list(bench.CASES)
    for r in rows:
        assert r["eager"] > 0 and r["flops"] > 0 and r["params"] > 0, r
        assert r["mfu"] is None  # no GPU peak on a CPU
        assert r["method"] in out
    assert "samples/s (1 frame each)" in out and "episodes/min" in out


def test_flop_count_of_a_linear_layer():
    import torch
    model = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    flops = bench.train_flops(model, lambda m, b: (m(b).square().sum(), {}), x)
    assert flops == 2 * (2 * 3 * 8 * 4)  # the forward and the weight's gradient, 2 B in out each (x needs none)

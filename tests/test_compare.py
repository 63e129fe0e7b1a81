"""compare.py: the references' rows are evaluated once, tabulated with Wilson intervals and resumed; the
learning-curve plot. (The method rows run each method's CPU default on the MetaWorld data: the README's
Results, not a test.)"""
import json

import numpy as np
import pytest

import compare
import eval_sim

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_rows_are_scored_once_and_tabulated_with_intervals(tmp_path, capsys):
    # ~15 s: 10 expert episodes (~80 rendered steps each) and 10 random ones (500 unrendered steps)
    argv = ["--rows", "expert,random", "--seeds", "0", "--episodes", "1", "--out", str(tmp_path / "runs"),
            "--plots", str(tmp_path / "plots")]
    compare.main(argv)
    out = capsys.readouterr().out
    results = {r: json.loads((tmp_path / "runs" / f"{r}_s0" / "eval_0" / "results.json").read_text())
               for r in ("expert", "random")}
    for row, r in results.items():
        assert r["total"] == 10 and r["episodes"] == 1
        low, high = eval_sim.wilson(r["successes"], 10)
        line = next(l for l in out.splitlines() if l.startswith(f"| {compare.NAMES[row]} |"))
        assert f"{r['successes']}/10 = {10 * r['successes']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]" in line
    assert results["expert"]["successes"] >= 8 and results["random"]["successes"] <= 2
    assert "| scripted expert | " in out[out.index("per task"):]
    stamp = (tmp_path / "runs" / "expert_s0" / "eval_0" / "results.json").stat().st_mtime_ns
    compare.main(argv)  # resumed: nothing is evaluated again
    assert (tmp_path / "runs" / "expert_s0" / "eval_0" / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "runs" / "summary.json").read_text()).keys() == {"expert", "random"}


def test_learning_curve_plot(tmp_path):
    point = lambda minutes, k: {"step": 1, "minutes": minutes, "results": {"successes": k, "total": 50}}
    runs = {0: [point(2.0, 5), point(4.0, 20), point(6.0, 30)], 1: [point(2.1, 0), point(4.2, 25), point(6.3, 50)]}
    compare.plot("gr1", runs, {"scripted expert": 0.97}, tmp_path / "gr1.png")
    from PIL import Image
    image = np.asarray(Image.open(tmp_path / "gr1.png"))
    assert image.shape[0] > 300 and image.std() > 10  # drawn, not blank


def test_unknown_row_is_one_clear_error():
    with pytest.raises(SystemExit, match="--rows gr2: expected some of rt1, gcbc"):
        compare.main(["--rows", "gr2", "--table"])

"""compare.py: the references' rows are evaluated once, tabulated with Wilson intervals, resumed and recorded
(the table again from the record alone); the learning-curve plot. (The method rows run each method's CPU
default on the MetaWorld data: the README's Results, not a test.)"""
import json

import numpy as np
import pytest

import compare
import eval_sim

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_rows_are_scored_once_and_tabulated_with_intervals(tmp_path, capsys):
    # ~25 s: 10 + 5 held-out expert episodes (~80 rendered steps each), as many random ones (500 unrendered)
    argv = ["--rows", "expert,random", "--seeds", "0", "--episodes", "1", "--heldout_episodes", "1",
            "--out", str(tmp_path / "runs"), "--plots", str(tmp_path / "plots")]
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
    heldout = json.loads((tmp_path / "runs" / "expert_s0" / "heldout_0" / "results.json").read_text())
    assert list(heldout["success"]) == compare.HELDOUT.split(",") and heldout["total"] == 5
    assert not set(heldout["success"]) & set(eval_sim.parse_tasks(compare.TASKS))  # none of them trained
    line = next(l for l in out[out.index("Zero-shot"):].splitlines() if l.startswith("| scripted expert |"))
    assert f"| {heldout['successes']}/5 = " in line
    stamp = (tmp_path / "runs" / "expert_s0" / "eval_0" / "results.json").stat().st_mtime_ns
    compare.main(argv)  # resumed: nothing is evaluated again
    assert (tmp_path / "runs" / "expert_s0" / "eval_0" / "results.json").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "plots" / "runs.json").read_text())
    assert record.keys() == {"expert_s0", "random_s0"} and record["expert_s0"][0]["results"]["successes"] == \
        results["expert"]["successes"]
    capsys.readouterr()
    compare.main(["--rows", "expert,random", "--seeds", "0", "--table", "--out", str(tmp_path / "gone"),
                  "--plots", str(tmp_path / "plots")])  # a fresh clone: no run folders, the committed record
    assert capsys.readouterr().out == out[out.index("| method | seed 0"):]


def test_learning_curve_plot(tmp_path):
    def point(minutes, k):
        return {"step": 1, "minutes": minutes, "dtype": "fp32", "results": {"successes": k, "total": 50}}
    runs = {0: [point(2.0, 5), point(4.0, 20), point(6.0, 30)], 1: [point(2.1, 0), point(4.2, 25), point(6.3, 50)]}
    compare.plot("gr1", runs, {"scripted expert": 0.97}, tmp_path / "gr1.png")
    from PIL import Image
    image = np.asarray(Image.open(tmp_path / "gr1.png"))
    assert image.shape[0] > 300 and image.std() > 10  # drawn, not blank


def test_unknown_row_is_one_clear_error():
    with pytest.raises(SystemExit, match="--rows gr2: expected some of rt1, gcbc"):
        compare.main(["--rows", "gr2", "--table"])


def test_heldout_records_a_closed_vocabulary_as_not_scored(tmp_path):
    # a tiny RT-1 that learned one instruction: the held-out tasks' instructions have no embedding in it
    import rt1
    import train
    cfg = rt1.Config(image_size=32, history=2, width_mult=0.1, depth_mult=0.1, lang_dim=8, tokens_per_image=2,
                     d_model=16, layers=1, heads=2, head_dim=8)
    vocabulary = [eval_sim.INSTRUCTIONS["reach-v3"]]
    stats = [{"name": "metaworld", "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}]
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, {"method": "rt1", "config": {**rt1.asdict(cfg), "vocabulary": vocabulary},
                                 "model": rt1.RT1(cfg, vocabulary).state_dict(), "stats": stats, "step": 1})
    compare.score_heldout("rt1", 0, tmp_path, 1, path, episodes=1)
    record = json.loads((tmp_path / "heldout_1" / "results.json").read_text())
    assert record["episodes"] == 1 and "not among the 1 this model learned" in record["unseen_instruction"]
    found = {"rt1": {0: [{"heldout": record}]}}
    assert "| RT-1 | not scored: its instruction embedding is learned" in "\n".join(compare.heldout_table(found))

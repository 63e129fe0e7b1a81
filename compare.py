"""compare.py: the README's Results table from one command. Each method's CPU default (`python <method>.py`,
no flags) trains on the default MetaWorld data (mt10, 50 demonstrations per task) and is scored on mt10's
evaluation seeds with 95% Wilson intervals; kept snapshots give learning curves (success vs training minutes).

    python compare.py                            # every row, seeds 0 and 1 (hours on a 2-core CPU: see README)
    python compare.py --rows gr1,hpt --seeds 0   # some rows
    python compare.py --table                    # only the table and curves of what has finished

A method's run is its own command line, `python <method>.py --seed S --out_dir runs/compare/<row>_s<S> --keep 3`
with its own evaluation off; then each kept snapshot is scored on mt10: the last with --episodes (20) per task,
the earlier ones with --curve_episodes (5). The last is also scored zero-shot on five tasks outside mt10 that it
never saw (HELDOUT, --heldout_episodes each): mt10 success is not generalisation. MCR is scored as its paper
does, by the downstream test (a frozen encoder + an MLP fit to the same demonstrations: `mcr.py --downstream`)
of each pre-training snapshot; its baseline row is the same test of an untrained encoder. The scripted expert
and random actions are references. Every run's final scores come first, then the curves' earlier points (the
long part: a stopped call leaves whole final numbers). Everything lands in the run folders: stopped at any
moment, a second call resumes each run where it stopped and evaluates only what has no results.json yet.
Each finished run's scores are also kept in docs/learning/runs.json (committed): the table pools seeds that ran
on different days or machines, and `--table` on a fresh clone prints the README's table from it.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import eval_sim
import train

METHODS = ("rt1", "gcbc", "hpt", "gr1", "mcr")
ROWS = METHODS + ("mcr-random", "expert", "random")
NAMES = {"rt1": "RT-1", "gcbc": "GC-BC", "hpt": "HPT", "gr1": "GR-1 (GR-Chunk)", "mcr": "MCR (pre-trained encoder)",
         "mcr-random": "MCR's baseline: random encoder", "expert": "scripted expert", "random": "random actions"}
TASKS = "mt10"
HELDOUT = "bin-picking-v3,box-close-v3,door-lock-v3,door-unlock-v3,hand-insert-v3"  # Meta-World ML45's test tasks
MCR_DOWNSTREAM = ["--tasks", TASKS, "--demos", "50"]  # mcr.py's downstream test on the data every method trains on
ROOT = Path(__file__).resolve().parent


def run(cmd, log):
    """Run a command line of this repository, its output appended to `log`; a failure names the log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"compare.py: `{' '.join(cmd)}` failed (exit {done.returncode}): see {log}")


def snapshots(out):
    """{step: path} of a run's kept snapshots (ckpt_<step>.pt)."""
    return {int(p.stem.split("_")[1]): p for p in out.glob("ckpt_*.pt")}


def train_row(method, seed, out):
    """Train (or resume) the method's CPU default with 3 kept snapshots; its own evaluation is off."""
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        c = train.load_checkpoint(ckpt)
        if c["step"] == c["train_config"]["steps"] and (method != "mcr" or (out / "encoder.pt").exists()):
            return
    run([f"{method}.py", "--seed", str(seed), "--out_dir", str(out), "--keep", "3", "--eval_episodes", "0"],
        out / "compare.log")


def kept(row, out):
    """{step: snapshot path} of a row's run; the baseline and the references have one point, with no snapshot."""
    return snapshots(out) if row in METHODS else {0: None}


def results_path(row, out, step):
    """Where the mt10 results of a run's snapshot at `step` are (mcr.py --downstream names its own folder)."""
    if row.startswith("mcr"):
        return downstream_dir(row, out, step) / "eval" / "results.json"
    return out / f"eval_{step}" / "results.json"


def heldout_path(out, step):
    """Where the held-out results of a run's final snapshot at `step` are."""
    return out / f"heldout_{step}" / "results.json"


def downstream_dir(row, out, step):
    """The folder of mcr.py --downstream's policy (ckpt.pt) and its evaluation, for an MCR row's snapshot."""
    return out / f"downstream_{step}" / f"downstream_{row.partition('-')[2] or 'mcr'}"


def reference_policy(row, seed):
    return eval_sim.ExpertPolicy() if row == "expert" else eval_sim.RandomPolicy(seed)


def score(row, seed, out, step, path, episodes, video):
    """Score one snapshot on mt10 into its results.json, unless that file already holds `episodes` per task."""
    results = results_path(row, out, step)
    if results.exists() and json.loads(results.read_text())["episodes"] == episodes:
        return
    if row.startswith("mcr"):  # the downstream test: features of the frozen encoder, an MLP, then mt10
        encoder = "random" if row == "mcr-random" else str(path)
        run(["mcr.py", "--downstream", "--encoder", encoder, *MCR_DOWNSTREAM, "--eval_episodes", str(episodes),
             "--seed", str(seed), "--out_dir", str(out / f"downstream_{step}")], out / "compare.log")
    else:
        policy = reference_policy(row, seed) if row in ("expert", "random") else eval_sim.load_policy(path)[0]
        eval_sim.evaluate(policy, TASKS, episodes, str(results.parent), video=video, method=row)


def score_heldout(row, seed, out, step, path, episodes):
    """Zero-shot: the final policy (for MCR, its downstream policy) on HELDOUT, tasks it never saw, into
    heldout_<step>/results.json. A policy whose instruction embedding is learned per training instruction (RT-1
    and GR-1 without pre-trained text features) has no input for an unseen task: that is recorded, not scored."""
    results = heldout_path(out, step)
    if results.exists() and json.loads(results.read_text())["episodes"] == episodes:
        return
    if row in ("expert", "random"):
        policy = reference_policy(row, seed)
    else:
        policy = eval_sim.load_policy(downstream_dir(row, out, step) / "ckpt.pt" if row.startswith("mcr") else path)[0]
    try:
        eval_sim.evaluate(policy, HELDOUT, episodes, str(results.parent), video=False, method=row)
    except KeyError as e:  # the instruction lookup of a closed vocabulary (rt1.RT1.language, gr1.Language)
        if "not among" not in str(e):
            raise
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"episodes": episodes, "unseen_instruction": e.args[0]}, indent=1))


def do_row(row, seed, episodes, curve_episodes, heldout_episodes, root, curve):
    """Train one row's run for one seed and score its last snapshot on mt10 and on the held-out tasks; with
    `curve`, its earlier snapshots on mt10."""
    out = root / f"{row}_s{seed}"
    out.mkdir(parents=True, exist_ok=True)  # compare.log lands here for every row
    if row in METHODS:
        train_row(row, seed, out)
    snaps = kept(row, out)
    for step in sorted(snaps):
        last = step == max(snaps)
        if last != curve:
            score(row, seed, out, step, snaps[step], episodes if last else curve_episodes, video=last)
        if last and not curve and heldout_episodes:
            score_heldout(row, seed, out, step, snaps[step], heldout_episodes)


# ---------------------------------------------------------------------------------------------------
# the table and the curves, from the run folders

def collect(rows, seeds, root):
    """{row: {seed: points}} of every finished (row, seed): its last snapshot scored."""
    found = {}
    for row in rows:
        for seed in seeds:
            out = root / f"{row}_s{seed}"
            snaps, points = kept(row, out), []
            for step in sorted(snaps):
                path = results_path(row, out, step)
                if path.exists():
                    ckpt = train.load_checkpoint(snaps[step]) if snaps[step] else {}
                    points.append({"step": step, "minutes": ckpt.get("train_seconds", 0.0) / 60,
                                   "dtype": ckpt.get("amp_dtype"), "results": json.loads(path.read_text())})
            if points and points[-1]["step"] == max(snaps):
                heldout = heldout_path(out, max(snaps))
                if heldout.exists():
                    points[-1]["heldout"] = json.loads(heldout.read_text())
                found.setdefault(row, {})[seed] = points
    return found


def remember(found, path):
    """The record of finished runs, {"<row>_s<seed>": points}, kept in `path` (docs/learning/runs.json, committed,
    one line per run): the table and curves of runs whose folders are gone (an earlier machine or session). A run
    folder's scores replace its record; the rollout videos' names are left out (they live in the folders)."""
    record = json.loads(path.read_text()) if path.exists() else {}
    for row, runs in found.items():
        for seed, points in runs.items():
            record[f"{row}_s{seed}"] = [{**p, "results": {k: v for k, v in p["results"].items() if k != "videos"}}
                                        for p in points]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(record.items()))  # one line per run
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return record


def task_cells(results, tasks):
    """"k/n" per task: successful episodes of the pooled results (one results.json per seed) out of their episodes."""
    n = sum(r["episodes"] for r in results)
    return [f"{sum(sum(r['per_episode'][t]) for r in results)}/{n}" for t in tasks]


def cell(successes, total):
    low, high = eval_sim.wilson(successes, total)
    return f"{successes}/{total} = {100 * successes / total:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def table(found, seeds):
    """The Results table and the per-task table (markdown), from the last snapshot of each run."""
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| method | {head} | seeds pooled | train min per run | eval min (final) |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for row, runs in found.items():
        final = {s: p[-1] for s, p in runs.items()}
        wins = sum(f["results"]["successes"] for f in final.values())
        total = sum(f["results"]["total"] for f in final.values())
        cells = [cell(final[s]["results"]["successes"], final[s]["results"]["total"]) if s in final else "not run"
                 for s in seeds]
        minutes = np.mean([f["minutes"] for f in final.values()])
        evals = np.mean([f["results"]["seconds"] / 60 for f in final.values()])
        lines.append(f"| {NAMES[row]} | {' | '.join(cells)} | {cell(wins, total)} | "
                     f"{f'{minutes:.1f}' if minutes else '-'} | {evals:.1f} |")
    tasks = eval_sim.parse_tasks(TASKS)
    lines += ["", "Successful episodes per task, seeds pooled:", "",
              "| method | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row, runs in found.items():
        cells = task_cells([p[-1]["results"] for p in runs.values()], tasks)
        lines.append(f"| {NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + heldout_table(found))


def heldout_table(found):
    """Zero-shot success on HELDOUT of each row's final snapshot, seeds pooled (rows scored with --heldout_episodes)."""
    tasks = eval_sim.parse_tasks(HELDOUT)
    lines = ["", f"Zero-shot on {len(tasks)} tasks outside mt10 (Meta-World ML45's test tasks), seeds pooled:", "",
             "| method | all | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for row, runs in found.items():
        held = [p[-1]["heldout"] for p in runs.values() if "heldout" in p[-1]]
        if not held:
            continue
        if "unseen_instruction" in held[0]:
            lines.append(f"| {NAMES[row]} | not scored: its instruction embedding is learned per mt10 instruction, "
                         f"so an unseen task has no input |" + " |" * len(tasks))
            continue
        wins, total = sum(h["successes"] for h in held), sum(h["total"] for h in held)
        lines.append(f"| {NAMES[row]} | {cell(wins, total)} | " + " | ".join(task_cells(held, tasks)) + " |")
    return lines if len(lines) > 4 else []


def plot(row, runs, references, path):
    """Success vs training minutes, one line per seed with 95% Wilson intervals; the references as levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for seed, points in runs.items():
        x = [p["minutes"] for p in points]
        y = [100 * p["results"]["successes"] / p["results"]["total"] for p in points]
        bounds = np.array([eval_sim.wilson(p["results"]["successes"], p["results"]["total"]) for p in points]) * 100
        dtype = points[-1].get("dtype")  # what it trained in (a default can change between seeds' runs)
        ax.errorbar(x, y, yerr=[np.subtract(y, bounds[:, 0]), bounds[:, 1] - y], marker="o", capsize=3,
                    label=f"seed {seed}" + (f", {dtype}" if dtype else ""))
    for name, rate in references.items():
        ax.axhline(100 * rate, ls="--", lw=1, color="gray")
        ax.text(0, 100 * rate + 1.5, name, fontsize=7, color="gray")
    ax.set(xlabel="training minutes (2-core CPU)" if row != "mcr" else "pre-training minutes (2-core CPU)",
           ylabel=f"success on {TASKS} (%)", ylim=(0, 100), title=NAMES[row])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (evaluation seeds are fixed)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per mt10 task for each run's last snapshot")
    p.add_argument("--curve_episodes", type=int, default=5, help="episodes per task for the earlier snapshots")
    p.add_argument("--heldout_episodes", type=int, default=5,
                   help=f"episodes per held-out task ({HELDOUT}) for each run's last snapshot; 0: none")
    p.add_argument("--out", default="runs/compare", help="run folders")
    p.add_argument("--plots", default="docs/learning", help="one learning-curve PNG per method, and runs.json")
    p.add_argument("--table", action="store_true", help="only print the table and draw the curves")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        raise SystemExit(f"compare.py: --rows {args.rows}: expected some of {', '.join(ROWS)}")
    root = Path(args.out)
    if not args.table:
        if any(r in METHODS for r in rows):
            eval_sim.default_data()  # collected once, before any timing starts
        for curve in (False, True):  # every run's final score first, then the curves' earlier points
            for seed in args.seeds:  # seed by seed: a stopped call leaves whole first seeds
                for row in rows:
                    if row in ("expert", "random") and seed != args.seeds[0]:
                        continue  # references: one seed
                    do_row(row, seed, args.episodes, args.curve_episodes, args.heldout_episodes, root, curve)
    record = remember(collect(rows, args.seeds, root), Path(args.plots) / "runs.json")
    found = {row: {s: record[f"{row}_s{s}"] for s in args.seeds if f"{row}_s{s}" in record} for row in rows}
    found = {row: runs for row, runs in found.items() if runs}
    print(table(found, args.seeds))
    references = {NAMES[r]: np.mean([p[-1]["results"]["mean"] for p in found[r].values()])
                  for r in ("expert", "random") if r in found}
    os.makedirs(args.plots, exist_ok=True)
    for row in [r for r in found if r in METHODS]:
        plot(row, found[row], references, os.path.join(args.plots, f"{row}.png"))


if __name__ == "__main__":
    main()

"""Where no demonstration put the object: success in the demonstrated range and beyond it.

    .venv/bin/python benchmarks/generalization.py --task cup \\
        --model "CARP state=models/cup" --model "CoA state=out/models/cup_coa" \\
        [--model "CARP state, no ensemble=models/cup,ensemble=1"] \\
        [--seeds 10000,20000,30000] [--trials 20] [--sim-latency-ms 34] [--out DIR]

For each model, `carp-eval` runs ``--trials`` trials at each seed on the task (``cup``: the
demonstrated range) and on its variant ``<task>_beyond`` (carp_sim/configs: the object started up
to 5 cm beyond the range's left edge), into ``DIR/<model>/<split>/seed<S>/`` (an evaluation whose
results.json is there is not run again: the study resumes). Then it writes ``DIR/summary.json``
(success per model and split with Wilson intervals, outcomes, latency) and
``DIR/success_map.png``: every trial's object start position, a filled marker for a success and an
open one for a failure, over the demonstrated range. The object's start is recomputed from each
trial's seed (the twin's layouts are a function of the seed and the task). Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import machine
import numpy as np

REPO = machine.REPO
SPLITS = ("in range", "beyond")


def evaluate(
    label: str, model: str, task: str, seed: int, args: argparse.Namespace, out: Path, extra: list[str]
) -> dict:
    """One ``carp-eval`` run (skipped when its results.json exists) -> its results."""
    res = out / "results.json"
    if not res.exists():
        cmd = [
            sys.executable,
            "-m",
            "carp_bringup.evaluate",
            "--task",
            task,
            "--policy",
            model,
            "--trials",
            str(args.trials),
            "--seed",
            str(seed),
            "--videos",
            "0",
            "--out",
            str(out),
        ]
        if args.sim_latency_ms is not None:
            cmd += ["--sim-latency-ms", str(args.sim_latency_ms)]
        cmd += extra
        print(f"[{label}] {task} seed {seed} ...", flush=True)
        env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(res.read_text())


def object_starts(task: str, seeds: list[int]) -> np.ndarray:
    """(N, 2) object start x, y of the given trial seeds (as ``SimCell.reset`` samples them)."""
    from carp_sim.tasks import TaskConfig, sample_layout

    cfg = TaskConfig.load(task)
    return np.array([sample_layout(cfg, np.random.default_rng(s)).object_xy for s in seeds])


def wilson(k: int, n: int) -> list[float]:
    from carp_bringup.evaluate import wilson_interval

    return list(wilson_interval(k, n))


def plot(task: str, rows: dict, path: Path) -> None:
    """Object start positions of every trial per model, success filled, failure open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from carp_sim.tasks import TaskConfig

    base = TaskConfig.load(task)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.9), squeeze=False, sharey=True)
    for ax, (label, r) in zip(axes[0], rows.items()):
        (x0, x1), (y0, y1) = base.object_x, base.object_y
        ax.add_patch(
            Rectangle((y0, x0), y1 - y0, x1 - x0, fill=False, ls="--", color="k", label="demonstrated")
        )
        for split, colour in zip(SPLITS, ("tab:blue", "tab:orange")):
            xy, ok = np.asarray(r[split]["object_xy"]), np.asarray(r[split]["success"], bool)
            ax.scatter(xy[ok, 1], xy[ok, 0], s=22, color=colour, label=f"{split}: success")
            ax.scatter(
                xy[~ok, 1], xy[~ok, 0], s=22, facecolors="none", edgecolors=colour, label=f"{split}: failure"
            )
        s = ", ".join(f"{sp} {r[sp]['successes']}/{r[sp]['trials']}" for sp in SPLITS)
        ax.set_title(f"{label}\n{s}", fontsize=9)
        ax.set_xlabel("object start y (m, robot base; +y left)")
        ax.invert_xaxis()  # seen from the robot: left on the left
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("object start x (m)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"{task}: where each trial's object started (seeds of every evaluation)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--task", required=True, help="cup or bowl (its variant <task>_beyond is the other split)"
    )
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        help="LABEL=PATH (a model dir or run dir); LABEL=PATH,ensemble=N runs CARP's shift ensemble "
        "on an N x N grid (1: off) instead of the model's own setting",
    )
    ap.add_argument("--seeds", default="10000,20000,30000")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sim-latency-ms", type=float, default=None, help="as carp-eval (reproducible rollouts)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/generalization/<task>")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or REPO / "benchmarks" / "results" / "generalization" / args.task)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    for spec in args.model:
        label, _, model = spec.partition("=")
        model, _, grid = model.partition(",ensemble=")
        if not model:
            ap.error(f"--model takes LABEL=PATH[,ensemble=N], got {spec!r}")
        extra = ["--ensemble-grid", grid] if grid else []
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        rows[label] = {"model": model, "carp_eval_args": extra}
        for split, task in zip(SPLITS, (args.task, f"{args.task}_beyond")):
            per, lat = [], []
            for seed in seeds:
                r = evaluate(label, model, task, seed, args, out / slug / task / f"seed{seed}", extra)
                per += r["per_trial"]
                lat.append(r["latency_ms"]["p50"])
            ok = [bool(t["success"]) for t in per]
            rows[label][split] = {
                "task": task,
                "trials": len(ok),
                "successes": sum(ok),
                "wilson_95": wilson(sum(ok), len(ok)),
                "per_seed": [sum(ok[i * args.trials : (i + 1) * args.trials]) for i in range(len(seeds))],
                "latency_p50_ms": float(np.median(lat)),
                "success": ok,
                "object_xy": object_starts(task, [int(t["seed"]) for t in per]).tolist(),
                "outcomes": {
                    k: sum(t["reason"] == k for t in per) for k in sorted({t["reason"] for t in per})
                },
            }
    summary = {
        "task": args.task,
        "seeds": seeds,
        "trials_per_seed": args.trials,
        "models": rows,
        "machine": machine.machine_info(),
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(args.task, rows, out / "success_map.png")
    print(f"\n{args.task}: success, {len(seeds)} seeds x {args.trials} trials")
    width = max(len(label) for label in rows)
    for label, r in rows.items():
        cells = [f"{sp} {r[sp]['successes']}/{r[sp]['trials']} {r[sp]['per_seed']}" for sp in SPLITS]
        print(f"  {label:<{width}}  " + " | ".join(cells))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a cup policy mistake the grasp for the release? Counted per trial, in closed loop.

    .venv/bin/python benchmarks/grasp_confusion.py --policy out/models/cup_visual_6k \\
        --results benchmarks/results/success/cup_visual_6k/seed10000.json [--results ...] \\
        [--seeds 20000,20001] [--sim-latency-ms 34] --out benchmarks/results/grasp_confusion_6k.json

In every demonstration the gripper reads the cup's width (about 61 mm) twice with the TCP at table
height: after it closes on the cup at the start, and before it opens over the target. The expert
lifts with the gripper closed after the first and opens it after the second. A policy that confuses
the two commands "open" while it holds the cup far from the target, drops the cup, descends, grasps
again, and times out. For each trial this replays the evaluation (``carp_bringup.evaluate.run_trial``
through the driver core; the same rollout as ``carp-eval`` with the same ``--sim-latency-ms``) and
counts the plans made while holding (state gripper between 30 and 70 mm, TCP more than 10 cm from the
target in y) and, among them, those whose chunk commands the gripper open (over 70 mm) at its first or
eighth step; ``empty_plans`` counts those made with the gripper closed on nothing (under 30 mm), as
after a dropped cup. ``--results`` adds the failed trials of carp-eval results.json files (their seeds);
``--seeds`` adds any others (successes, as a control). Writes one JSON with a row per trial.

``--data data/cup200`` adds what the demonstrations show at the two decisions: the state at the
frame where the expert starts to lift (after the grasp) and where it starts to open (over the
target), and k steps before each. It says how much of a state history an observation would need
to tell the two apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import machine
import numpy as np

HOLDING_M = 0.07  # under this the gripper holds the cup (open: 85 mm, on the cup: 61 mm)
EMPTY_M = 0.03  # ... unless under this: closed on nothing (0 mm), the grasp missed the cup
AWAY_FROM_TARGET_M = 0.10  # |TCP y - target y| beyond this: not over the target


def trace(policy, cell, cfg, seed: int) -> dict:
    """One trial of the cup task with the plans counted (see the module doc); ``policy`` and
    ``cell`` are loaded once and reset by ``run_trial`` for each seed."""
    from carp_bringup.evaluate import run_trial

    counts = {"plans": 0, "holding_plans": 0, "open_while_holding": 0, "empty_plans": 0}
    predict = policy.predict

    def counted(obs):  # the policy's own predict, with the chunk inspected on the way out
        chunk = predict(obs)
        actions, state = np.asarray(chunk.actions), np.asarray(obs.state)[-1]
        counts["plans"] += 1
        counts["empty_plans"] += int(state[-1] < EMPTY_M)
        holding = EMPTY_M <= state[-1] < HOLDING_M
        if holding and abs(state[1] - cell.layout.target_xy[1]) > AWAY_FROM_TARGET_M:
            counts["holding_plans"] += 1
            counts["open_while_holding"] += int(max(actions[0, -1], actions[7, -1]) > HOLDING_M)
        return chunk

    policy.predict = counted
    try:
        result = run_trial(cell, policy, seed, cfg)
    finally:
        policy.predict = predict
    return {"seed": seed, "success": result.success, "reason": result.reason, **counts}


def demo_phases(data: Path, lags: tuple[int, ...] = (0, 2, 4, 6, 8, 12)) -> dict:
    """The demonstrations' state at the lift decision and at the release decision, and ``lag``
    steps before each (mean and std over the episodes; mm for the TCP's z and the gripper)."""
    from carp_policy.dataset.reader import EpisodeDataset

    ds = EpisodeDataset(data, cameras=[])
    states, lift, release = [], [], []  # per episode: the state (T, D) and the two decision steps
    for i in range(len(ds)):
        v = ds.vectors(i)
        s, a = v["state"], v["action"]
        close = int(np.argmax(a[:, -1] < HOLDING_M))  # the first step commanding the gripper closed
        # the lift: the first step after it whose target is 5 mm above the TCP; the release: the
        # first step after it commanding the gripper open (argmax 0: none found)
        up, opens = np.argmax(a[close:, 2] > s[close:, 2] + 0.005), np.argmax(a[close:, -1] > HOLDING_M)
        if not (up and opens):
            raise ValueError(f"episode {i} of {data}: no {'lift' if not up else 'release'} after the grasp")
        states.append(s)
        lift.append(close + int(up))
        release.append(close + int(opens))
    rows = {}
    for lag in lags:
        row = {}
        for name, idx in (("lift", lift), ("release", release)):
            at = np.stack([st[max(t - lag, 0)] for st, t in zip(states, idx)])  # (episodes, D)
            for col, dim in (("z_mm", 2), ("gripper_mm", -1)):
                row[f"{name}_{col}"] = [
                    round(1e3 * float(at[:, dim].mean()), 1),
                    round(1e3 * float(at[:, dim].std()), 1),
                ]
        rows[f"lag_{lag}"] = row
    return {"data": str(data), "episodes": len(ds), "mean_std": rows}


def trace_policy(args: argparse.Namespace, seeds: list[int]) -> dict:
    """Replay ``seeds`` with ``args.policy`` in the twin, counted by :func:`trace`."""
    from carp_bringup.evaluate import EvalConfig, load_policy
    from carp_sim.env import SimCell, SimConfig

    cfg = EvalConfig(task="cup", trials=1, sim_latency_s=args.sim_latency_ms / 1e3, videos=0)
    policy = load_policy(args.policy, cfg=cfg)
    cfg.execute_steps = int(policy.contract["execute_steps"])  # the model's own, as carp-eval runs it
    cell = SimCell(task="cup", config=SimConfig(cameras=tuple(policy.cameras), render=bool(policy.cameras)))
    rows = []
    try:
        for seed in seeds:
            rows.append(trace(policy, cell, cfg, seed))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        cell.close()
    confused = [r["seed"] for r in rows if r["open_while_holding"] >= 3]
    print(
        f"{len(confused)} of {len(rows)} trials mistake the grasp for the release: {confused}",
        file=sys.stderr,
    )
    return {
        "policy": args.policy,
        "sim_latency_ms": args.sim_latency_ms,
        "holding_m": [EMPTY_M, HOLDING_M],
        "away_from_target_m": AWAY_FROM_TARGET_M,
        "trials": rows,
        "confused_trials": confused,  # 3 or more open commands while holding away from the target
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", help="an exported model dir or models/NAME (cup task)")
    p.add_argument(
        "--results", action="append", default=[], help="carp-eval results.json: trace its failures"
    )
    p.add_argument("--seeds", default="", help="comma-separated extra trial seeds")
    p.add_argument("--sim-latency-ms", type=float, default=34.0)
    p.add_argument("--data", type=Path, help="also: the demonstrations' state at the two decisions")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    seeds = [
        t["seed"]
        for f in args.results
        for t in json.loads(Path(f).read_text())["per_trial"]
        if not t["success"]
    ]
    seeds += [int(s) for s in args.seeds.split(",") if s]
    if args.policy is None and args.data is None:
        p.error("give --policy (with --results or --seeds), --data, or both")
    summary: dict = {"machine": machine.machine_info()}
    if args.data is not None:
        summary["demonstrations"] = demo_phases(args.data)
        for lag, row in summary["demonstrations"]["mean_std"].items():
            print(lag, json.dumps(row), flush=True)
    if args.policy is not None:
        if not seeds:
            p.error("no trials: give --results with failures or --seeds")
        summary |= trace_policy(args, seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""First-chunk error: how far a policy's first chunk is from the expert's on new layouts.

    .venv/bin/python benchmarks/first_chunk.py --task cup --policy models/cup [--policy LABEL=DIR ...] \
        [--data data/cup] [--seed 10000 --layouts 20] [--out benchmarks/results/first_chunk_cup.json]

At the start of an episode the arm is at home and the only thing that tells one layout from another
is where the object and the target are. The first chunk therefore shows, free of closed-loop drift,
whether a policy carries what it learned from the demonstrated layouts over to new ones: for each
evaluation layout it compares the policy's first chunk with the scripted expert's, computed from the
same observation. Reported per policy: the xy error of the chunk's last step (where it aims) and the
mean position error over the chunk, in mm; how far the chunk's first step lies from the TCP, in
all and per axis (the driver refuses a chunk that starts more than its ``max_start_distance``
away); and, per axis, the correlation over the layouts between where the chunk ends and where the
object is (the expert's is ~1: a policy near 0 on an axis does not see the object's position
along it). With --data it also
reports how far each evaluation object is from the nearest demonstrated one, and what always aiming
at the mean demonstrated object position would score: the scale against which "uses the object
position" can be read.
Visual policies get the twin's camera renders of each layout. Writes JSON with the machine and the
commit. Needs mujoco (the twin), no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import machine
import numpy as np

REPO = machine.REPO


def demonstrated_objects(data: str) -> np.ndarray:
    """(N, 2) object x, y at the first frame of every demonstration of a dataset."""
    from carp_policy.dataset import EpisodeDataset, KeyMap
    from carp_policy.dataset.format import ENV_STATE_KEY

    ds = EpisodeDataset(data, keymap=KeyMap(env_state_key=ENV_STATE_KEY))
    i = ds.state_names.index("object_x")
    return np.array([ds.vectors(e)["state"][0, i : i + 2] for e in range(len(ds))])


def summary(values: list[float]) -> dict[str, float]:
    """Mean, median and max of a list of per-layout numbers."""
    return {"mean": np.mean(values), "median": np.median(values), "max": np.max(values)}


def aim_correlation(ends: np.ndarray, objects: np.ndarray) -> dict[str, float]:
    """Per axis, the correlation over the layouts of where chunks end (N, 2) with the objects (N, 2)."""
    return {axis: float(np.corrcoef(ends[:, i], objects[:, i])[0, 1]) for i, axis in enumerate("xy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=["cup", "bowl"])
    p.add_argument(
        "--policy", action="append", required=True, help="[LABEL=]model dir, run dir or name (repeatable)"
    )
    p.add_argument("--data", help="the demonstrations the policies were trained on (for the reference rows)")
    p.add_argument("--seed", type=int, default=10000, help="first evaluation layout (never a data seed)")
    p.add_argument("--layouts", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from carp_bringup.evaluate import load_policy
    from carp_policy.actions import ObservationHistory
    from carp_sim.env import SimCell, SimConfig
    from carp_sim.expert import make_expert

    policies = [(item.rpartition("=")[0], item.rpartition("=")[2]) for item in args.policy]
    policies = [(label, spec, load_policy(spec)) for label, spec in policies]
    # a visual policy needs the twin's camera renders; a state policy reads none
    visual = any(pol.cameras for _, _, pol in policies)
    cell = SimCell(task=args.task, config=SimConfig() if visual else SimConfig(cameras=(), render=False))
    seeds = range(args.seed, args.seed + args.layouts)
    observations, expert, objects = [], [], []  # each layout rendered once, for every policy
    for s in seeds:
        obs = cell.reset(s)
        observations.append(obs)
        expert.append(make_expert(cell, s).predict(obs).actions)
        objects.append(obs.env_state[:2])
    objects = np.array(objects)
    result: dict = {"machine": machine.machine_info(), "task": args.task, "seeds": list(seeds)}
    result["expert_aim_object_correlation"] = aim_correlation(np.array([e[-1, :2] for e in expert]), objects)
    result["policies"] = {}
    for label, spec, policy in policies:
        aim, mean, start, offsets, ends = [], [], [], [], []
        for obs, ref in zip(observations, expert):
            history = ObservationHistory(policy.obs_horizon, policy.obs_stride)
            chunk = policy.predict(history.push(obs)).actions
            aim.append(np.linalg.norm(chunk[-1, :2] - ref[-1, :2]) * 1e3)
            mean.append(np.linalg.norm(chunk[:, :3] - ref[:, :3], axis=1).mean() * 1e3)
            offsets.append((chunk[0, :3] - np.asarray(obs.state)[:3]) * 1e3)
            start.append(np.linalg.norm(offsets[-1]))
            ends.append(chunk[-1, :2])
        result["policies"][label or spec] = {
            "policy": spec,
            "aim_xy_mm": summary(aim),
            "chunk_position_mm": {"mean": np.mean(mean)},
            "first_step_from_tcp_mm": summary(start),
            # per axis, signed: which axis puts the first step off the arm
            "first_step_offset_mm": {a: float(v) for a, v in zip("xyz", np.mean(offsets, axis=0))},
            "first_step_abs_offset_mm": {a: float(v) for a, v in zip("xyz", np.abs(offsets).mean(0))},
            "aim_object_correlation": aim_correlation(np.array(ends), objects),
            "per_layout_aim_mm": [round(float(a), 1) for a in aim],
        }
    if args.data:
        demo = demonstrated_objects(args.data)
        nearest = np.linalg.norm(objects[:, None] - demo[None], axis=2).min(1) * 1e3
        result["reference"] = {
            "demonstrations": len(demo),
            "nearest_demonstrated_object_mm": {"mean": nearest.mean(), "max": nearest.max()},
            "aim_at_mean_demonstrated_object_mm": np.linalg.norm(objects - demo.mean(0), axis=1).mean() * 1e3,
        }
    cell.close()
    print(f"{args.task}, {args.layouts} layouts from seed {args.seed}: first chunk vs the expert's")
    for spec, r in result["policies"].items():
        corr, start = r["aim_object_correlation"], r["first_step_from_tcp_mm"]["mean"]
        print(f"  {spec}: aim {r['aim_xy_mm']['mean']:.1f} mm mean (median {r['aim_xy_mm']['median']:.1f}), "
              f"chunk {r['chunk_position_mm']['mean']:.1f} mm, first step {start:.1f} mm from the TCP, "
              f"aim/object correlation x {corr['x']:.2f} y {corr['y']:.2f}")  # fmt: skip
    if "reference" in result:
        ref = result["reference"]
        nearest = ref["nearest_demonstrated_object_mm"]["mean"]
        mean_aim = ref["aim_at_mean_demonstrated_object_mm"]
        print(f"  nearest demonstrated object: {nearest:.1f} mm mean; aim at their mean: {mean_aim:.1f} mm")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float))  # NumPy scalars as floats
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

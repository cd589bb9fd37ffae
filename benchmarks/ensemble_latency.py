"""Shift-ensemble latency: one batched pass against nine passes, on a trained CARP run.

    .venv/bin/python benchmarks/ensemble_latency.py --run runs/cup_state_env [--runs 200] [--threads 1] \
        [--out benchmarks/results/ensemble_latency.json]

Exports the run twice into a temporary directory, with graphs at batch 1 and at the ensemble's size
(``ensemble.grid`` squared, 9 for 3 x 3), and times observation -> chunk on the onnxruntime CPU
provider (CUDA with --device cuda) for: the policy alone (no ensemble), the ensemble run one copy at
a time on the batch-1 graphs, and the ensemble in one pass of the batched graphs. Observations are
random within the normalisation range (latency does not depend on the values). Writes JSON with
the machine and the commit. Imports no mujoco.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import machine
import numpy as np
from latency import measure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a carp-train run dir whose config has an ensemble section")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: its default)")
    default_out = machine.REPO / "benchmarks" / "results" / "ensemble_latency.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)

    import torch

    from carp_policy.engine import OnnxPolicy
    from carp_policy.export import export_policy
    from carp_policy.export import random_observation as _random_observation
    from carp_policy.policies.carp.modeling_carp import CarpPolicy
    from carp_policy.policies.ensemble import ShiftEnsemble

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = CarpPolicy.from_run(args.run)
    ens = policy.config.ensemble
    if ens.grid < 2:
        print(f"{args.run}: its config has no shift ensemble (ensemble.grid {ens.grid})", file=sys.stderr)
        return 2
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for b in (1, ens.grid**2):
            export_policy(policy, Path(tmp) / f"b{b}", parity_samples=2, verbose=False, batch=b)
            engines[b] = OnnxPolicy(Path(tmp) / f"b{b}", device=args.device, intra_op_threads=args.threads)
        rng = np.random.default_rng(0)
        obs = [_random_observation(engines[1].spec, policy.normalizer, rng) for _ in range(8)]
        K, g = ens.grid**2, f"{ens.grid}x{ens.grid}"
        cases = {
            "policy alone (batch-1 graphs)": engines[1].predict,
            f"ensemble {g}, {K} passes (batch-1 graphs)": ShiftEnsemble(engines[1], ens).predict,
            f"ensemble {g}, one pass (batch-{K} graphs)": ShiftEnsemble(engines[K], ens).predict,
        }
        for name, fn in cases.items():
            r = rows[name] = measure(fn, obs, args.runs, args.warmup)[0]
            print(f"  {name:<45} p50 {r['p50']:7.2f} ms  p90 {r['p90']:7.2f} ms", flush=True)
    names = list(rows)
    ratio = rows[names[1]]["p50"] / rows[names[2]]["p50"]
    print(f"one batched pass is {ratio:.1f}x faster than {K} passes")
    result = {
        "machine": machine.machine_info(),
        "run": str(args.run),
        "device": args.device,
        "threads": args.threads,
        "ensemble": {"grid": ens.grid, "radius": ens.radius},
        "rows": rows,
        "batched_over_sequential": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

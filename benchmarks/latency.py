"""Policy latency: observation -> 16-step action chunk at batch 1, after warm-up, p50/p90/p99.

    .venv/bin/python benchmarks/latency.py [--device cpu|cuda] [--runs 200] [--out DIR]

Measures, for the state and the visual variant (models built from the package configs with random
weights: latency does not depend on the weights), exported to a temporary directory and run:
CARP torch eager, CARP ONNX (CPU; CUDA when asked and available) with a per-stage breakdown
(encoder + scale 1, scales 2..K, decoder), and DP-C with 100 DDPM steps and 10 DDIM steps (torch and
ONNX), and Chain-of-Action (torch and ONNX, at chain lengths 1..32: its latency grows with the
distance to the keyframe; latency_coa_chain.png). DP-C needs `diffusers`; without it DP-C is
skipped with a note. DP-C-100 on a CPU takes seconds per chunk, so DP-C measurements stop after
--dpc-budget-s seconds (at least 3 runs) and say so. Writes latency.json (machine, providers,
versions, commit, every number) and latency.png, and prints a table whose last line is the
speed-up of CARP ONNX over DP-C-100 in this run.
Imports no mujoco.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine
import numpy as np

REPO = machine.REPO


def stats_ms(times_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds."""
    t = np.asarray(times_s) * 1e3
    return {
        "p50": float(np.percentile(t, 50)),
        "p90": float(np.percentile(t, 90)),
        "p99": float(np.percentile(t, 99)),
        "mean": float(t.mean()),
        "runs": len(t),
    }


def measure(fn, obs_list: list, runs: int, warmup: int, budget_s: float | None = None) -> tuple[dict, list]:
    """Time ``fn(obs)`` end to end; stop early after ``budget_s`` (never before 3 runs)."""
    for i in range(warmup):
        fn(obs_list[i % len(obs_list)])
    times, t_start = [], time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn(obs_list[i % len(obs_list)])
        times.append(time.perf_counter() - t0)
        if budget_s is not None and i >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return stats_ms(times), times


def machine_info(device: str) -> dict[str, Any]:
    """Where it ran (see machine.py) plus GPU, torch and onnxruntime providers."""
    import onnxruntime as ort
    import torch

    return machine.machine_info() | {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "device_requested": device,
    }


def _normalizer():
    from carp_policy.normalization import Normalizer

    lo = np.array([0.2, -0.4, 0.0, -1, -1, -1, -1, -1, -1, 0.0])
    hi = np.array([0.7, 0.4, 0.5, 1, 1, 1, 1, 1, 1, 0.085])
    return Normalizer(lo, hi, lo, hi)


def bench_variant(variant: str, args: argparse.Namespace, tmp: Path, notes: list[str]) -> list[dict]:
    """All measurements of one variant (state / visual); returns result rows."""
    import torch

    from carp_policy.engine import OnnxPolicy
    from carp_policy.export import export_policy
    from carp_policy.export import random_observation as _random_observation
    from carp_policy.policies.carp.configuration_carp import CarpConfig
    from carp_policy.policies.carp.modeling_carp import CarpPolicy

    rows: list[dict] = []
    norm = _normalizer()
    torch.manual_seed(0)
    cfg = CarpConfig.load(variant)
    policy = CarpPolicy(cfg, None, norm)
    out = tmp / f"carp_{variant}"
    manifest = _export_untrained(policy, out, f"[{variant}] exporting CARP ...")
    rng = np.random.default_rng(0)
    obs_list = [_random_observation(manifest["observation"], norm, rng) for _ in range(8)]
    cuda = args.device == "cuda"

    def row(method: str, device: str, s: dict, **extra: Any) -> None:
        rows.append({"variant": variant, "method": method, "device": device, **s, **extra})
        print(
            f"  {variant:<6} {method:<22} {device:<5} p50 {s['p50']:9.2f} ms  ({s['runs']} runs)", flush=True
        )

    # --- CARP torch eager
    row("CARP torch eager", "cpu", measure(policy.predict, obs_list, args.runs, args.warmup)[0])
    if cuda:
        if torch.cuda.is_available():
            gpu_policy = CarpPolicy(cfg, policy.model.state_dict(), norm, device="cuda")
            row("CARP torch eager", "cuda", measure(gpu_policy.predict, obs_list, args.runs, args.warmup)[0])
        else:
            notes.append("torch has no CUDA here: CARP torch measured on CPU only")

    # --- CARP ONNX, with the per-stage breakdown
    engines = [("cpu", OnnxPolicy(out, device="cpu", intra_op_threads=args.threads))]
    if cuda:
        try:
            engines.append(("cuda", OnnxPolicy(out, device="cuda")))
        except RuntimeError as e:
            notes.append(f"CARP ONNX on CUDA not measured: {e}")
    for dev, engine in engines:
        stage_times: list[list[float]] = []

        def run(o, engine=engine, stage_times=stage_times):
            engine.predict(o)
            stage_times.append(list(engine.last_stage_times))

        s, _ = measure(run, obs_list, args.runs, args.warmup)
        st = np.asarray(stage_times[args.warmup :]) * 1e3  # (runs, stages) ms
        stages = {name: float(np.median(st[:, i])) for i, name in enumerate(engine.stage_names)}
        row("CARP ONNX", dev, s, providers=engine.providers, stages_p50_ms=stages)
        print("         stages p50: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()) + " ms")

    bench_coa(variant, args, tmp, norm, obs_list, row)

    # --- DP-C (optional: needs diffusers)
    try:
        from carp_policy.policies.diffusion.modeling_diffusion import DiffusionConfig, DiffusionPolicy
    except ImportError as e:
        notes.append(f"DP-C skipped: {e} (install diffusers to measure the baseline)")
        return rows
    torch.manual_seed(0)
    dcfg = DiffusionConfig.load(f"diffusion_{variant}")
    dpc = DiffusionPolicy(dcfg, norm)
    dout = tmp / f"dpc_{variant}"
    print(
        f"[{variant}] exporting DP-C ({sum(p.numel() for p in dpc.model.parameters()) / 1e6:.1f}M params) ..."
    )
    export_policy(dpc, dout, parity_samples=1, verbose=False)
    for sampler, steps, label in (("ddpm", 100, "DP-C-100 (DDPM)"), ("ddim", 10, "DP-C-10 (DDIM)")):
        budget = args.dpc_budget_s
        for dev in ["cpu"] + (["cuda"] if cuda and torch.cuda.is_available() else []):
            model = (
                dpc if dev == "cpu" else DiffusionPolicy(dcfg, norm, dpc.model.state_dict(), device="cuda")
            )
            model.config.noise.sampler, model.config.noise.num_inference_steps = sampler, steps
            s, _ = measure(model.predict, obs_list, args.runs, 2, budget)
            row(f"{label} torch", dev, s)
            _budget_note(notes, variant, f"{label} torch {dev}", s, args.runs, budget)
        for dev in ["cpu"] + (["cuda"] if cuda else []):
            try:
                engine = OnnxPolicy(
                    dout,
                    device=dev,
                    sampler=sampler,
                    num_inference_steps=steps,
                    intra_op_threads=args.threads,
                )
            except RuntimeError as e:
                notes.append(f"DP-C ONNX on {dev} not measured: {e}")
                continue
            s, _ = measure(engine.predict, obs_list, args.runs, 2, budget)
            row(f"{label} ONNX", dev, s, providers=engine.providers)
            _budget_note(notes, variant, f"{label} ONNX {dev}", s, args.runs, budget)
    return rows


def _export_untrained(policy: Any, out: Path, message: str) -> Any:
    """Export a freshly built policy (latency does not depend on the weights) -> its manifest.
    adaLN-Zero gates start at zero: they get small weights, so every block does real work."""
    import torch

    from carp_policy.export import export_policy

    with torch.no_grad():
        for p in policy.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    print(message, flush=True)
    return export_policy(policy, out, parity_samples=2, verbose=False)


COA_CHAINS = (1, 4, 8, 16, 24, 32)  # decoded chain lengths measured (32 = the longest chain)


def bench_coa(variant: str, args: argparse.Namespace, tmp: Path, norm: Any, obs_list: list, row: Any) -> None:
    """Chain-of-Action, torch eager and ONNX, at fixed chain lengths: its latency grows with the
    distance to the keyframe (one KV-cached step per chain step; the near-term actions come last).
    One row per method at chain 16 goes through ``row``; every chain length to COA_CHAIN_ROWS."""
    import torch

    from carp_policy.engine import OnnxPolicy
    from carp_policy.policies.coa.configuration_coa import CoaConfig
    from carp_policy.policies.coa.modeling_coa import CoaPolicy

    torch.manual_seed(0)
    cfg = CoaConfig.load(f"coa_{'state_env' if variant == 'state' else variant}")
    if variant == "state":
        cfg.encoder.env_state_dim = 0  # the same observation as the CARP and DP-C state variants
    coa = CoaPolicy(cfg, norm)
    out = tmp / f"coa_{variant}"
    _export_untrained(coa, out, f"[{variant}] exporting CoA ...")
    for n in COA_CHAINS:
        torch_s = measure(lambda o, n=n: coa.predict_chain(o, chain_len=n), obs_list, args.runs, args.warmup)[
            0
        ]
        engine = OnnxPolicy(out, device="cpu", intra_op_threads=args.threads, chain_len=n)
        onnx_s = measure(engine.predict, obs_list, args.runs, args.warmup)[0]
        if n == 16:
            row("CoA torch eager", "cpu", torch_s, chain_len=n)
            row("CoA ONNX", "cpu", onnx_s, chain_len=n, providers=engine.providers)
        COA_CHAIN_ROWS.append(
            {
                "variant": variant,
                "chain_len": n,
                "torch_p50": torch_s["p50"],
                "onnx_p50": onnx_s["p50"],
                "onnx_p99": onnx_s["p99"],
            }
        )
        print(
            f"         CoA chain {n:2d}: torch {torch_s['p50']:.2f} ms, ONNX {onnx_s['p50']:.2f} ms",
            flush=True,
        )


COA_CHAIN_ROWS: list[dict] = []


def plot_coa_chain(path: Path) -> None:
    """CoA latency over the decoded chain length, one line per variant and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in sorted({r["variant"] for r in COA_CHAIN_ROWS}):
        rs = [r for r in COA_CHAIN_ROWS if r["variant"] == v]
        n = [r["chain_len"] for r in rs]
        ax.plot(n, [r["onnx_p50"] for r in rs], "o-", label=f"{v}, ONNX (CPU)")
        ax.plot(n, [r["torch_p50"] for r in rs], "s--", label=f"{v}, torch eager (CPU)")
    ax.set_xlabel("decoded chain length (steps from the keyframe back to now)")
    ax.set_ylabel("ms per chunk, p50")
    ax.set_title("Chain-of-Action: latency grows with the distance to the keyframe", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _budget_note(notes: list[str], variant: str, what: str, s: dict, runs: int, budget: float) -> None:
    if s["runs"] < runs:
        notes.append(f"{variant} {what}: {s['runs']} runs, not {runs} (time budget {budget:.0f} s)")


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of p50 (whiskers p90 and p99), log scale, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in rows}, key=["state", "visual"].index)
    fig, axes = plt.subplots(1, len(variants), figsize=(7 * len(variants), 5), squeeze=False)
    for ax, v in zip(axes[0], variants):
        rs = [r for r in rows if r["variant"] == v]
        labels = [f"{r['method']}\n[{r['device']}]" for r in rs]
        p50 = [r["p50"] for r in rs]
        ax.barh(
            labels,
            p50,
            color=[
                "tab:blue" if "CARP" in r["method"] else "tab:green" if "CoA" in r["method"] else "tab:gray"
                for r in rs
            ],
        )
        ax.scatter([r["p90"] for r in rs], labels, marker="|", color="k", s=200, label="p90")
        ax.scatter([r["p99"] for r in rs], labels, marker="x", color="r", label="p99")
        ax.set_xscale("log")
        ax.set_xlabel("ms per 16-step chunk (batch 1), log scale")
        ax.set_title(f"{v}: p50 bars, p90 | and p99 x")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per measurement (after warm-up)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and onnxruntime alike (0: their defaults)",
    )
    ap.add_argument("--dpc-budget-s", type=float, default=15.0, help="time cap per DP-C measurement")
    ap.add_argument("--variants", default="state,visual")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
        import torch
    except ImportError as e:
        print(
            f"latency: {e}: needs torch and onnxruntime (onnxruntime-gpu for --device cuda)", file=sys.stderr
        )
        return 1
    notes: list[str] = []
    if args.threads:  # the same CPU threads for torch and onnxruntime, so the comparison is fair
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        notes.append(
            f"CUDAExecutionProvider missing (onnxruntime has {ort.get_available_providers()}): "
            "install onnxruntime-gpu; ONNX measured on CPU only"
        )
        print("NOTE: " + notes[-1], flush=True)
    info = machine_info(args.device)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants.split(","):
            rows += bench_variant(v.strip(), args, Path(tmp), notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speedups = {}
    for v in {r["variant"] for r in rows}:
        dev = (
            "cuda"
            if any(r["variant"] == v and r["method"] == "CARP ONNX" and r["device"] == "cuda" for r in rows)
            else "cpu"
        )
        carp = next(
            (r for r in rows if r["variant"] == v and r["method"] == "CARP ONNX" and r["device"] == dev), None
        )
        eager = next(
            (
                r
                for r in rows
                if r["variant"] == v and r["method"] == "CARP torch eager" and r["device"] == dev
            ),
            None,
        )
        dp100 = next(
            (
                r
                for r in rows
                if r["variant"] == v and r["method"] == "DP-C-100 (DDPM) torch" and r["device"] == dev
            ),
            None,
        )
        speedups[v] = {
            "device": dev,
            "onnx_over_torch_eager": eager["p50"] / carp["p50"] if carp and eager else None,
            "onnx_over_dpc100_torch": dp100["p50"] / carp["p50"] if carp and dp100 else None,
        }
    result = {
        "machine": info,
        "args": vars(args),
        "rows": rows,
        "speedups": speedups,
        "coa_chain": COA_CHAIN_ROWS,
        "notes": notes,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "latency.png")
    if COA_CHAIN_ROWS:
        plot_coa_chain(out / "latency_coa_chain.png")

    # ---- summary table (one screen); the last line is the headline speed-up
    print(
        f"\nPolicy latency, obs -> 16-step chunk, batch 1 | {info['cpu']} x{info['cpu_cores']}"
        + (f" | {info['gpu']}" if info["gpu"] else "")
        + f" | torch {info['torch']} ort {info['onnxruntime']}"
    )
    print(f"{'variant':<7} {'method':<24} {'dev':<5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'runs':>5}")
    for r in rows:
        print(
            f"{r['variant']:<7} {r['method']:<24} {r['device']:<5} "
            f"{r['p50']:9.2f} {r['p90']:9.2f} {r['p99']:9.2f} {r['runs']:>5}"
        )
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out / 'latency.json'} and {out / 'latency.png'} ({result['wall_s']:.0f} s)")
    for v, s in sorted(speedups.items()):
        if s["onnx_over_torch_eager"]:
            print(
                f"{v}: CARP ONNX is {s['onnx_over_torch_eager']:.1f}x faster than "
                f"CARP torch eager ({s['device']})"
            )
    parts = [
        f"{v} {s['onnx_over_dpc100_torch']:.1f}x"
        for v, s in sorted(speedups.items())
        if s["onnx_over_dpc100_torch"]
    ]
    print(
        "speed-up of CARP ONNX over DP-C-100 (p50, same run): "
        + (", ".join(parts) if parts else "n/a (DP-C not measured)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

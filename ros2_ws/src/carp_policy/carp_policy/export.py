"""ONNX export of a trained policy: ``carp-export --run RUN_DIR --out MODEL_DIR [--fp16]``.

A model directory holds the graphs, ``manifest.json`` and nothing else; ``carp_policy.engine.OnnxPolicy``
runs it with onnxruntime (no torch needed on the robot PC). Each family writes its own graphs
(``policies/<family>/export_<family>.py``, asked for through the registry); this module writes the
manifest (``carp_policy.manifest``: family, config, the contract a node needs, observation spec,
normalisation stats, opset, per-file sha256, source commit, export date) and checks parity: torch
vs ONNX on random observations, at export time, or the export fails.

Un-normalisation and the rot6d re-orthonormalisation are not in the graphs: both runtimes decode
chunks through the same ``carp_policy.processor``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carp_policy.actions import Observation
from carp_policy.cli import add_device_argument, resolve_device, run_main
from carp_policy.manifest import FORMAT_VERSION, MANIFEST, OPSET, sha256
from carp_policy.normalization import Normalizer
from carp_policy.policies import get_family

PARITY_TOL = 1e-4  # max |action difference| (physical units) accepted between torch and ONNX in fp32


# ----------------------------------------------------------------------------- helpers
def source_commit() -> str:
    """The git commit this package is installed from (suffix ``-dirty`` if modified), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(here)],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}[t.dtype]


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
) -> dict[str, Any]:
    """Export one static-shape graph with the legacy exporter; return its manifest entry."""
    module.eval()
    with torch.no_grad():
        outs = module(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if len(outs) != len(output_names):
        raise RuntimeError(f"{path.name}: {len(outs)} outputs but {len(output_names)} names")
    export_kw: dict[str, Any] = dict(
        input_names=input_names, output_names=output_names, opset_version=OPSET, do_constant_folding=True
    )
    # the legacy TorchScript exporter: works on torch 2.11 and 2.14, needs no onnxscript; older torch
    # versions have no `dynamo` argument and use it anyway
    with warnings.catch_warnings():  # tracer warnings about shapes as Python ints: static by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **export_kw)
        except TypeError:
            torch.onnx.export(module, args, str(path), **export_kw)
    return {
        "file": path.name,
        "inputs": {n: {"shape": list(a.shape), "dtype": _dtype_name(a)} for n, a in zip(input_names, args)},
        "outputs": {n: {"shape": list(o.shape), "dtype": _dtype_name(o)} for n, o in zip(output_names, outs)},
        "precision": "fp32",
    }


def observation_spec(config: Any, state_names: list[str] | None = None) -> dict[str, Any]:
    """What the node must feed: state layout, obs horizon, cameras and image size (from the
    config's contract; state_names: the training data's names of the policy's state vector)."""
    c = config.contract(state_names)
    cams = list(c["cameras"])
    spec = {
        "obs_horizon": c["obs_horizon"],
        "state_dim": len(c["state_names"]),
        "state_names": c["state_names"],
        "state_units": "x, y, z in m (robot base frame); rotation6d; gripper opening in m",
        # appended to the state inside the graph input "state" (obs_horizon, state_dim + env_state_dim)
        "env_state_dim": len(c["env_state_names"]),
        "env_state_names": c["env_state_names"],
        "cameras": cams,
        "image_size": list(config.encoder.image_size) if cams else None,
        "image_format": "uint8 RGB, (obs_horizon, H, W, 3), oldest first" if cams else None,
    }
    if c.get("obs_stride", 1) != 1:  # rows at t - (obs_horizon - 1 - i) * obs_stride * dt
        spec["obs_stride"] = c["obs_stride"]
    if c.get("tasks"):  # a multi-task model: the graph input "task" (B,) int64 indexes this list
        spec["tasks"] = list(c["tasks"])
    return spec


def random_observation(spec: dict[str, Any], normalizer: Normalizer, rng: np.random.Generator) -> Observation:
    """A random but plausible observation: state inside the normalisation range, random images."""
    O, S, E = spec["obs_horizon"], spec["state_dim"], spec.get("env_state_dim", 0)
    lo, hi = normalizer.state_min, normalizer.state_max
    full = lo + (hi - lo) * rng.uniform(-0.1, 1.1, size=(O, S + E))
    images = {}
    for cam in spec["cameras"]:
        H, W = spec["image_size"]
        images[cam] = rng.integers(0, 256, size=(O, H, W, 3), dtype=np.uint8)
    env = full[:, S:] if E else None
    return Observation(state=full[:, :S], images=images, timestamp=0.0, env_state=env)


def example_inputs(spec: dict[str, Any], batch: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    O, S = spec["obs_horizon"], spec["state_dim"] + spec.get("env_state_dim", 0)
    args, names = [torch.zeros(batch, O, S)], ["state"]
    for cam in spec["cameras"]:
        H, W = spec["image_size"]
        args.append(torch.zeros(batch, O, H, W, 3, dtype=torch.uint8))
        names.append(f"image_{cam}")
    if spec.get("tasks"):
        args.append(torch.zeros(batch, dtype=torch.int64))
        names.append("task")
    return args, names


# ----------------------------------------------------------------------------- export
def _family_export(family: str) -> Any:
    return importlib.import_module(get_family(family).export)


def export_policy(
    policy: Any,
    out_dir: str | Path,
    fp16: bool = False,
    parity_samples: int = 8,
    seed: int = 0,
    source: str = "",
    verbose: bool = True,
    batch: int | None = None,
) -> dict[str, Any]:
    """Export a torch policy of any registered family into ``out_dir``; return the manifest.

    batch: the graphs' static batch. Default: the family's (CARP: the config's shift-ensemble size,
    ``ensemble.grid`` squared, so the engine runs the whole ensemble in one pass; DP-C: 1).

    fp32 graphs always; with ``fp16`` a family that can (CARP) also exports half-precision graphs,
    kept only if they give the same tokens as fp32 on ``parity_samples`` random observations
    (recorded in the manifest either way). Parity of the fp32 graphs against the torch policy is
    measured on the same observations and must hold (same tokens, actions within PARITY_TOL),
    else the export fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.onnx"), out / MANIFEST]:
        old.unlink(missing_ok=True)  # a model dir is one export: never mix graphs of two exports
    log = print if verbose else (lambda *a, **k: None)
    cfg = policy.config
    fam = _family_export(cfg.family)
    batch = fam.default_batch(cfg) if batch is None else batch
    fam.check_batch(batch)
    spec = observation_spec(cfg, policy.normalizer.state_names)
    t0 = time.perf_counter()
    with torch.no_grad():
        graphs, extras = fam.export_graphs(policy, spec, out, batch)
    log(f"exported {len(graphs)} fp32 graphs (batch {batch}) in {time.perf_counter() - t0:.1f} s")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "family": cfg.family,
        "name": cfg.name,
        "batch": batch,  # rows of every graph: a shift ensemble's copies run in one pass
        "config": cfg.to_dict(),
        "contract": cfg.contract(policy.normalizer.state_names),
        "observation": spec,
        "action": {"horizon": cfg.horizon, "dim": 10, "units": "physical (m, rot6d, m)"},
        "normalization": policy.normalizer.to_dict(),
        "opset": OPSET,
        "graphs": graphs,
        "scheduler": None,
        **extras,
        "source_commit": source_commit(),
        "source_run": source,
        "export_date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "python": platform.python_version()},
    }
    write_manifest(out, manifest)
    if parity_samples < 1:  # the Python API's explicit "do not check" (the CLI asks for >= 1)
        manifest["parity"] = {"samples": 0, "passed": None, "skipped": "parity_samples=0: not checked"}
        log("parity: NOT checked (parity_samples=0)")
        if fp16:
            manifest["fp16"] = {"used": False, "reason": "fp16 is kept only after a parity check"}
        write_manifest(out, manifest)
        return manifest
    manifest["parity"] = check_parity(policy, out, parity_samples, seed)
    p = manifest["parity"]
    log(
        f"parity (fp32, {p['samples']} random observations): max |action diff| {p['max_abs_action_diff']:.2e}"
        + (f", tokens equal {p['tokens_equal']}" if p["tokens_equal"] is not None else "")
    )
    if not p["passed"]:
        write_manifest(out, manifest)
        raise RuntimeError(f"ONNX export of {cfg.name} does not match the torch policy: {p}")
    if fp16:
        try_fp16 = getattr(fam, "try_fp16", None)
        manifest["fp16"] = (
            try_fp16(policy, out, manifest, parity_samples, seed)
            if try_fp16
            else {"used": False, "reason": f"{cfg.family} is exported in fp32 only"}
        )
        log(f"fp16: {manifest['fp16']}")
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Stamp every graph's sha256 and write manifest.json."""
    for g in manifest["graphs"] + (manifest.get("fp16") or {}).get("graphs", []):
        g["sha256"] = sha256(out / g["file"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def select_task(policies: list[Any], task: str) -> None:
    """Condition each of ``policies`` on ``task`` (a multi-task model's parity checks)."""
    for p in policies:
        p.select_task(task)


def check_parity(policy: Any, model_dir: Path, samples: int, seed: int) -> dict[str, Any]:
    """Torch policy vs the ONNX engine (CPU) on random observations: actions (and tokens, where the
    family has them), then every row of a batched pass against the torch policy alone."""
    from carp_policy.engine import OnnxPolicy

    if samples < 1:  # zero samples compare nothing: that must not read as "passed"
        raise ValueError(f"the parity check needs at least 1 sample, got {samples}")
    fam = _family_export(policy.config.family)
    engine = OnnxPolicy(model_dir, device="cpu", precision="fp32")
    rng = np.random.default_rng(seed)
    max_diff, tokens_equal = 0.0, None
    tasks = list(engine.spec.get("tasks") or [])
    for i in range(samples):
        obs = random_observation(engine.spec, policy.normalizer, rng)
        if tasks:  # a multi-task model: every task's embedding in turn
            select_task([policy, engine], tasks[i % len(tasks)])
        ref, got, same = fam.parity_pair(policy, engine, obs, i)
        if same is not None:
            tokens_equal = same if tokens_equal is None else tokens_equal and same
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    if engine.batch > 1:  # every row of a batched pass, each against the torch policy alone
        batch = [random_observation(engine.spec, policy.normalizer, rng) for _ in range(engine.batch)]
        for obs, chunk in zip(batch, engine.predict_batch(batch)):
            max_diff = max(max_diff, float(np.abs(policy.predict(obs).actions - chunk.actions).max()))
    return {
        "samples": samples,
        "batch": engine.batch,
        "max_abs_action_diff": max_diff,
        "tokens_equal": tokens_equal,
        "tasks": tasks,  # a multi-task model: the samples cycled through every task
        "tolerance": PARITY_TOL,
        "sampler": fam.parity_sampler(policy.config),
        "passed": bool(tokens_equal is not False and max_diff <= PARITY_TOL),
        "provider": "CPUExecutionProvider",
    }


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``carp-export --run RUN_DIR --out MODEL_DIR [--fp16]``."""
    from carp_policy.factory import load_torch_policy

    ap = argparse.ArgumentParser(prog="carp-export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="carp-train run directory (config.yaml, weights, stats)")
    ap.add_argument("--out", required=True, help="model directory to write (graphs + manifest.json)")
    ap.add_argument("--fp16", action="store_true", help="also try fp16 graphs; kept only if tokens match")
    ap.add_argument("--parity-samples", type=int, default=16, help="random observations for the parity check")
    ap.add_argument(
        "--coarse-decode",
        choices=["argmax", "expected", "head"],
        help="CARP: how the graphs pick the scale-1 tokens (transformer.coarse_decode; default: the run's; "
        "head: a run trained with transformer.coarse_head_weight > 0)",
    )
    add_device_argument(ap)  # where the torch policy is loaded; the graphs are traced on the CPU
    args = ap.parse_args(argv)
    if args.parity_samples < 1:
        ap.error("--parity-samples must be >= 1 (an export is always checked against the torch policy)")

    def body() -> int:
        policy = load_torch_policy(args.run, device=resolve_device(args.device))
        if args.coarse_decode is not None:
            if not hasattr(getattr(policy.config, "transformer", None), "coarse_decode"):
                family = policy.config.family
                raise ValueError(f"--coarse-decode is a CARP setting; {args.run} is a {family} run")
            if args.coarse_decode == "head" and policy.config.transformer.coarse_head_weight <= 0:
                raise ValueError(
                    f"--coarse-decode head: {args.run} was trained without a coarse head "
                    "(transformer.coarse_head_weight 0)"
                )
            policy.config.transformer.coarse_decode = args.coarse_decode  # the manifest's config records it
        manifest = export_policy(
            policy,
            args.out,
            fp16=args.fp16,
            parity_samples=args.parity_samples,
            source=str(Path(args.run).resolve()),
        )
        out = Path(args.out)
        print(f"\n{manifest['name']} ({manifest['family']}) -> {out}")
        for g in manifest["graphs"]:
            size = (out / g["file"]).stat().st_size / 1e6
            print(
                f"  {g['file']:<24} {g['stage']:<18} {g['precision']}  {size:7.2f} MB  "
                f"sha256 {g['sha256'][:12]}"
            )
        p = manifest["parity"]
        print(
            f"  parity: {p['samples']} obs, max |action diff| {p['max_abs_action_diff']:.1e} "
            f"(tol {p['tolerance']:.0e})"
            + (f", same tokens: {p['tokens_equal']}" if p["tokens_equal"] is not None else "")
        )
        print(
            f"  opset {manifest['opset']}, commit {manifest['source_commit'][:12]}, {manifest['export_date']}"
        )
        return 0

    return run_main("carp-export", body)


if __name__ == "__main__":
    sys.exit(main())

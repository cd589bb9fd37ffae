"""The exported model's ``manifest.json``: its format version, checks against the files, migration.

A model directory holds the ONNX graphs and ``manifest.json`` (family, config, the contract a node
needs, observation spec, normalisation stats, opset, per-file sha256, source commit, parity). This
module is the one place that knows the format; ``carp-export`` writes it, the engine reads it.

Format versions:
- 1: the first release (no ``contract``; the config without ``task``).
- 2: adds ``contract`` (task, control period dt, horizon, steps to execute, observation horizon,
  state layout, cameras with image sizes) and ``config.task``. ``upgrade`` turns a version-1
  manifest into version 2 in place without touching the graphs (their sha256 stay valid):

      python -m carp_policy.manifest upgrade models/cup --task cup

Imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
OPSET = 17  # the ONNX opset carp-export writes (legacy exporter; torch 2.11 and 2.14 alike)
SUPPORTED_OPSETS = (OPSET,)  # what the engine runs
REQUIRED = ("format_version", "family", "opset", "graphs", "observation", "normalization", "contract")


class ModelDirError(ValueError):
    """A model directory that does not match its manifest, or a manifest this engine cannot run."""


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` as a dict (no checks beyond valid JSON)."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise ModelDirError(f"{path} missing: is {model_dir} a carp-export model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from e


def load_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check it against the files: format, family, opset, checksums.

    Raises ``ModelDirError`` naming the first thing that is wrong."""
    from carp_policy.policies import families

    d = Path(model_dir)
    path = d / MANIFEST
    m = read_manifest(d)
    if m.get("format_version") == 1:
        raise ModelDirError(
            f"{path}: format_version 1 (no contract); upgrade it in place with "
            f"`python -m carp_policy.manifest upgrade {d} --task TASK`"
        )
    for key in REQUIRED:
        if key not in m:
            raise ModelDirError(f"{path} lacks '{key}'")
    if m["format_version"] != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {m['format_version']}, this engine reads {FORMAT_VERSION}"
        )
    if m["family"] not in families():
        raise ModelDirError(f"{path}: unknown policy family {m['family']!r} ({', '.join(families())})")
    if m["opset"] not in SUPPORTED_OPSETS:
        raise ModelDirError(f"{path}: opset {m['opset']}, this engine supports {SUPPORTED_OPSETS}")
    for g in m["graphs"] + (m.get("fp16") or {}).get("graphs", []):
        f = d / g["file"]
        if not f.exists():
            raise ModelDirError(f"{f} listed in the manifest is missing")
        if sha256(f) != g.get("sha256"):
            raise ModelDirError(f"{f}: sha256 does not match the manifest (file changed after export)")
        _check_opset(f, m["opset"])
    return m


def _check_opset(path: Path, want: int) -> None:
    """The graph's own default-domain opset must equal the manifest's (needs the onnx package; the
    sha256 check already pins the file the exporter measured, so without onnx this is skipped)."""
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(path), load_external_data=False)
    got = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if got and got[0] != want:
        raise ModelDirError(f"{path.name}: graph opset {got[0]} differs from the manifest's opset {want}")


def contract_of(m: dict[str, Any]) -> dict[str, Any]:
    """The contract of a manifest's model, computed from its config and normalisation stats."""
    from carp_policy.policies import get_family

    cfg = get_family(m["family"]).config_class.from_dict(m["config"])
    return cfg.contract(m["normalization"].get("state_names"))


def upgrade(model_dir: str | Path, task: str) -> dict[str, Any]:
    """Version 1 -> 2 in place: record the task in the config, add the contract. The graphs are
    not touched, so their sha256 stay valid (checked before writing)."""
    d = Path(model_dir)
    m = read_manifest(d)
    if m.get("format_version") != 1:
        raise ModelDirError(f"{d / MANIFEST}: format_version {m.get('format_version')}, upgrade reads 1")
    if not task:
        raise ValueError("upgrade needs --task (the task the model was trained for, e.g. cup)")
    m["config"] = {"task": task, **m["config"]}
    m["format_version"] = FORMAT_VERSION
    m["contract"] = contract_of(m)
    m["upgraded_from"] = 1
    (d / MANIFEST).write_text(json.dumps(m, indent=1))
    return load_manifest(d)  # sha256 and everything else, as the engine will see it


def main(argv: list[str] | None = None) -> int:
    """``python -m carp_policy.manifest upgrade MODEL_DIR --task TASK``."""
    from carp_policy.cli import run_main

    ap = argparse.ArgumentParser(
        prog="carp-manifest", description="Upgrade a model's manifest.json in place."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upgrade", help="format_version 1 -> 2 (adds the contract; graphs untouched)")
    up.add_argument("model_dir")
    up.add_argument("--task", required=True, help="the task the model was trained for (cup, bowl)")
    args = ap.parse_args(argv)

    def body() -> int:
        m = upgrade(args.model_dir, args.task)
        print(f"{args.model_dir}: format_version {m['format_version']}, contract {m['contract']}")
        return 0

    return run_main("carp-manifest", body)


if __name__ == "__main__":
    sys.exit(main())

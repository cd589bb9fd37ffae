"""The user's path in the twin, end to end: ``carp-record --sim`` records a demonstration driven by
a scripted SpaceMouse input stream (HID reports through pyspacemouse, the teleop core, the limits,
the twin, its threaded cameras), ``carp-dataset validate`` accepts it, ``carp-train`` trains on it
(a few steps) and ``carp-eval`` runs the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    import time

    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    p = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    print(f"{args[0]}: {time.perf_counter() - t0:.1f} s")
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_scripted_spacemouse_demos_record_validate_train_and_evaluate(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "cup", tmp_path / "run"
    rec = run(
        "carp_teleop.record",
        "--task",
        "cup",
        "--out",
        str(data),
        "--operator",
        "scripted",
        "--sim",
        "--input",
        "scripted",
        "--episodes",
        "2",
        "--duration",
        "90",
        "--set",
        "max_frame_age=0.4",
        "--set",
        "max_skew=0.4",
    )
    assert "saved 2 episode(s)" in rec.stdout, rec.stderr
    val = run("carp_policy.dataset.cli", "validate", str(data))
    assert "OK: 2 episodes" in val.stdout
    from carp_policy.dataset import EpisodeDataset

    meta = EpisodeDataset(data).metadata(0)
    assert meta["operator"] == "scripted" and meta["input"] == "scripted" and meta["sim"] is True
    print("twin outcome of the scripted demonstration:", meta.get("twin_success"), meta.get("twin_reason"))
    run(
        "carp_policy.train",
        "--config",
        "visual",
        "--dataset",
        str(data),
        "--out",
        str(run_dir),
        "--tokenizer-steps",
        "3",
        "--policy-steps",
        "3",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--set",
        "transformer.depth=1",
        "--set",
        "encoder.resnet_width=8",
    )
    assert (run_dir / "policy.safetensors").exists()
    # a short trial: the run only proves the recorded data flows through evaluation
    import yaml

    from carp_sim.tasks import CONFIG_DIR

    task = yaml.safe_load((CONFIG_DIR / "cup.yaml").read_text())
    (tmp_path / "cup_short.yaml").write_text(yaml.safe_dump({**task, "max_duration_s": 3.0}))
    ev = tmp_path / "eval"
    run(
        "carp_bringup.evaluate",
        "--task",
        str(tmp_path / "cup_short.yaml"),
        "--policy",
        str(run_dir),
        "--trials",
        "1",
        "--videos",
        "0",
        "--out",
        str(ev),
    )
    assert list(ev.glob("*.json")), sorted(p.name for p in ev.iterdir())
    json.loads(next(ev.glob("*.json")).read_text())

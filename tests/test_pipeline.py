"""Cross-package tests: the evaluation protocol, and collect -> train -> export -> evaluate end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carp_bringup.evaluate import wilson_interval

BIN = Path(sys.executable).parent
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(18, 20)
    assert lo == pytest.approx(0.6990, abs=1e-3) and hi == pytest.approx(0.9721, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_carp_eval_expert_writes_results_and_summary(tmp_path: Path):
    out = tmp_path / "eval"
    cmd = [str(BIN / "carp-eval"), "--task", "cup", "--policy", "expert", "--trials", "2", "--videos", "1"]
    res = subprocess.run([*cmd, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["trials"] == 2 and summary["successes"] == 2
    assert [t["seed"] for t in summary["per_trial"]] == [10_000, 10_001]
    assert summary["latency_ms"]["count"] > 0 and summary["latency_ms"]["p50"] > 0
    assert (out / "summary.png").stat().st_size > 10_000
    assert len(list(out.glob("rollout_00_*.mp4"))) == 1
    assert "2/2 succeeded" in res.stdout


def test_carp_eval_reports_a_missing_policy_clearly(tmp_path: Path):
    res = subprocess.run(
        [str(BIN / "carp-eval"), "--policy", str(tmp_path / "nope"), "--trials", "1", "--out", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "no policy at" in res.stderr


def _run(*args: str, timeout: int = 600) -> str:
    cmd = [str(BIN / args[0]), *args[1:]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three expert demonstrations of the cup task, collected by the real command."""
    data = tmp_path_factory.mktemp("pipeline") / "data"
    _run("carp-sim", "collect", "--task", "cup", "--episodes", "3", "--out", str(data))
    assert "OK" in _run("carp-dataset", "validate", str(data))
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, family",
    [("state_env", "carp"), ("diffusion_state_env", "diffusion"), ("coa_state_env", "coa")],
)
def test_collect_train_export_evaluate_end_to_end(demos: Path, tmp_path: Path, config: str, family: str):
    """The whole pipeline through its command-line tools on a tiny budget (plumbing, not skill), for
    CARP, Chain-of-Action and the DP-C baseline on robot + environment state, evaluated through
    their ONNX graphs."""
    run_dir, model, out = tmp_path / "run", tmp_path / "model", tmp_path / "eval"
    # the published 67M-parameter DP-C U-Net is too slow for a 2-core CI: shrink it with --set
    shrink = ["--set", "unet.down_dims=[32, 64, 128]", "--set", "unet.step_embed_dim=32"]
    _run(
        "carp-train", "--config", config, "--dataset", str(demos), "--out", str(run_dir),
        "--tokenizer-steps", "30", "--policy-steps", "10", "--batch-size", "16", "--device", "cpu",
        *(shrink if family == "diffusion" else []),
    )  # fmt: skip
    if family == "diffusion":
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["unet"]["down_dims"] == [32, 64, 128]
    if family == "coa":  # one stage, trained on the 32-step windows to each keyframe
        assert not (run_dir / "tokenizer.safetensors").exists()
        assert "chain_len" in (run_dir / "loss_policy.csv").read_text().splitlines()[0]
    _run("carp-export", "--run", str(run_dir), "--out", str(model))
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["parity"]["passed"]
    assert manifest["observation"]["env_state_dim"] == 8
    _run("carp-eval", "--policy", str(model), "--trials", "1", "--videos", "0", "--out", str(out))
    summary = json.loads((out / "results.json").read_text())
    assert summary["trials"] == 1 and summary["latency_ms"]["count"] >= 1
    trial = summary["per_trial"][0]
    # every plan either ran or was refused by the driver's safety checks with a reason (a policy
    # trained for 10 steps may well propose a first step far from the arm)
    assert trial["plans"] > 0 and (trial["steps"] > 0 or sum(trial["refusals"].values()) >= trial["plans"])
    # the CARP config's shift ensemble travels in the manifest and runs in carp-eval (3 x 3 copies)
    want = {"grid": 3, "radius": 0.02} if family == "carp" else {"grid": 1, "radius": 0.0}
    assert manifest["config"]["ensemble"] == want and summary["ensemble"] == want
    if family == "carp":  # the command line overrides it: off, or refused beyond the trained shifts
        _run("carp-eval", "--policy", str(model), "--trials", "1", "--videos", "0", "--out", str(out),
             "--ensemble-grid", "1")  # fmt: skip
        assert json.loads((out / "results.json").read_text())["ensemble"] == {"grid": 1, "radius": 0.0}
        cmd = [str(BIN / "carp-eval"), "--policy", str(model), "--out", str(out), "--ensemble-grid", "3",
               "--ensemble-radius", "0.05"]  # fmt: skip
        res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "exceeds train.shift_augment" in res.stderr

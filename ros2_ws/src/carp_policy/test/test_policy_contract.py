"""What a node relies on: re-entrant policies, the contract in the manifest, the manifest's
format version and its migration, finding released models, and carp-eval refusing another task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from carp_policy import load_policy
from carp_policy.actions import Observation
from carp_policy.engine import ModelDirError, OnnxPolicy
from carp_policy.manifest import FORMAT_VERSION, load_manifest, sha256, upgrade
from carp_policy.normalization import Normalizer
from carp_policy.policies.base import EnsembleConfig
from carp_policy.policies.carp.configuration_carp import CarpConfig
from carp_policy.policies.carp.modeling_carp import CarpPolicy

ROOT = Path(__file__).resolve().parents[4]
MODELS = ROOT / "models"
LO = np.array([0.2, -0.4, 0.0, -1, -1, -1, -1, -1, -1, 0.0])
HI = np.array([0.7, 0.4, 0.5, 1, 1, 1, 1, 1, 1, 0.085])


def _observations(policy, n: int, seed: int) -> list[Observation]:
    nz, rng = policy.normalizer, np.random.default_rng(seed)
    S = 10
    out = []
    for _ in range(n):
        full = nz.state_min + (nz.state_max - nz.state_min) * rng.uniform(
            0.1, 0.9, (policy.obs_horizon, len(nz.state_min))
        )
        out.append(Observation(state=full[:, :S], env_state=full[:, S:] if full.shape[1] > S else None))
    return out


def _two_threads(policy, observations: list[Observation], rounds: int = 15) -> list[list[np.ndarray]]:
    """Two threads, each predicting its own observations over and over, started together."""
    barrier, results = threading.Barrier(2), [[], []]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                results[k].append(policy.predict(observations[(2 * r + k) % len(observations)]).actions)
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def _check_reentrant(policy, observations: list[Observation], rounds: int = 15) -> None:
    serial = [policy.predict(o).actions for o in observations]
    got = _two_threads(policy, observations, rounds)
    for k in (0, 1):
        for r, a in enumerate(got[k]):
            np.testing.assert_array_equal(a, serial[(2 * r + k) % len(observations)])


@pytest.mark.skipif(not (MODELS / "bowl" / "manifest.json").exists(), reason="no released models")
def test_engine_and_shift_ensemble_are_reentrant():
    """Two threads predicting different observations on one engine (and its shift ensemble) get
    exactly the chunks each observation gives alone."""
    shipped = load_policy(MODELS / "bowl", device="cpu")  # the shift ensemble over a batch-9 engine
    obs = _observations(shipped.policy, 3, seed=3)
    _check_reentrant(shipped, obs, rounds=2)
    _check_reentrant(shipped.policy, obs, rounds=6)


def test_torch_policy_is_reentrant():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = CarpConfig.from_dict(
        {
            "tokenizer": {"codebook_size": 32, "hidden": 8},
            "transformer": {"depth": 2, "width": 32, "heads": 2},
        }
    )
    policy = CarpPolicy(cfg, None, Normalizer(LO, HI, LO, HI))
    with torch.no_grad():  # adaLN gates start at zero: wake them so observations give different chunks
        for p in policy.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    obs = _observations(policy, 4, seed=5)
    assert not np.allclose(policy.predict(obs[0]).actions, policy.predict(obs[1]).actions)
    _check_reentrant(policy, obs)


@pytest.mark.skipif(not (MODELS / "cup" / "manifest.json").exists(), reason="no released models")
@pytest.mark.parametrize("name, task", [("cup", "cup"), ("bowl", "bowl"), ("cup_visual", "cup")])
def test_released_manifests_carry_the_contract(name, task):
    m = load_manifest(MODELS / name)
    assert m["format_version"] == FORMAT_VERSION and m["config"]["task"] == task
    c = m["contract"]
    assert c["task"] == task and c["dt"] == 0.1 and c["horizon"] == 16 and c["execute_steps"] == 8
    assert c["state_names"][:3] == ["x", "y", "z"] and c["obs_horizon"] == m["observation"]["obs_horizon"]
    want_cams = {"wrist": [120, 160], "scene": [120, 160]} if name == "cup_visual" else {}
    assert c["cameras"] == want_cams


@pytest.mark.skipif(not (MODELS / "cup" / "manifest.json").exists(), reason="no released models")
def test_format_version_1_is_refused_and_upgraded_in_place(tmp_path):
    d = tmp_path / "cup"
    shutil.copytree(MODELS / "cup", d, ignore=shutil.ignore_patterns("eval", "training"))
    m = json.loads((d / "manifest.json").read_text())
    v1 = {k: v for k, v in m.items() if k not in ("contract", "upgraded_from")}
    v1["format_version"], v1["config"] = 1, {k: v for k, v in m["config"].items() if k != "task"}
    (d / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(ModelDirError, match=r"format_version 1 .*python -m carp_policy.manifest upgrade"):
        OnnxPolicy(d)
    with pytest.raises(ValueError, match="needs --task"):
        upgrade(d, "")
    up = upgrade(d, "cup")
    assert up["contract"] == m["contract"] and up["format_version"] == FORMAT_VERSION
    assert all(g["sha256"] == sha256(d / g["file"]) for g in up["graphs"])  # graphs untouched
    with pytest.raises(ModelDirError, match="upgrade reads 1"):
        upgrade(d, "cup")


@pytest.mark.skipif(not (MODELS / "cup" / "manifest.json").exists(), reason="no released models")
def test_released_models_found_by_name_through_the_env_var(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here: only CARP_MODELS_DIR can find it
    monkeypatch.delenv("CARP_MODELS_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="CARP_MODELS_DIR"):
        load_policy("cup", ensemble=EnsembleConfig())
    monkeypatch.setenv("CARP_MODELS_DIR", str(MODELS))
    policy = load_policy("cup", ensemble=EnsembleConfig())
    assert policy.contract["task"] == "cup"


@pytest.mark.skipif(not (MODELS / "cup" / "manifest.json").exists(), reason="no released models")
def test_carp_eval_refuses_a_model_for_another_task(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "carp_bringup.evaluate", "--task", "bowl", "--policy", str(MODELS / "cup")]
    r = subprocess.run(
        [*cmd, "--trials", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"carp-eval: error: {MODELS / 'cup'} is a model for task 'cup', not 'bowl' (use --task cup)"
    ]
    assert not (tmp_path / "results.json").exists()
    # a variant of the cup task (cup_beyond: other layouts) is the cup task: the model loads for it
    from carp_bringup.evaluate import EvalConfig, load_policy

    assert load_policy(str(MODELS / "cup"), cfg=EvalConfig(task="cup_beyond")).contract["task"] == "cup"
    with pytest.raises(ValueError, match="is a model for task 'cup', not 'bowl'"):
        load_policy(str(MODELS / "cup"), cfg=EvalConfig(task="bowl_beyond"))


@pytest.mark.skipif(not (MODELS / "cup" / "manifest.json").exists(), reason="no released models")
def test_the_engine_path_needs_no_torch():
    """The robot PC runs exported models with numpy + onnxruntime: loading one and predicting must
    not import torch (or diffusers)."""
    code = (
        "import sys; from carp_policy import load_policy; import numpy as np; "
        f"p = load_policy({str(MODELS / 'cup')!r}); "
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"

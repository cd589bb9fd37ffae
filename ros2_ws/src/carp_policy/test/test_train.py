"""carp-train end to end in real subprocesses: both stages, artefacts, resume, loading, clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from carp_policy.actions import Observation
from carp_policy.policies.carp.configuration_carp import CarpConfig
from carp_policy.policies.carp.modeling_carp import CarpPolicy

TINY = {
    "tokenizer": {"hidden": 8, "revive_every": 10},
    "transformer": {"depth": 2, "width": 32, "heads": 2},
    "train": {
        "batch_size": 16,
        "checkpoint_every": 10,
        "log_every": 5,
        "warmup_steps": 5,
        "val_batches": 2,
        "val_fraction": 0.25,
    },
}


def _config(tmp_path: Path, kind: str) -> Path:
    d = CarpConfig.load(kind).to_dict()
    for section, values in TINY.items():
        d[section].update(values)
    d["encoder"].update({"hidden": 32, "out_dim": 32})
    if kind == "visual":
        d["encoder"].update({"resnet_width": 8, "keypoints": 4})
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "carp_policy.train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_state_run_end_to_end_with_resume(tmp_path):
    run = tmp_path / "run"
    cfg = _config(tmp_path, "state")
    r = _train(
        "--config",
        str(cfg),
        "--dataset",
        "synthetic:4",
        "--out",
        str(run),
        "--tokenizer-steps",
        "20",
        "--policy-steps",
        "10",
        "--seed",
        "3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "config.yaml",
        "normalization.json",
        "tokenizer.safetensors",
        "policy.safetensors",
        "train_state_tokenizer.pt",
        "train_state_policy.pt",
        "loss_tokenizer.csv",
        "loss_policy.csv",
        "loss_curves.png",
        "tokenizer_report.json",
        "policy_report.json",
    ):
        assert (run / name).exists(), name
    assert "codebook used per dim" in r.stdout and "validation (EMA)" in r.stdout
    tok = json.loads((run / "tokenizer_report.json").read_text())
    assert len(tok["codebook"]["used_codes"]) == 10 and tok["reconstruction"]["position_mm"]["mean"] > 0
    assert set(tok["reconstruction"]["per_dim"]) >= {"x_mm", "y_mm", "z_mm", "gripper_mm", "r6d_0"}
    pol = json.loads((run / "policy_report.json").read_text())
    assert np.isfinite(pol["validation"]["position_mm"]["mean"])
    assert CarpConfig.load(run / "config.yaml").train.seed == 3
    assert [int(float(x["step"])) for x in _rows(run / "loss_policy.csv")] == [0, 5, 9]

    # resume the policy stage for 10 more steps: the log continues, it does not restart
    r = _train(
        "--config",
        str(cfg),
        "--dataset",
        "synthetic:4",
        "--out",
        str(run),
        "--stage",
        "policy",
        "--resume",
        "--policy-steps",
        "20",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(float(x["step"])) for x in _rows(run / "loss_policy.csv")] == [0, 5, 9, 10, 15, 19]

    # the run directory is a loadable policy
    policy = CarpPolicy.from_run(run)
    state = np.tile(np.r_[0.45, 0.0, 0.35, 1, 0, 0, 0, -1, 0, 0.085], (2, 1))
    chunk = policy.predict(Observation(state=state))
    assert chunk.actions.shape == (16, 10) and np.all(np.isfinite(chunk.actions))


@pytest.mark.slow
def test_relative_frame_run(tmp_path):
    """``--set frame=relative``: stats of the chunks as offsets from the TCP, the frame saved with
    them, and the run loads into a policy whose chunks are back in the base frame."""
    run = tmp_path / "run"
    cfg = _config(tmp_path, "state_env")
    args = ["--config", str(cfg), "--dataset", "synthetic:4", "--out", str(run), "--set", "frame=relative"]
    args += ["--set", "ensemble.grid=1"]  # a shift moves nothing in the relative frame (refused otherwise)
    r = _train(*args, "--tokenizer-steps", "10", "--policy-steps", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert CarpConfig.load(run / "config.yaml").frame == "relative"
    stats = json.loads((run / "normalization.json").read_text())
    assert stats["frame"] == "relative"
    lo, hi = np.array(stats["action"]["min"][:3]), np.array(stats["action"]["max"][:3])
    assert np.all(lo < 0) and np.all(hi > 0)  # offsets straddle the TCP; absolute x is 0.3..0.6 m
    s_lo, s_hi = np.array(stats["observation.state"]["min"]), np.array(stats["observation.state"]["max"])
    assert s_lo[0] > 0.2 and s_lo[10] < 0 < s_hi[10]  # TCP x absolute, object x as an offset from it
    policy = CarpPolicy.from_run(run)
    state = np.tile(np.r_[0.45, 0.0, 0.35, 1, 0, 0, 0, -1, 0, 0.085], (2, 1))
    env = np.tile([0.5, 0.05, 0.03, 0, 0, 1, 0.4, -0.1], (2, 1))
    chunk = policy.predict(Observation(state=state, env_state=env))
    assert chunk.actions.shape == (16, 10) and np.all(np.isfinite(chunk.actions))


@pytest.mark.slow
def test_visual_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = _train(
        "--config",
        str(_config(tmp_path, "visual")),
        "--dataset",
        "synthetic:3",
        "--out",
        str(run),
        "--tokenizer-steps",
        "10",
        "--policy-steps",
        "3",
        "--batch-size",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    policy = CarpPolicy.from_run(run)
    assert policy.cameras == ("wrist", "scene") and policy.obs_horizon == 1
    rng = np.random.default_rng(0)
    obs = Observation(
        state=np.r_[0.45, 0.0, 0.35, 1, 0, 0, 0, -1, 0, 0.085],
        images={c: rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for c in policy.cameras},
    )
    assert policy.predict(obs).actions.shape == (16, 10)


@pytest.mark.slow
def test_clear_errors(tmp_path):
    cfg = _config(tmp_path, "state")
    r = _train("--config", str(cfg), "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    # a user's mistake: exit 2 and its last stderr line says what is wrong (carp_policy.cli), no traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("carp-train: error: dataset directory not found")
    r = _train("--config", "nope_config", "--dataset", "synthetic:3", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "carp-train: error: config not found: nope_config" in r.stderr
    r = _train(
        "--config", str(cfg), "--dataset", "synthetic:3", "--out", str(tmp_path / "d"), "--set", "unet.x=1"
    )
    assert r.returncode == 2 and "unknown config key(s) in CarpConfig: ['unet']" in r.stderr
    r = _train(
        "--config", str(cfg), "--dataset", "synthetic:3", "--out", str(tmp_path / "b"), "--stage", "policy"
    )
    assert r.returncode == 2 and "run --stage tokenizer first" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"transformer": {"depht": 4}}))
    with pytest.raises(ValueError, match="depht"):
        CarpConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="finished carp-train run"):
        CarpPolicy.from_run(tmp_path)


def test_translation_augmentation_moves_the_whole_scene():
    """``train.shift_augment``: one x, y offset per window moves the TCP, the object, the target and
    the chunk together (z, rotations, up axis and gripper untouched); without ``augment`` nothing moves."""
    import torch

    from carp_policy.normalization import Normalizer
    from carp_policy.train import BatchNormalizer

    names = ["x", "y", "z", *(f"r6d_{i}" for i in range(6)), "gripper", "object_x", "object_y", "object_z",
             "object_up_x", "object_up_y", "object_up_z", "target_x", "target_y"]  # fmt: skip
    lo, hi = -np.ones(18), np.ones(18)  # scale 1, offset 0: normalised values are physical ones
    for frame in ("absolute", "relative"):
        norm = BatchNormalizer(
            Normalizer(lo, hi, lo[:10], hi[:10], names, frame=frame), torch.device("cpu"), 0.03
        )
        torch.manual_seed(0)
        batch = {"state": torch.rand(64, 2, 18), "action": torch.rand(64, 16, 10), "images": {}}
        recorded = {k: batch[k].clone() for k in ("state", "action")}
        plain_obs, plain_act = norm(batch)
        obs, act = norm(batch, augment=True)
        ds, da = obs["state"] - plain_obs["state"], act - plain_act
        if frame == "absolute":
            shift = da[:, 0, :2]  # (B, 2)
            assert shift.abs().max() <= 0.03 + 1e-6 and shift.abs().max() > 0.02 and shift.std() > 0.01
            torch.testing.assert_close(da[..., :2], shift[:, None].expand(-1, 16, -1))
            for d in (0, 10, 16):  # x of TCP, object, target; y one further
                torch.testing.assert_close(ds[..., d : d + 2], shift[:, None].expand(-1, 2, -1))
            moved = [0, 1, 10, 11, 16, 17]
        else:  # offsets from the TCP do not move; only the TCP's own position does
            assert da.abs().max() < 1e-6
            moved = [0, 1]
        still = [i for i in range(18) if i not in moved]
        assert ds[..., still].abs().max() < 1e-6 and da[..., 2:].abs().max() < 1e-6
        assert ds[..., moved].abs().max() > 0.02
        assert all(torch.equal(batch[k], recorded[k]) for k in recorded)  # the batch itself is not changed


def test_shift_augment_is_refused_where_it_would_be_wrong():
    from carp_policy.train import load_config

    assert load_config("state_env").train.shift_augment == 0.03  # the released models' setting
    for name in ("visual", "diffusion_visual"):  # images do not move with a shifted state
        with pytest.raises(ValueError, match="needs a state encoder"):
            load_config(name, ["train.shift_augment=0.02"])
    with pytest.raises(ValueError, match=">= 0"):
        load_config("state_env", ["train.shift_augment=-0.01"])


def test_shift_ensemble_config_is_checked_against_the_training():
    from carp_policy.policies.base import EnsembleConfig
    from carp_policy.train import load_config

    ens = load_config("state_env").ensemble  # the released models' setting
    assert (ens.grid, ens.radius) == (3, 0.02)
    offsets = np.array(ens.offsets())
    assert offsets.shape == (9, 2) and [0.0, 0.0] in offsets.tolist()
    np.testing.assert_allclose(offsets.mean(0), 0.0, atol=1e-12)  # symmetric: no net shift
    assert np.abs(offsets).max() == pytest.approx(0.02)
    assert EnsembleConfig().offsets() == [(0.0, 0.0)]  # off: one inference, unshifted
    with pytest.raises(ValueError, match=r"exceeds train\.shift_augment"):
        load_config("state_env", ["ensemble.radius=0.04"])
    with pytest.raises(ValueError, match=r"exceeds train\.shift_augment"):  # trained without shifts
        load_config("state", ["ensemble.grid=3", "ensemble.radius=0.01"])
    with pytest.raises(ValueError, match="frame: absolute"):
        load_config("state_env", ["frame=relative"])
    with pytest.raises(ValueError, match="radius > 0"):
        load_config("state_env", ["ensemble.radius=0.0"])


def test_shift_ensemble_undoes_the_shift_for_an_equivariant_policy():
    """A policy that depends on where things are relative to each other (here: reach the object,
    then carry to the target, at a distance-dependent pace) answers every shifted copy with the
    shifted chunk, so the ensemble returns its chunk unchanged. Checks the sign of each shift and
    that TCP, object and target all move; z, rotations and the gripper pass through."""
    from carp_policy.actions import ActionChunk, matrix_to_rot6d
    from carp_policy.normalization import Normalizer
    from carp_policy.policies.base import EnsembleConfig
    from carp_policy.policies.ensemble import ShiftEnsemble

    names = ["x", "y", "z", *(f"r6d_{i}" for i in range(6)), "gripper", "object_x", "object_y", "object_z",
             "object_up_x", "object_up_y", "object_up_z", "target_x", "target_y"]  # fmt: skip

    class ReachThenCarry:
        obs_horizon, obs_stride, cameras = 2, 1, ()
        normalizer = Normalizer(-np.ones(18), np.ones(18), -np.ones(10), np.ones(10), names)

        def reset(self) -> None:
            pass

        def predict(self, obs: Observation) -> ActionChunk:
            tcp, env = obs.state[-1], obs.env_state[-1]
            obj, target = env[0:2], env[6:8]
            pace = np.tanh(np.linalg.norm(obj - tcp[:2]) * 5)  # a nonlinear function of an offset
            s = np.linspace(0, 1, 16)[:, None] ** (1 + pace)
            xy = np.where(s < 0.5, tcp[:2] + 2 * s * (obj - tcp[:2]), obj + (2 * s - 1) * (target - obj))
            out = np.tile(tcp, (16, 1))
            out[:, :2] = xy
            out[:, 2] = tcp[2] - 0.1 * s[:, 0] + env[2]
            return ActionChunk(out, timestamp=obs.timestamp)

    rot = matrix_to_rot6d(np.diag([1.0, -1.0, -1.0]))
    tcp = np.r_[-0.45, 0.1, 0.3, rot, 0.08]
    env = np.r_[-0.5, -0.05, 0.0, 0.0, 0.0, 1.0, -0.4, 0.2]
    obs = Observation(state=np.stack([tcp, tcp]), env_state=np.stack([env, env]), timestamp=1.5)
    base = ReachThenCarry()
    ens = ShiftEnsemble(base, EnsembleConfig(grid=3, radius=0.02))
    want, got = base.predict(obs), ens.predict(obs)
    np.testing.assert_allclose(got.actions, want.actions, atol=1e-12)
    assert got.timestamp == 1.5
    # a policy that reads the object's absolute position nonlinearly is not equivariant: the
    # ensemble then returns the average over the grid, here exactly 10 * mean(d**2) further out
    absolute = ReachThenCarry()
    absolute.predict = (
        lambda o: ActionChunk(  # type: ignore[method-assign]
            np.tile(np.r_[o.state[-1, :2] + 10 * o.env_state[-1, :2] ** 2, o.state[-1, 2:]], (16, 1))
        )
    )
    averaged = ShiftEnsemble(absolute, EnsembleConfig(grid=3, radius=0.02)).predict(obs).actions
    np.testing.assert_allclose(averaged[:, :2] - absolute.predict(obs).actions[:, :2], 10 * 0.02**2 * 2 / 3)
    with pytest.raises(ValueError, match="state policy"):
        visual = ReachThenCarry()
        visual.cameras = ("wrist",)
        ShiftEnsemble(visual, EnsembleConfig(grid=3, radius=0.02))


def _state_dataset(root: Path, episodes: int, object_x: float, seed: int) -> None:
    """A small real dataset (LeRobot layout, no cameras): a TCP moving towards an object at
    ``object_x``, with the twin's 8-number environment state."""
    from carp_policy.actions import ACTION_NAMES
    from carp_policy.dataset import DatasetWriter

    rng = np.random.default_rng(seed)
    env_names = [f"env_{i}" for i in range(8)]
    with DatasetWriter(root, fps=10.0, cameras={}, env_state_names=env_names) as w:
        for _ in range(episodes):
            w.begin_episode(task="reach")
            obj = np.r_[object_x + rng.uniform(-0.03, 0.03), rng.uniform(-0.1, 0.1), 0.03, 0, 0, 1, 0.5, 0.1]
            for t in range(20):
                a = t / 19
                xyz = [(1 - a) * 0.45 + a * obj[0], a * obj[1], 0.35 - 0.2 * a]
                pose = np.r_[xyz, 1, 0, 0, 0, -1, 0, 0.085]
                w.add_frame(0.1 * t, {}, pose, pose[: len(ACTION_NAMES)], env_state=obj)
            w.save_episode(success=True)


@pytest.mark.slow
def test_multi_task_run_from_one_dataset_per_task(tmp_path):
    """``--dataset cup=DIR --dataset bowl=DIR``: one model with a task embedding per dataset; the run
    records the tasks, holds out episodes of each, resumes, and its policy needs a task."""
    _state_dataset(tmp_path / "cup", 4, 0.55, seed=1)
    _state_dataset(tmp_path / "bowl", 4, 0.35, seed=2)
    run, cfg = tmp_path / "run", _config(tmp_path, "state_env")
    data = ["--dataset", f"cup={tmp_path / 'cup'}", "--dataset", f"bowl={tmp_path / 'bowl'}"]
    steps = ["--tokenizer-steps", "10", "--policy-steps", "5"]
    r = _train("--config", str(cfg), *data, "--out", str(run), *steps)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = CarpConfig.load(run / "config.yaml")
    assert list(saved.encoder.tasks) == ["cup", "bowl"] and saved.task == ""
    r = _train("--config", str(cfg), *data, "--out", str(run), "--stage", "policy", "--resume",
               "--policy-steps", "8")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(float(x["step"])) for x in _rows(run / "loss_policy.csv")][-1] == 7
    policy = CarpPolicy.from_run(run)
    assert policy.contract["tasks"] == ["cup", "bowl"]
    state = np.tile(np.r_[0.45, 0.0, 0.35, 1, 0, 0, 0, -1, 0, 0.085], (2, 1))
    env = np.tile([0.5, 0.05, 0.03, 0, 0, 1, 0.5, 0.1], (2, 1))
    obs = Observation(state=state, env_state=env)
    with pytest.raises(ValueError, match=r"multi-task model \(cup, bowl\): select the task"):
        policy.predict(obs)
    policy.select_task("bowl")
    assert np.all(np.isfinite(policy.predict(obs).actions))
    with pytest.raises(ValueError, match="trained for the tasks \\['cup', 'bowl'\\], not 'pour'"):
        policy.select_task("pour")
    # a mistake: two datasets without their task names, and a resumed run given other tasks
    r = _train("--config", str(cfg), "--dataset", str(tmp_path / "cup"), "--dataset", str(tmp_path / "bowl"),
               "--out", str(tmp_path / "x"))  # fmt: skip
    assert r.returncode == 2 and "needs TASK=DIR for each" in r.stderr
    r = _train("--config", str(cfg), "--dataset", f"cup={tmp_path / 'cup'}", "--out", str(run), "--resume")
    assert r.returncode == 2 and "do not match the datasets' ['cup']" in r.stderr

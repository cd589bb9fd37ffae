"""``carp-record`` on the cell: the UR5e through the scripted fake of ur_rtde, the 2F-85 through a
URCap server on loopback, two RealSense cameras through the fake pyrealsense2 pipeline, the
operator's SpaceMouse as a scripted input stream. Everything between them is the code a lab runs:
the driver core and its limits, DriverArm, the teleop core, the recorder and the dataset writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from carp_hardware import fake_rtde
from carp_hardware.cameras.fakes import FakeDevice, FakeRealSense
from carp_hardware.fake_robotiq import FakeURCapServer
from carp_hardware.fake_rtde import FakeUR
from carp_policy.cli import UserError
from carp_policy.dataset import EpisodeDataset, validate_dataset
from carp_teleop.inputs import ScriptedInput
from carp_teleop.record import build_parser, load_config, record_cell

IDLE = ([0.0] * 6, (0, 0))
CLICK_RECORD = [([0.0] * 6, (0, 1)), IDLE]
HOST = "127.0.0.1"  # the fake controller's name and the URCap server's address


def _cameras_yaml(tmp: Path) -> Path:
    p = tmp / "cameras.yaml"
    serials = {"wrist": "111", "scene": "222"}
    spec = {c: {"kind": "realsense", "realsense": {"serial": s}} for c, s in serials.items()}
    p.write_text(yaml.safe_dump(spec))
    return p


def _args(tmp: Path, out: Path, *more: str):
    base = ["--task", "cup", "--out", str(out), "--operator", "alice", "--cameras", str(_cameras_yaml(tmp))]
    return build_parser().parse_args([*base, *more])


def _fakes() -> dict:
    rs = FakeRealSense([FakeDevice("111"), FakeDevice("222")])
    return {"rtde_factories": fake_rtde.FACTORIES, "camera_kw": {"wrist": {"rs": rs}, "scene": {"rs": rs}}}


def test_carp_record_on_the_cell_records_a_demonstration_through_the_driver(tmp_path: Path, capsys) -> None:
    ur = FakeUR.create(HOST, realtime=True, frequency=125.0)
    out = tmp_path / "cup"
    out.mkdir()
    # up (z) and along +y for 1.2 s, then the gripper button, then save
    move = [([0.0, 0.5, 0.5, 0.0, 0.0, 0.0], (0, 0))] * 12 + [([0.0] * 6, (1, 0)), IDLE] + [IDLE] * 4
    steps = [IDLE, *CLICK_RECORD, *move, *CLICK_RECORD, IDLE]
    with FakeURCapServer() as grip:
        loose = ["--set", "max_frame_age=0.4", "--set", "max_skew=0.4"]  # CI's CPU is shared
        args = _args(tmp_path, out, "--robot-ip", HOST, "--gripper-port", str(grip.port), "--episodes", "1",
                     "--duration", "20", *loose)  # fmt: skip
        summary = record_cell(args, load_config(args), source=ScriptedInput(steps), **_fakes())
    said = capsys.readouterr().out
    assert summary["saved"] == [0], said
    assert "refused" not in said, said  # every operator target passed the driver's limits
    assert validate_dataset(out).ok
    ep = EpisodeDataset(out).episode(0)
    assert ep.state.shape[1] == 10 and ep.images["wrist"].shape[1:] == (120, 160, 3)  # fitted 480x640
    meta = ep.metadata
    assert meta["sim"] is False and meta["operator"] == "alice" and meta["robot_serial"] == ur.serial
    assert meta["camera_serials"] == {"wrist": "111", "scene": "222"}
    # the operator moved the arm up and along y, measured by the controller (the recorded state)
    d = ep.state[-1, :3] - ep.state[0, :3]
    assert d[1] > 0.03 and d[2] > 0.03, d
    assert ep.action[-1, 9] < 0.085  # and closed the gripper
    assert np.isfinite(ep.state).all()
    names = [c[0] for c in ur.calls]
    assert "servoJ" in names and "getInverseKinematics" in names  # the controller's IK, streamed
    assert "servoStop" in names[names.index("servoJ") :]  # and the arm stopped at the end


def test_carp_record_on_the_cell_says_why_it_cannot_open_the_robot(tmp_path: Path) -> None:
    args = _args(tmp_path, tmp_path / "x", "--robot-ip", "fake-ur5e-absent")
    with pytest.raises(UserError, match="cannot open the cell at fake-ur5e-absent"):
        record_cell(args, load_config(args), source=ScriptedInput([IDLE]), **_fakes())

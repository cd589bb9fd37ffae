"""``carp-eval --cell robot``: the twin's trial protocol on a cell, with an operator.

Three ways in, each through the code a lab runs (``RobotCell`` under ``evaluate.run_trial``):
- the robot path over the scripted fake of ur_rtde, a URCap server on loopback and two fake
  RealSense pipelines, with the console operator reading its answers from a stream;
- the twin standing in for the whole cell (``--cell live-twin``): the twin's hardware at wall-clock
  pace, and the twin as the operator who resets the scene and judges;
- the refusals: a twin-only model, the scripted expert, an operator who leaves.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import av
import pytest
import yaml

from carp_bringup.evaluate import EvalConfig, main
from carp_bringup.robot_eval import ConsoleOperator, evaluate_on_cell
from carp_hardware import fake_rtde
from carp_hardware.cameras.fakes import FakeDevice, FakeRealSense
from carp_hardware.fake_robotiq import FakeURCapServer
from carp_policy.factory import resolve_model

VISUAL = "cup_visual"  # the released camera model: what a cell can run


def _short_cup(tmp: Path, seconds: float) -> str:
    """The cup task with a short timeout (the protocol is under test, not the policy)."""
    p = tmp / "cup_short.yaml"
    p.write_text(yaml.safe_dump({"variant_of": "cup", "max_duration_s": seconds}))
    return str(p)


def _video_width(path: Path) -> int:
    with av.open(str(path)) as c:
        return c.streams.video[0].width


def test_the_robot_protocol_over_the_fake_controller_with_a_console_operator(tmp_path: Path) -> None:
    cams = tmp_path / "cameras.yaml"
    cams.write_text(yaml.safe_dump({c: {"kind": "realsense", "realsense": {"serial": s}}
                                    for c, s in (("wrist", "111"), ("scene", "222"))}))  # fmt: skip
    rs = FakeRealSense([FakeDevice("111"), FakeDevice("222")])
    said = io.StringIO()
    # Enter: the scene is ready; then "x" (not an answer: asked again), "n", an out-of-range number
    # (asked again) and reason 2 of the cup's list
    operator = ConsoleOperator("cup", stdin=io.StringIO("\nx\nn\n9\n2\n"), out=said)
    cfg = EvalConfig(task=_short_cup(tmp_path, 2.0), trials=1, seed=10000, videos=1)
    with FakeURCapServer() as grip:
        # the servo loop in its own process, over a fake controller made there, as on the robot
        build = functools.partial(fake_rtde.fake_driver, "fake-ur5e-eval", 125.0, True, grip.port)
        summary = evaluate_on_cell(
            cfg, VISUAL, tmp_path / "eval", "robot", robot_ip="fake-ur5e-eval", cameras=str(cams),
            operator=operator, camera_kw={"wrist": {"rs": rs}, "scene": {"rs": rs}}, build=build,
        )  # fmt: skip
        received = list(grip.received)
    text = said.getvalue()
    assert "trial 1/1: reset the scene" in text and "suggested layout (seed 10000" in text, text
    assert text.count("success? [y/n]") == 2 and text.count("reason (1 missed the grasp") == 2, text
    assert summary["cell"] == "robot" and summary["robot_serial"] == "20235500000"  # the dashboard's
    assert summary["camera_serials"] == {"wrist": "111", "scene": "222"}
    (trial,) = summary["per_trial"]
    assert trial["seed"] == 10000 and not trial["success"] and trial["reason"] == "cup tipped"
    assert trial["plans"] >= 2 and 1.9 < trial["duration_s"] < 3.5  # ran to the (short) timeout
    assert trial["steps"] > 0  # chunks were accepted and executed by the servo process
    out = tmp_path / "eval"
    assert json.loads((out / "results.json").read_text())["trials"] == 1
    assert (out / "summary.png").stat().st_size > 0
    assert len((out / "trials.jsonl").read_text().splitlines()) == 1
    (video,) = out.glob("rollout_00_seed10000_fail.mp4")
    assert _video_width(video) == 2 * cfg.video_size[1]  # both cameras, side by side
    drv = summary["driver"]
    assert drv["state"] == "idle" and drv["servo_period_ms"]["p50"] is not None  # stopped at the end
    first = next(r for r in received if r.startswith("SET POS"))
    assert first.startswith("SET POS 0 ")  # the gripper fully open before the trial


def test_the_twin_standing_in_for_the_cell_and_the_operator_with_resume(tmp_path: Path) -> None:
    task, out = _short_cup(tmp_path, 3.0), tmp_path / "live"
    base = ["--cell", "live-twin", "--task", task, "--policy", VISUAL, "--seed", "10000", "--out", str(out)]
    assert main([*base, "--trials", "1", "--videos", "1"]) == 0
    first = (out / "trials.jsonl").read_text().splitlines()
    assert len(first) == 1
    # an interrupted run goes on from where it stopped: only the second seed runs
    assert main([*base, "--trials", "2", "--videos", "0", "--resume"]) == 0
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and len(lines) == 2
    summary = json.loads((out / "results.json").read_text())
    assert summary["cell"] == "live-twin" and summary["trials"] == 2
    assert [t["seed"] for t in summary["per_trial"]] == [10000, 10001]
    for t in summary["per_trial"]:  # the twin's own verdicts, on the wall clock
        assert t["reason"] == "ok" or "timeout" in t["reason"] or "tipped" in t["reason"], t
        assert t["plans"] >= 2 and t["duration_s"] <= 3.6
    assert _video_width(next(out.glob("rollout_00_*.mp4"))) == 640


def test_a_twin_only_model_and_the_expert_are_refused_on_the_cell(tmp_path: Path, capsys) -> None:
    assert resolve_model("cup").exists()
    argv = ["--cell", "robot", "--policy", "cup", "--robot-ip", "fake-ur5e-absent", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "only the twin measures" in capsys.readouterr().err  # before any connection is tried
    with pytest.raises(SystemExit) as e:
        main(["--cell", "robot", "--policy", "expert", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--cell sim only" in capsys.readouterr().err


def test_the_console_operator_answers_and_leaving_ends_the_run() -> None:
    out = io.StringIO()
    op = ConsoleOperator("bowl", stdin=io.StringIO("yes\nn\n\nthe pot moved\nn\n5\n"), out=out)
    assert op.judge(1, "").success
    v = op.judge(2, "driver stopped: tcp_speed")  # an empty reason is asked again
    assert (v.success, v.reason) == (False, "the pot moved")
    assert op.judge(3, "").reason == "timeout"  # the bowl's 4 reasons, then the common ones
    assert "the driver reported: driver stopped: tcp_speed" in out.getvalue()
    assert not op.ended()  # a stream without a file descriptor never ends a trial
    from carp_bringup.robot_eval import CellError

    with pytest.raises(CellError, match="operator input closed"):
        op.judge(4, "")


class _Operator:
    """The person at the cell, scripted: the scene is always ready, every trial is a failure."""

    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []

    def reset_scene(self, trial, trials, seed, layout) -> None:
        self.said.append(("reset", str(seed)))

    def ended(self) -> bool:
        return False

    def judge(self, seed, note):
        from carp_bringup.robot_eval import Verdict

        self.said.append(("judge", note))
        return Verdict(False, "safety stop")

    def confirm(self, message) -> None:
        self.said.append(("confirm", message))


def test_a_protective_stop_ends_the_trial_and_the_next_starts_once_the_operator_cleared_it(tmp_path):
    import time

    from carp_bringup.robot_eval import RobotCell
    from carp_hardware.cameras import make_camera
    from carp_hardware.driver_process import rtde_driver
    from carp_hardware.fake_rtde import FakeUR
    from carp_policy import load_policy
    from carp_sim.tasks import TaskConfig
    from carp_teleop.cell import DriverArm

    ur = FakeUR.create("fake-ur5e-fault", realtime=True, frequency=125.0)
    driver = rtde_driver("fake-ur5e-fault", {"servo_hz": 125.0}, None, None, None, fake_rtde.FACTORIES)
    rs = FakeRealSense([FakeDevice("111"), FakeDevice("222")])
    cams = {c: make_camera(c, {"kind": "realsense", "realsense": {"serial": s}}, rs=rs)
            for c, s in (("wrist", "111"), ("scene", "222"))}  # fmt: skip
    arm, op = DriverArm(driver), _Operator()
    for cam in cams.values():
        cam.start()
    arm.start()
    try:
        contract = load_policy(VISUAL).contract
        cell = RobotCell(arm, cams, op, TaskConfig.load("cup"), contract, trials=2)
        cell.reset(10000)
        assert driver.status().state.name == "RUNNING" and not cell.done
        ur.protective_stop()  # mid-trial: the controller kills the script, the socket stays up
        deadline = time.monotonic() + 5
        while not cell.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cell.done  # the trial ends at once
        assert cell.outcome().reason == "safety stop"
        assert op.said[-1][0] == "judge" and op.said[-1][1].startswith("driver fault: protective_stop")
        n = len(ur.calls)
        cell.reset(10001)  # the operator is asked to clear it, then the driver recovers and homes
        kinds = [k for k, _ in op.said]
        assert kinds == ["reset", "judge", "confirm", "reset"] and "fault" in op.said[2][1]
        names = [c[0] for c in ur.calls[n:]]
        assert "unlockProtectiveStop" in names and "reuploadScript" in names
        assert names.index("moveJ") > names.index("reuploadScript")
        assert driver.status().state.name == "RUNNING" and not cell.done
    finally:
        arm.stop()
        for cam in cams.values():
            cam.stop()
        driver.arm.close()

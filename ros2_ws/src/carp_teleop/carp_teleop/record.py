"""``carp-record``: record demonstrations by SpaceMouse, on the robot or in the twin.

    carp-record --task cup --out data/cup --operator alice                 # the cell (cameras.yaml, driver)
    carp-record --task cup --out data/cup_sim --operator alice --sim       # the twin, SpaceMouse in hand
    carp-record --task cup --out data/cup_sim --operator bot --sim --input scripted --episodes 5

Record button (or space): start / save an episode; long press (or x): discard it; the gripper
button (or g) opens/closes the gripper. The dataset is LeRobot v3.0 with the same state/action
definitions as ``carp-sim collect``; ``carp-dataset validate DIR`` checks it and ``carp-train``
trains on it.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

from carp_policy.cli import UserError, run_main
from carp_policy.yaml_config import from_dict, set_override
from carp_teleop.recorder import Recorder, RecorderConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="carp-record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--task", default="cup", help="cup or bowl (the instruction stored with each episode)")
    ap.add_argument("--out", type=Path, required=True, help="dataset directory (created or appended to)")
    ap.add_argument("--operator", required=True, help="who records (stored with each episode)")
    ap.add_argument("--sim", action="store_true", help="record in the twin instead of on the robot")
    ap.add_argument(
        "--input",
        choices=["spacemouse", "keyboard", "scripted"],
        default="spacemouse",
        help="operator input; scripted: a SpaceMouse driven by the twin's expert (--sim)",
    )
    ap.add_argument(
        "--policy",
        help="DAgger: a policy (run dir, exported or released model) commands the arm; move the "
        "SpaceMouse to take over, let it rest to hand back; each frame is flagged policy or human",
    )
    ap.add_argument("--config", type=Path, help="recorder YAML (RecorderConfig fields)")
    ap.add_argument("--cameras", type=Path, help="cameras YAML (the cell; see carp_hardware.cameras)")
    ap.add_argument("--calibration", type=Path, help="calibration YAML whose id is recorded (calibration/)")
    ap.add_argument("--robot-ip", default="192.168.1.102", help="the UR controller (the cell; docs/robot.md)")
    ap.add_argument("--gripper-port", type=int, default=63352, help="the Robotiq URCap's socket port")
    ap.add_argument("--limits", type=Path, help="safety limits YAML (default: the shipped ur5e_limits.yaml)")
    ap.add_argument("--episodes", type=int, help="stop after saving this many episodes")
    ap.add_argument("--duration", type=float, help="stop after this many seconds")
    ap.add_argument("--seed", type=int, default=0, help="--sim: the first layout seed (one per episode)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a RecorderConfig field, e.g. --set teleop.max_speed=0.25",
    )
    return ap


def load_config(args) -> RecorderConfig:
    import yaml

    raw = {}
    if args.config:
        if not args.config.exists():
            raise FileNotFoundError(f"config file not found: {args.config}")
        raw = yaml.safe_load(args.config.read_text()) or {}
    for item in args.set:
        set_override(raw, item)
    cfg = from_dict(RecorderConfig, raw)
    cfg.teleop.rate_hz = cfg.fps
    if args.calibration:
        cal = yaml.safe_load(Path(args.calibration).read_text()) or {}
        if "id" not in cal:
            raise UserError(f"{args.calibration}: a calibration file must have an 'id'")
        cfg.calibration_id = str(cal["id"])
    return cfg


def _open_input(kind: str):
    from carp_teleop.inputs import KEYBOARD_HELP, KeyboardInput, SpaceMouseInput

    if kind == "keyboard":
        print(KEYBOARD_HELP)
        return KeyboardInput()
    try:
        return SpaceMouseInput()
    except RuntimeError as e:
        raise UserError(str(e)) from None


def _policy(args) -> tuple:
    """DAgger: the policy of ``--policy`` and the fact recorded with each episode (none: (None, {}))."""
    if not args.policy:
        return None, {}
    from carp_policy import load_policy

    return load_policy(args.policy, device="cpu"), {"policy": args.policy}


def make_writer(out: Path, cfg: RecorderConfig, env_state_names=None):
    """The dataset writer, the twin's and the cell's alike (the collector's state and action names;
    the twin also records its scene state)."""
    from carp_policy.actions import ACTION_NAMES, STATE_NAMES
    from carp_policy.dataset import DatasetWriter

    return DatasetWriter(
        out,
        fps=cfg.fps,
        cameras={c: tuple(cfg.image_size) for c in cfg.cameras},
        state_names=STATE_NAMES,
        action_names=ACTION_NAMES,
        robot_type="ur5e",
        env_state_names=env_state_names,
    )


def record_sim(args, cfg: RecorderConfig) -> dict:
    """The twin: SimCell behind TwinArm, threaded MuJoCo cameras, the same recorder."""
    from carp_hardware.cameras import SimCamera
    from carp_sim.cli import TASK_TEXT
    from carp_sim.env import ENV_STATE_NAMES, SimCell, SimConfig
    from carp_teleop.arm import TwinArm
    from carp_teleop.teleop import TeleopCore

    os.environ.setdefault("MUJOCO_GL", "egl")
    # On a CPU (Mesa llvmpipe) every render spawns rasteriser threads that fight the physics and
    # the other camera for the cores; one thread each renders a 120x160 frame faster under load.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    env = SimCell(args.task, SimConfig(render=False, control_hz=cfg.fps))
    lock = threading.Lock()
    arm = TwinArm(env, lock=lock)
    seed = [args.seed]
    arm.reset(seed[0])
    hid = operator = None
    if args.input == "scripted":
        from carp_teleop.hid_fake import fake_spacemouse
        from carp_teleop.inputs import SpaceMouseInput

        dev, hid, spec = fake_spacemouse()
        source = SpaceMouseInput(dev)
    else:
        source = _open_input(args.input)
    teleop = TeleopCore(arm, source, cfg.teleop)
    if hid is not None:
        from carp_teleop.scripted import ExpertOperator

        operator = ExpertOperator(env, lock, teleop, hid, spec)
        operator.reset(seed[0])
    policy, meta_policy = _policy(args)
    cams = {c: SimCamera(c, env.model, env.data, lock, size=tuple(cfg.image_size)) for c in cfg.cameras}
    writer = make_writer(args.out, cfg, ENV_STATE_NAMES)

    def next_scene() -> dict:
        seed[0] += 1
        arm.reset(seed[0])
        if operator is not None:
            operator.reset(seed[0])
        return {"seed": seed[0]}

    def outcome() -> dict:
        with lock:
            o = env.outcome()
        return {"twin_success": bool(o.success), "twin_reason": o.reason}

    meta = {
        "task": args.task,
        "operator": args.operator,
        "calibration_id": cfg.calibration_id or "twin",
        "robot_serial": arm.serial,
        "camera_serials": {c: "twin" for c in cams},
        "sim": True,
        "input": args.input,
        **meta_policy,
    }
    try:
        arm.start()
        for cam in cams.values():
            cam.start()
        rec = Recorder(
            cfg,
            arm,
            cams,
            teleop,
            writer,
            TASK_TEXT[env.task.name],
            args.out,
            meta,
            env_buffer=arm.env_buffer,
            scene_reset=next_scene,
            episode_facts=outcome,
            policy=policy,
        )
        rec.scene_facts = {"seed": seed[0]}
        if operator is not None:
            operator.is_recording = lambda: rec.sink.active
        print(f"carp-record: twin {args.task}, writing {args.out} ({writer.num_episodes} episodes there)")
        summary = rec.run(max_episodes=args.episodes, duration_s=args.duration, before_tick=operator)
    finally:
        for cam in cams.values():
            cam.stop()
        arm.stop()
        source.close()
        writer.close()
        env.close()
    return summary


def record_cell(args, cfg: RecorderConfig, *, rtde_factories: tuple | None = None,
                camera_kw: dict | None = None, source=None) -> dict:  # fmt: skip
    """The robot: the UR5e through ur_rtde and the 2F-85 through its URCap, both behind the driver
    core (``ArmDriver``: the safety limits a policy's chunks meet) as ``DriverArm``; the cameras of
    ``--cameras``; the same recorder as in the twin.

    ``rtde_factories`` (ur_rtde's control, receive and dashboard classes), ``camera_kw`` (per camera,
    the backend's ``rs=``/``cv2=`` module) and ``source`` (the operator's input) are the seams the
    tests fill with the fakes of ``carp_hardware.fake_rtde`` / ``cameras.fakes``."""
    from carp_sim.cli import TASK_TEXT
    from carp_teleop.cell import RobotCellDevices
    from carp_teleop.teleop import TeleopCore

    policy, meta_policy = _policy(args)
    dev = RobotCellDevices(args.robot_ip, args.cameras, cfg.cameras, args.gripper_port, args.limits,
                           rtde_factories, camera_kw)  # fmt: skip
    try:
        cell, cams = dev.arm, dev.cameras
        source = source or _open_input(args.input)
        dev.defer(source.close)
        teleop = TeleopCore(cell, source, cfg.teleop)
        writer = make_writer(args.out, cfg)
        dev.defer(writer.close)
        meta = {
            "task": args.task,
            "operator": args.operator,
            "calibration_id": cfg.calibration_id,
            "robot_serial": cell.serial,
            "camera_serials": dev.camera_serials,
            "sim": False,
            "input": args.input,
            "robot_ip": args.robot_ip,
            **meta_policy,
        }
        rec = Recorder(cfg, cell, cams, teleop, writer, TASK_TEXT[args.task], args.out, meta, policy=policy)
        n = writer.num_episodes
        print(f"carp-record: UR5e at {args.robot_ip}, writing {args.out} ({n} episodes there)")
        return rec.run(max_episodes=args.episodes, duration_s=args.duration)
    finally:
        dev.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.input == "scripted" and not args.sim:
            raise UserError("--input scripted drives the twin's expert: it needs --sim")
        if args.task not in ("cup", "bowl"):
            raise UserError(f"--task must be cup or bowl, got {args.task!r}")
        cfg = load_config(args)
        args.out.mkdir(parents=True, exist_ok=True)
        s = record_sim(args, cfg) if args.sim else record_cell(args, cfg)
        print(
            f"carp-record: saved {len(s['saved'])} episode(s) {s['saved']}, discarded {s['discarded']}; "
            f"tick CPU {s['tick_cpu_ms_p50']:.1f} ms p50, {s['tick_cpu_ms_p99']:.1f} ms p99"
        )
        return 0

    return run_main("carp-record", body)


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation on a real cell (``carp-eval --cell robot``): the twin's protocol with an operator.

The trial loop is ``evaluate.run_trial``, the same code that runs in the twin: observe, predict,
hand the chunk to the driver core, observe at each executed step's time. What changes is the
:class:`~carp_bringup.evaluate.Cell` under it. :class:`RobotCell` runs on the wall clock. Its
observations come from the cell's streams: the arm's TCP pose and gripper opening, and one
``StreamBuffer`` per camera. They are aligned by the ``ObservationAligner`` that the policy node
uses. Its driver is the ``ArmDriver`` over ur_rtde and the Robotiq URCap, in a servo process of
its own (``DriverProcess``, as under ``ur5e_driver_node``: a loop that shares the policy's GIL
loses its period). The operator, behind the small :class:`Operator` seam, does three things:

- before each trial, the operator resets the scene. The twin's layout for that trial's seed is
  printed as a suggestion, so that robot and twin trials can share layouts. The arm moves first
  (moveJ) to that seed's start pose, where the twin starts its episodes, with the gripper open.
- during the trial, the operator may end it early (Enter).
- after the trial, the operator marks success or failure, with a reason chosen from the task's
  list or typed.

The robot does not wait while the policy thinks, so ``hold`` does nothing here. The twin's
evaluation lets simulated time pass instead.

Every trial is appended to ``trials.jsonl`` as soon as it is judged, and results.json and
summary.png are rewritten after it. A crash, Ctrl-C or a fault therefore loses no judged trial,
and ``--resume`` continues where the run stopped. Videos show both cameras side by side.

``--cell live-twin`` runs all of this against the twin at wall-clock pace. The twin stands in for
the hardware: ``SimArm`` under the same driver and ``SimCamera`` streams. With ``--operator twin``
it also stands in for the operator: it resets its own scene to the seed's layout and reports its
own verdict. The tests use that to check the protocol end to end without a robot.
"""

from __future__ import annotations

import contextlib
import json
import select
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from carp_policy.actions import (
    ActionChunk,
    AlignerConfig,
    Observation,
    ObservationAligner,
    StaleObservationError,
)
from carp_policy.cli import UserError
from carp_policy.images import fit_image

# What an operator picks from after a failed trial (or types their own); "ok" is success.
FAILURE_REASONS = {
    "cup": ["missed the grasp", "cup tipped", "cup dropped", "cup outside the area", "arm not clear"],
    "bowl": ["missed the grasp", "bowl dropped", "bowl outside the pot", "arm not clear"],
}
COMMON_REASONS = ["timeout", "safety stop"]


class CellError(RuntimeError):
    """The cell cannot go on (a stream stopped, the driver faulted outside a trial): the arm is
    stopped and the run ends with the trials judged so far saved."""


@dataclass
class Verdict:
    """The operator's judgement of one trial (``evaluate.TrialResult`` takes its fields)."""

    success: bool
    reason: str


class Operator(Protocol):
    """The person at the cell (``ConsoleOperator``), or the twin standing in for them."""

    def reset_scene(self, trial: int, trials: int, seed: int, layout: Any) -> None:
        """Block until the scene is set up for the trial (``layout``: the twin's layout of ``seed``,
        a suggestion where to put the object and the target)."""
        ...

    def ended(self) -> bool:
        """Non-blocking: True once the operator has ended the running trial early."""
        ...

    def judge(self, seed: int, note: str) -> Verdict:
        """Success or failure with a reason (``note``: what the driver saw, e.g. a safety stop)."""
        ...

    def confirm(self, message: str) -> None:
        """Block until the operator has done what ``message`` asks (e.g. cleared a fault)."""
        ...


class ConsoleOperator:
    """Prompts on a terminal: Enter when the scene is ready, Enter to end a trial early, then y/n
    and a reason (a number from the task's list, or any text)."""

    def __init__(self, task: str, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
        self.reasons = FAILURE_REASONS.get(task, []) + COMMON_REASONS
        self.task, self.stdin, self.out = task, stdin, out

    def _ask(self, prompt: str) -> str:
        self.out.write(prompt)
        self.out.flush()
        line = self.stdin.readline()
        if not line:  # end of input: nobody is there to judge or reset, so stop the run
            raise CellError("operator input closed")
        return line.strip()

    def reset_scene(self, trial: int, trials: int, seed: int, layout: Any) -> None:
        where = ""
        if layout is not None:
            o, t = np.asarray(layout.object_xy), np.asarray(layout.target_xy)
            where = (f"\n  suggested layout (seed {seed}, robot base frame): {self.task} at "
                     f"x={o[0]:.3f} y={o[1]:.3f} m, target at x={t[0]:.3f} y={t[1]:.3f} m")  # fmt: skip
        self._ask(f"\ntrial {trial}/{trials}: reset the scene{where}\n  press Enter to start (the arm moves)")
        self.out.write("  running: press Enter to end the trial early, Ctrl-C stops the arm\n")
        self.out.flush()

    def confirm(self, message: str) -> None:
        self._ask(f"\n{message}\n  press Enter when done")

    def ended(self) -> bool:
        try:
            ready, _, _ = select.select([self.stdin], [], [], 0)
        except (ValueError, OSError, TypeError):  # not a selectable stream (e.g. a test's StringIO)
            return False
        if ready:
            if not self.stdin.readline():  # end of input, not a keypress: the next prompt says so
                return False
            return True
        return False

    def judge(self, seed: int, note: str) -> Verdict:
        if note:
            self.out.write(f"  the driver reported: {note}\n")
        while True:
            a = self._ask(f"  seed {seed}: success? [y/n] ").lower()
            if a in ("y", "yes"):
                return Verdict(True, "ok")
            if a in ("n", "no"):
                break
        menu = ", ".join(f"{i} {r}" for i, r in enumerate(self.reasons, 1))
        while True:
            a = self._ask(f"  reason ({menu}, or type one): ")
            if a.isdigit() and 1 <= int(a) <= len(self.reasons):
                return Verdict(False, self.reasons[int(a) - 1])
            if a and not a.isdigit():
                return Verdict(False, a)


def check_runs_on_cell(contract: dict, cameras: dict | None = None) -> None:
    """Refuse a model a cell cannot feed (UserError): one that reads the twin's object poses, or a
    camera the cell lacks (``cameras``: the cell's, None = not checked yet)."""
    if contract.get("env_state_names"):
        raise UserError(
            "this model reads the object poses (env_state) that only the twin measures: it cannot "
            "run on a cell; evaluate a camera model (e.g. configs/visual.yaml or coa_visual)"
        )
    missing = [c for c in contract.get("cameras", {}) if cameras is not None and c not in cameras]
    if missing:
        raise UserError(f"the model reads camera(s) {missing}; the cell has {sorted(cameras)}")


class RobotCell:
    """A real cell (or the twin standing in for one) behind ``evaluate.Cell`` on the wall clock.

    ``arm``: a ``carp_teleop.cell.DriverArm`` (its ``driver``, servo thread and TCP / gripper
    streams); ``cameras``: name -> a started camera with a ``buffer`` (``carp_hardware.cameras``);
    ``contract``: the model's manifest contract (cameras, their image sizes, dt). The episode clock
    starts at 0 with each trial, as the twin's does: observation times are shifted onto it, and
    each chunk is shifted back onto the host clock the driver runs on."""

    def __init__(
        self,
        arm,
        cameras: dict,
        operator: Operator,
        task,
        contract: dict,
        trials: int,
        aligner: AlignerConfig | None = None,
        clock=time.monotonic,
        lock=None,
        video_cameras: tuple[str, ...] = ("wrist", "scene"),
    ) -> None:
        check_runs_on_cell(contract, cameras)
        self.arm, self.driver, self.cameras = arm, arm.driver, cameras
        self.operator, self.task, self.trials = operator, task, trials
        self.sizes = {c: tuple(int(v) for v in hw) for c, hw in contract.get("cameras", {}).items()}
        a = aligner or AlignerConfig()
        self.aligner = ObservationAligner(
            [arm.tcp_buffer, arm.gripper_buffer],
            {c: cameras[c].buffer for c in self.sizes},
            config=AlignerConfig(
                horizon=1, dt=float(contract.get("dt", 0.1)), max_age=a.max_age, max_skew=a.max_skew
            ),
        )
        self.clock, self.lock = clock, lock or contextlib.nullcontext()
        self.video_cameras = tuple(c for c in video_cameras if c in cameras) or tuple(cameras)
        self.max_duration_s = float(task.max_duration_s)
        self.layout = None
        self.trial = self.seed = 0
        self._t0 = clock()
        self._ended = False
        self._fault = ""

    # ------------------------------------------------------------------ evaluate.Cell
    @property
    def time(self) -> float:
        return self.clock() - self._t0

    @property
    def done(self) -> bool:
        if not self._ended and self.operator.ended():
            self._ended = True
        st = self.driver.status()
        if st.state.name == "FAULT" and not self._fault:
            self._fault = f"driver fault: {st.reason}"
        return self._ended or bool(self._fault)

    def reset(self, seed: int) -> Observation:
        """Move the arm to the seed's start pose (moveJ) with the gripper open, let the operator set
        the scene, then enable."""
        from carp_sim.tasks import sample_layout

        self.trial, self.seed = self.trial + 1, int(seed)
        self._ended, self._fault = False, ""
        self.layout = sample_layout(self.task, np.random.default_rng(int(seed)))
        from carp_hardware.driver import DriverError

        st = self.driver.status()
        if st.state.name == "FAULT":  # a protective stop in the last trial: the operator clears it
            self.operator.confirm(f"the driver is in a fault ({st.reason}): clear its cause on the cell "
                                  "(free the arm, release the stop on the pendant)")  # fmt: skip
            try:
                self.driver.acknowledge()  # unlock, re-upload the script, re-seed from the measured pose
            except DriverError as e:
                raise CellError(f"the fault did not clear: {e}") from None
        try:
            with self.lock:
                self.driver.stop("between trials")
                # the seed's start pose, where the twin starts its episodes (and its demonstrations);
                # refused (nothing moves) outside the limits, without IK, or by the controller
                self.driver.home(self.layout.start_tcp)
                self.driver.open_gripper()
        except DriverError as e:
            raise CellError(f"cannot move to the start pose of seed {seed}: {e}") from None
        self.operator.reset_scene(self.trial, self.trials, int(seed), self.layout)
        with self.lock:
            self.driver.enable()
        self._t0 = self.clock()
        return self.observe(wait_s=1.0)

    def submit_chunk(self, chunk: ActionChunk):
        """To the driver, on the host clock (the chunk's steps are due from its observation's time)."""
        shifted = ActionChunk(
            chunk.actions, timestamp=chunk.timestamp + self._t0, dt=chunk.dt, latency_s=chunk.latency_s
        )
        return self.driver.submit_chunk(shifted)

    def run_until(self, t: float) -> Observation:
        """Wait (the servo thread executes) until episode time ``t``, or the trial ends; observe."""
        while not self.done:
            left = t - self.time
            if left <= 0:
                break
            time.sleep(min(left, 0.005))
        return self.observe()

    def hold(self, seconds: float) -> None:
        """Nothing: on a cell the world moved on by itself while the policy computed."""

    def observe(self, wait_s: float = 0.2) -> Observation:
        """The newest aligned sample of every stream, images fitted to the model's sizes. A stream
        that stays stale for ``wait_s`` stops the arm and ends the run (``CellError``)."""
        give_up = self.clock() + wait_s
        while True:
            try:
                obs, _ = self.aligner.build(self.clock())
                break
            except StaleObservationError as e:
                if self.clock() > give_up:
                    self.driver.stop(f"stale observation: {e}")
                    raise CellError(f"stale observation, arm stopped: {e}") from None
                time.sleep(0.005)
        images = {c: fit_image(obs.images[c][-1], self.sizes[c]) for c in self.sizes}
        return Observation(state=obs.state[-1], images=images, timestamp=obs.timestamp - self._t0)

    def outcome(self) -> Verdict:
        """Stop the arm, then the operator's verdict (told of a fault the driver latched)."""
        st = self.driver.status()
        note = self._fault or (f"driver stopped: {st.reason}" if st.state.name == "STOPPED" else "")
        self.driver.stop("trial ended")
        return self.operator.judge(self.seed, note)

    def render_video_frame(self, height: int = 240, width: int = 320) -> np.ndarray:
        """The newest frame of each camera, each fitted to (height, width), side by side."""
        frames = []
        for c in self.video_cameras:
            s = self.cameras[c].buffer.latest()
            img = np.zeros((height, width, 3), np.uint8) if s is None else fit_image(s.value, (height, width))
            frames.append(img)
        return np.concatenate(frames, axis=1)

    def close(self) -> None:
        """Stop the arm (the devices themselves are closed by whoever opened them)."""
        self.driver.stop("evaluation ended")


# ----------------------------------------------------------------------------- the twin standing in
class TwinOperator:
    """The twin as the operator: it sets its own scene to the seed's layout and reports its own
    verdict (``SimCell.outcome``, the twin's success checks). For tests and rehearsals."""

    def __init__(self, cell, lock) -> None:
        self.cell, self.lock = cell, lock

    def reset_scene(self, trial: int, trials: int, seed: int, layout: Any) -> None:
        with self.lock:
            self.cell.reset(seed)  # the twin's driver: stopped and enabled from the new pose

    def ended(self) -> bool:
        return bool(self.cell.done)  # the twin's success held, or an unrecoverable failure

    def judge(self, seed: int, note: str) -> Verdict:
        with self.lock:
            o, ended = self.cell.outcome(), bool(self.cell.done)
        reason = str(o.reason)
        # The trial ran out on the wall clock, whose pace the twin's own clock follows only closely:
        # a twin a few ticks short of its timeout would call the same failure by its state alone.
        # A trial a driver fault ended early keeps the driver's word, as an operator would.
        if not o.success and note.startswith("driver fault"):
            reason = f"{note} ({reason})"
        elif not o.success and not ended and not reason.startswith("timeout"):
            reason = f"timeout ({reason})"
        return Verdict(bool(o.success), reason)

    def confirm(self, message: str) -> None:
        """Nothing to clear by hand in the twin (``acknowledge`` recovers its driver)."""


class LiveTwin:
    """The twin as a cell's hardware at wall-clock pace: the ``SimCell``'s driver over ``SimArm``
    on the host's monotonic clock (the clock ``DriverArm`` and the cameras stamp with), its servo
    loop paced by ``DriverArm``, and ``SimCamera`` streams, all under one world lock."""

    def __init__(self, task: str, image_sizes: dict[str, tuple[int, int]], camera_fps: float = 30.0,
                 servo_hz: float = 100.0) -> None:  # fmt: skip
        import os

        from carp_hardware.cameras import SimCamera
        from carp_hardware.driver import DriverConfig, WallClock
        from carp_sim.env import SimCell, SimConfig
        from carp_teleop.cell import DriverArm

        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("LP_NUM_THREADS", "1")  # one rasteriser thread per render (record.py: why)
        cfg = DriverConfig(servo_hz=servo_hz, ik="local", check_controller_poses=False)
        self.cell = SimCell(task, SimConfig(render=False, servo_hz=servo_hz), clock=WallClock(),
                            driver_config=cfg)  # fmt: skip
        self.lock = threading.RLock()
        self.cell.reset(0)
        every = max(1, round(0.1 / cfg.dt))

        def after_tick(k: int) -> None:  # the twin's success checks at the control rate
            if k % every == 0:
                self.cell.update_status()

        self.arm = DriverArm(self.cell.driver, serial="twin", lock=self.lock, after_tick=after_tick)
        sizes = {"wrist": (120, 160), "scene": (120, 160), **image_sizes}
        self.cameras = {c: SimCamera(c, self.cell.model, self.cell.data, self.lock, size=hw, fps=camera_fps)
                        for c, hw in sizes.items()}  # fmt: skip

    def start(self) -> None:
        self.arm.start()
        for cam in self.cameras.values():
            cam.start()

    def close(self) -> None:
        for cam in self.cameras.values():
            cam.stop()
        self.arm.stop()
        self.cell.close()


# ----------------------------------------------------------------------------- the run
def evaluate_on_cell(
    cfg,
    policy_spec: str,
    out: Path,
    cell: str = "robot",
    device: str = "cpu",
    robot_ip: str = "192.168.1.102",
    gripper_port: int = 63352,
    limits: str | None = None,
    cameras: str | None = None,
    resume: bool = False,
    operator: Operator | None = None,
    camera_kw: dict | None = None,
    build=None,
) -> dict:
    """``cfg.trials`` trials of ``policy_spec`` on the robot (``cell="robot"``: ur_rtde at
    ``robot_ip``, the URCap at ``gripper_port``, the cameras of the ``cameras`` YAML, a
    ``ConsoleOperator`` unless ``operator`` is given) or on the twin at wall-clock pace, with the
    twin as operator (``cell="live-twin"``). Writes what ``carp-eval`` writes in the twin, and the
    driver's diagnostics at the end (servo periods, refusals, stops). On the robot the servo loop
    runs in a process of its own (``DriverProcess``), as under ``ur5e_driver_node``; ``build``
    (what builds its driver; tests: ``fake_rtde.fake_driver``) and ``camera_kw`` are the fakes'
    seams (``RobotCellDevices``)."""
    from carp_bringup.evaluate import load_policy, run_trials
    from carp_sim.tasks import TaskConfig

    if cell not in ("robot", "live-twin"):
        raise UserError(f"cell must be robot or live-twin, got {cell!r}")
    # onnxruntime's threads sleep between chunks: they share the CPU with the servo loop and cameras
    policy = load_policy(policy_spec, device=device, cfg=cfg, spin=False)
    contract = policy.contract
    check_runs_on_cell(contract)  # before anything opens
    if cfg.execute_steps is None:
        cfg.execute_steps = int(contract["execute_steps"])
    task = TaskConfig.load(cfg.task)
    sizes = {c: tuple(int(v) for v in hw) for c, hw in contract.get("cameras", {}).items()}
    if cell == "live-twin":
        hw = LiveTwin(cfg.task, sizes)
        hw.start()
        arm, cams, lock, close = hw.arm, hw.cameras, hw.lock, hw.close
        operator = operator or TwinOperator(hw.cell, hw.lock)
        facts = {"cell": "live-twin", "robot_serial": "twin"}
    else:
        from carp_teleop.cell import RobotCellDevices

        dev = RobotCellDevices(robot_ip, cameras, tuple(sizes), gripper_port, limits,
                               camera_kw=camera_kw, process=True, build=build)  # fmt: skip
        arm, cams, lock, close = dev.arm, dev.cameras, None, dev.close
        operator = operator or ConsoleOperator(task.name)
        facts = {"cell": "robot", "robot_ip": robot_ip, "robot_serial": arm.serial,
                 "camera_serials": dev.camera_serials}  # fmt: skip
    try:
        rc = RobotCell(arm, cams, operator, task, contract, cfg.trials, lock=lock)
        try:
            summary = run_trials(rc, policy, cfg, out, policy_spec, resume=resume, extra=facts)
        finally:
            rc.close()
        summary["driver"] = arm.driver.diagnostics()
        (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        close()

"""The driver's servo loop at 500 Hz: period jitter with a policy computing beside it, the per-tick
cost of the safety checks, and the time from a chunk's arrival to its first servo command.

    .venv/bin/python benchmarks/servo_loop.py [--seconds 30] [--policy models/cup] \
        [--modes thread,process,process_rt] [--rt-priority 80] [--out benchmarks/results/servo_loop.json]

Six runs, each ``--seconds`` long, of the real driver core (``ArmDriver``) streaming to
- the scripted ur_rtde fake in real-time mode (its ``waitPeriod`` sleeps and spins to the period
  end, as ur_rtde does), and
- the twin at wall-clock pace (``SimArm(realtime=True)``, one 2 ms physics step per tick),
each with the servo loop in a thread of the process that runs the policy, in its own process
(the policy in the parent; chunks cross a multiprocessing queue), and in its own process under
SCHED_FIFO (``process_rt``: what the driver node's servo process asks for,
``DriverConfig.servo_rt_priority``; the JSON records whether the OS granted it). Beside the loop the released
policy predicts continuously (the CPU load of inference); every 100 ms a chunk (a small circle
around the start pose, so that every one is accepted) goes to the loop. Writes JSON (machine,
commit) and a PNG of the period distributions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import threading
import time
from pathlib import Path

import machine
import numpy as np

HZ = 500.0


def _chunk(t_obs: float, start: np.ndarray, phase: float):
    from carp_policy.actions import ActionChunk, matrix_to_rot6d

    i = np.arange(1, 17)
    ang = phase + 0.1 * i
    acts = np.zeros((16, 10))
    acts[:, :3] = start[:3, 3] + 0.02 * np.stack([np.cos(ang) - 1, np.sin(ang), 0 * ang], axis=1)
    acts[:, 3:9] = matrix_to_rot6d(start[:3, :3])
    acts[:, 9] = 0.085
    return ActionChunk(acts, timestamp=t_obs)


def _make_driver(backend: str):
    from carp_hardware.driver import ArmDriver, DriverConfig, WallClock

    if backend == "fake_rtde":
        from carp_hardware import fake_rtde
        from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig

        fake_rtde.FakeUR.create("bench-ur5e", realtime=True, frequency=HZ)
        arm = RtdeArm(RtdeConfig(host="bench-ur5e", servo_hz=HZ), factories=fake_rtde.FACTORIES)
        arm.connect()
        drv = ArmDriver(arm, None, config=DriverConfig(servo_hz=HZ, ik="controller"), clock=WallClock())
        return drv, None
    from carp_sim.backends import SimArm
    from carp_sim.env import SimCell, SimConfig

    cell = SimCell("cup", SimConfig(render=False, servo_hz=HZ))
    cell.reset(0)
    arm = SimArm(cell, realtime=True)
    arm.q_last = cell.arm.q_last
    drv = ArmDriver(arm, cell.gripper, config=DriverConfig(servo_hz=HZ, ik="local"), clock=WallClock())
    return drv, cell


def servo_loop(backend: str, seconds: float, inbox, results, rt_priority: int = 0) -> None:
    """The loop: one ``tick()`` per period; chunks arrive through ``inbox`` (a queue). rt_priority:
    SCHED_FIFO for this process first (``driver_process.realtime``, as the driver node's servo
    process does)."""
    rt = None
    if rt_priority:
        from carp_hardware.driver_process import realtime

        rt = realtime(rt_priority)
    drv, _cell = _make_driver(backend)
    drv.enable()
    start = drv.status().tcp_cmd
    stamps, arrival_to_servo, transit = [], [], []
    pending = None
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            msg = inbox.get_nowait()
        except queue.Empty:
            msg = None
        if msg is not None:
            t_sent, phase = msg
            t_arr = time.perf_counter()
            transit.append(t_arr - t_sent)
            res = drv.submit_chunk(_chunk(drv.clock.now(), start, phase))
            pending = t_arr if res.accepted else None
        stamps.append(time.perf_counter())
        drv.tick()  # the backend paces it (waitPeriod / sleep to the period end)
        if pending is not None:
            arrival_to_servo.append(stamps[-1] - pending)  # the tick after arrival streams the new path
            pending = None
    keep = ("refusals", "stops", "faults", "ticks")
    results.put({"stamps": stamps, "arrival_to_servo": arrival_to_servo, "transit": transit, "realtime": rt,
                 "diagnostics": {k: v for k, v in drv.diagnostics().items() if k in keep}})  # fmt: skip


def _policy_load(policy_spec: str, stop: threading.Event, inbox) -> int:
    """Run the policy continuously (the CPU load); every 100 ms send a chunk request."""
    from carp_bringup.evaluate import EvalConfig, load_policy
    from carp_policy.actions import ObservationHistory
    from carp_sim.env import SimCell, SimConfig

    pol = load_policy(policy_spec, cfg=EvalConfig())
    cell = SimCell("cup", SimConfig(render=False))
    obs = ObservationHistory(pol.obs_horizon, pol.obs_stride).push(cell.reset(0))
    n, last, phase = 0, 0.0, 0.0
    while not stop.is_set():
        pol.predict(obs)
        n += 1
        now = time.perf_counter()
        if now - last >= 0.1:
            phase += 0.2
            inbox.put((now, phase))
            last = now
    return n


def run(backend: str, mode: str, seconds: float, policy: str, rt_priority: int = 80) -> dict:
    """One run; mode: thread, process, or process_rt (the process under SCHED_FIFO rt_priority)."""
    ctx = mp.get_context("spawn")
    stop = threading.Event()
    if mode in ("process", "process_rt"):
        inbox, results = ctx.Queue(), ctx.Queue()
        rt = rt_priority if mode == "process_rt" else 0
        proc = ctx.Process(target=servo_loop, args=(backend, seconds, inbox, results, rt))
        proc.start()
    else:
        inbox, results = queue.Queue(), queue.Queue()
        th = threading.Thread(target=servo_loop, args=(backend, seconds, inbox, results))
        th.start()
    counter = {}
    pt = threading.Thread(target=lambda: counter.setdefault("n", _policy_load(policy, stop, inbox)))
    pt.start()
    out = results.get(timeout=seconds + 120)
    stop.set()
    pt.join()
    if mode != "thread":
        proc.join()
    else:
        th.join()
    periods = np.diff(np.array(out["stamps"])) * 1e3
    jitter = np.abs(periods - 1e3 / HZ)
    a2s = np.array(out["arrival_to_servo"]) * 1e3
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else None  # noqa: E731
    return {
        "backend": backend, "mode": mode, "seconds": seconds, "ticks": len(periods),
        "period_ms": {"p50": pct(periods, 50), "p99": pct(periods, 99), "max": float(periods.max())},
        "jitter_ms": {"p50": pct(jitter, 50), "p99": pct(jitter, 99), "max": float(jitter.max())},
        "overruns_over_1ms": int((jitter > 1.0).sum()),
        "chunk_arrival_to_first_servo_ms": {"p50": pct(a2s, 50), "p99": pct(a2s, 99), "n": len(a2s)},
        "queue_transit_ms": {"p50": pct(np.array(out["transit"]) * 1e3, 50)},
        "policy_predictions": counter.get("n"), "driver": out["diagnostics"], "realtime": out["realtime"],
        "_periods": periods,
    }  # fmt: skip


def safety_tick_cost(n: int = 5000) -> dict:
    """Per-tick cost of the safety checks (one tick: workspace, speeds, joint step / limits), and of
    a whole driver tick against the non-real-time fake (interpolation + checks + IK + servoJ)."""
    from carp_hardware import fake_rtde
    from carp_hardware.driver import ArmDriver, DriverConfig
    from carp_hardware.kinematics import fk
    from carp_hardware.safety import SafetyMonitor
    from carp_hardware.ur_rtde_arm import RtdeArm, RtdeConfig

    mon = SafetyMonitor()
    q0 = np.array([0.0, -1.75, 1.85, -1.67, -1.5708, 0.0])
    p0 = fk(q0)
    pos = np.vstack([p0[:3, 3], p0[:3, 3] + [1e-4, 0, 0]])
    rot = np.stack([p0[:3, :3]] * 2)
    times = np.array([0.0, 0.002])
    q1 = (q0 + 1e-4)[None]
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        mon.workspace(pos[1:], "tick")
        mon.speeds(times, pos, rot, "tick")
        mon.joint_path(q0, q1, 0.002)
        t.append(time.perf_counter() - t0)
    checks = np.array(t) * 1e6
    fake_rtde.FakeUR.create("cost-ur5e")
    arm = RtdeArm(RtdeConfig(host="cost-ur5e"), factories=fake_rtde.FACTORIES)
    arm.connect()
    ur = fake_rtde.FakeUR.get("cost-ur5e")
    clock = type("C", (), {"now": lambda self: ur.t})()
    res = {}
    for ik in ("local", "controller"):
        drv = ArmDriver(arm, None, config=DriverConfig(ik=ik), clock=clock)
        drv.enable()
        start = drv.status().tcp_cmd
        ticks = []
        for k in range(n // 10):
            if k % 50 == 0:
                drv.submit_chunk(_chunk(ur.t, start, 0.1 * k))
            t0 = time.perf_counter()
            drv.tick()
            ticks.append(time.perf_counter() - t0)
        tick = np.array(ticks) * 1e6
        res[ik] = {"p50": float(np.median(tick)), "p99": float(np.percentile(tick, 99))}
    return {"safety_checks_us": {"p50": float(np.median(checks)), "p99": float(np.percentile(checks, 99)),
                                 "mean": float(checks.mean())},
            "driver_tick_us_fake_rtde": res}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--policy", default="models/cup")
    ap.add_argument("--backends", default="fake_rtde,twin")
    ap.add_argument("--modes", default="thread,process,process_rt",
                    help="thread, process, process_rt (the servo process under SCHED_FIFO)")
    ap.add_argument("--rt-priority", type=int, default=80, help="SCHED_FIFO priority of process_rt")
    ap.add_argument("--out", type=Path, default=machine.REPO / "benchmarks" / "results" / "servo_loop.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = machine.machine_info()
    cost = safety_tick_cost()
    print(json.dumps(cost, indent=1))
    runs = []
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            r = run(backend, mode, args.seconds, args.policy, args.rt_priority)
            a2s = r["chunk_arrival_to_first_servo_ms"]["p50"]
            print(f"{backend:9s} {mode:7s} period p50 {r['period_ms']['p50']:.3f} ms, jitter p99 "
                  f"{r['jitter_ms']['p99']:.3f} ms max {r['jitter_ms']['max']:.2f} ms, arrival->servo p50 "
                  f"{a2s} ms, {r['policy_predictions']} predictions")  # fmt: skip
            runs.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "servo_hz": HZ, "policy": args.policy, **cost,
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        ax.hist(r["_periods"], bins=np.linspace(0, 6, 121), histtype="step", log=True,
                label=f"{r['backend']} / {r['mode']}: jitter p99 {r['jitter_ms']['p99']:.2f} ms")  # fmt: skip
    ax.axvline(2.0, color="k", lw=0.5)
    ax.set(
        xlabel="servo period (ms), target 2 ms",
        ylabel="ticks",
        title="driver servo loop at 500 Hz, policy beside it",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

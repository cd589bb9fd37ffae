"""Twin speed: real-time factor of the MuJoCo cell without rendering, and the camera cost per step.

    .venv/bin/python benchmarks/sim_speed.py [--tasks cup,bowl] [--episodes 10] [--servo-hz 100,50]

For each task and servo rate, runs ``--episodes`` scripted-expert episodes in closed loop (seeds
``--seed`` onwards, ``render=False``, every other setting at its default) and reports the real-time
factor as simulated seconds per second of this process's CPU time, so the figure holds when other
jobs share the machine (wall-clock is reported beside it). Two factors per row:
- loop: the whole episode loop, expert included (what ``carp-sim bench`` reports);
- twin: the time inside ``SimCell.step`` only (interpolation, IK, servo, physics, status checks).
Then the camera cost: both cameras rendered by ``observe()`` after each of ``--render-steps`` expert
steps, median CPU and wall ms per control step (needs EGL; skipped with a note without it).
Writes sim_speed.json (machine, versions, commit, every number) and prints a table. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import machine
import numpy as np

REPO = machine.REPO
TARGET_RTF = 20.0  # required real-time factor at the default servo rate (CPU time)


def machine_info() -> dict[str, Any]:
    """Where it ran (see machine.py) plus the versions that set the twin's speed."""
    import mujoco
    import scipy

    return machine.machine_info() | {
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "mujoco": mujoco.__version__,
    }


def physics_speed(task: str, servo_hz: float, episodes: int, seed: int) -> dict[str, Any]:
    """Expert episodes without rendering at ``servo_hz``: real-time factors and outcomes."""
    from carp_sim.env import SimCell, SimConfig
    from carp_sim.expert import make_expert

    env = SimCell(task, SimConfig(render=False, servo_hz=servo_hz))
    _episode(env, make_expert, seed + episodes)  # warm-up (imports, caches), not timed
    sim_s = step_cpu = 0.0
    successes = steps = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for s in range(seed, seed + episodes):
        ok, n, cpu = _episode(env, make_expert, s)
        successes += ok
        steps += n
        step_cpu += cpu
        sim_s += env.time
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    env.close()
    return {
        "task": task,
        "servo_hz": servo_hz,
        "episodes": episodes,
        "expert_successes": successes,
        "control_steps": steps,
        "sim_s": sim_s,
        "rtf_loop_cpu": sim_s / cpu,
        "rtf_loop_wall": sim_s / wall,
        "rtf_twin_cpu": sim_s / step_cpu,
        "cpu_ms_per_control_step_loop": 1e3 * cpu / steps,
        "cpu_ms_per_control_step_twin": 1e3 * step_cpu / steps,
    }


def _episode(env, make_expert, seed: int) -> tuple[bool, int, float]:
    """One closed-loop expert episode as ``run_expert_episode`` runs it, timing ``env.step`` alone.

    Returns (success, control steps, CPU seconds spent inside ``env.step``).
    """
    obs = env.reset(seed)
    expert = make_expert(env, seed)
    steps, step_cpu = 0, 0.0
    while not env.done and env.time < env.max_duration_s:
        action = expert.predict(obs).actions[0]
        c = time.process_time()
        obs = env.step(action)
        step_cpu += time.process_time() - c
        steps += 1
    return env.outcome().success, steps, step_cpu


def render_cost(task: str, steps: int, seed: int) -> dict[str, Any]:
    """Median wall / CPU ms to render both 120x160 cameras once per control step, arm moving."""
    from carp_sim.env import SimCell, SimConfig
    from carp_sim.expert import make_expert

    with SimCell(task, SimConfig(render=True)) as env:
        obs = env.reset(seed)
        expert = make_expert(env, seed)
        env.observe()  # create the GL context outside the timing
        wall_ms, cpu_ms = [], []
        for _ in range(steps):
            env.config.render = False  # step without images; the render alone is timed below
            obs = env.step(expert.predict(obs).actions[0])
            env.config.render = True
            w, c = time.perf_counter(), time.process_time()
            obs = env.observe()
            wall_ms.append(1e3 * (time.perf_counter() - w))
            cpu_ms.append(1e3 * (time.process_time() - c))
        size = env.config.image_size
    return {
        "task": task,
        "cameras": list(obs.images),
        "image_size": list(size),
        "steps": steps,
        "wall_ms_median": float(np.median(wall_ms)),
        "cpu_ms_median": float(np.median(cpu_ms)),
        "wall_ms_p90": float(np.percentile(wall_ms, 90)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="cup,bowl")
    ap.add_argument("--episodes", type=int, default=10, help="expert episodes per task and servo rate")
    ap.add_argument("--servo-hz", default="100,50", help="servo rates to measure (default rate: 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render-steps", type=int, default=50, help="0: do not measure the cameras")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.episodes < 1:
        ap.error("--episodes must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rates = [float(r) for r in args.servo_hz.split(",") if r.strip()]
    info = machine_info()
    notes: list[str] = []
    t0 = time.perf_counter()
    rows = []
    for task in tasks:
        for hz in rates:
            print(f"[{task}] servo {hz:g} Hz: {args.episodes} expert episodes ...", flush=True)
            rows.append(physics_speed(task, hz, args.episodes, args.seed))
    renders = []
    if args.render_steps > 0:
        for task in tasks:
            print(f"[{task}] rendering both cameras for {args.render_steps} steps ...", flush=True)
            try:
                renders.append(render_cost(task, args.render_steps, args.seed))
            except Exception as e:  # no EGL / GL context on this machine: physics numbers still stand
                notes.append(f"{task}: camera cost not measured: {type(e).__name__}: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "args": vars(args),
        "physics": rows,
        "render": renders,
        "notes": notes,
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
    }
    (out / "sim_speed.json").write_text(json.dumps(result, indent=1))

    # ---- summary table (one screen)
    print(
        f"\nTwin speed without rendering, real-time factor = sim s / CPU s | {info['cpu']} "
        f"x{info['cpu_cores']} | mujoco {info['mujoco']} | load {info['load_avg_at_start'][0]:.1f}"
        f" -> {result['load_avg_at_end'][0]:.1f}"
    )
    print(
        f"{'task':<5} {'servo Hz':>8} {'episodes':>8} {'expert ok':>9} {'RTF loop':>9} {'RTF twin':>9} "
        f"{'RTF wall':>9} {'ms/step':>8}"
    )
    for r in rows:
        print(
            f"{r['task']:<5} {r['servo_hz']:>8g} {r['episodes']:>8} "
            f"{r['expert_successes']:>5}/{r['episodes']:<3} {r['rtf_loop_cpu']:>8.1f}x "
            f"{r['rtf_twin_cpu']:>8.1f}x {r['rtf_loop_wall']:>8.1f}x "
            f"{r['cpu_ms_per_control_step_loop']:>8.2f}"
        )
    for r in renders:
        print(
            f"{r['task']:<5} cameras {'+'.join(r['cameras'])} {r['image_size'][0]}x{r['image_size'][1]}: "
            f"{r['cpu_ms_median']:.1f} ms CPU, {r['wall_ms_median']:.1f} ms wall per control step (median)"
        )
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out / 'sim_speed.json'} ({result['wall_s']:.0f} s)")
    default = [r for r in rows if r["servo_hz"] == 100.0]
    if default:
        worst = min(default, key=lambda r: r["rtf_loop_cpu"])
        verdict = "met" if worst["rtf_loop_cpu"] >= TARGET_RTF else "NOT met"
        print(
            f"target {TARGET_RTF:.0f}x at servo 100 Hz (expert loop, CPU time): {verdict}, "
            f"slowest {worst['task']} at {worst['rtf_loop_cpu']:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

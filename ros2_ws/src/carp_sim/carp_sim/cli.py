"""``carp-sim``: collect expert demonstrations in the twin, measure the expert and the twin's speed.

carp-sim collect --task cup --episodes 50 --out data/cup --seed 0
carp-sim bench --task cup --episodes 100          # expert success rate + physics / render speed
carp-sim snapshot --task cup --seed 0 --out img/   # PNGs of both cameras (and a larger view)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from carp_policy.cli import run_main

TASK_TEXT = {
    "cup": "pick up the cup and put it upright in the green area",
    "bowl": "pick up the small bowl and put it in the pot",
}


def _refuse_recorded_seeds(out: Path, seed: int, attempts: int) -> None:
    """The writer appends to an existing dataset (more demonstrations in a later session). Seeds
    it already holds would be recorded again, identically: twins that leak across the episode
    split of training and weigh some layouts double. Refuse them, naming the next free seed."""
    from carp_policy.dataset import EpisodeDataset
    from carp_policy.dataset.format import INFO_PATH

    if not (out / INFO_PATH).exists():
        return
    ds = EpisodeDataset(out)
    recorded = {ds.metadata(i).get("seed") for i in range(len(ds))} - {None}
    clash = sorted(recorded & set(range(seed, seed + attempts)))
    if clash:
        raise ValueError(
            f"{out} already holds {len(ds)} episodes, among them seeds {clash[0]}..{clash[-1]} of the "
            f"{seed}..{seed + attempts - 1} this run may use: they would be recorded twice. Use another "
            f"--out, or append new layouts with --seed {max(recorded) + 1}"
        )


def collect(
    task: str,
    episodes: int,
    out: Path,
    seed: int = 0,
    keep_failures: bool = False,
    image_size: tuple[int, int] = (120, 160),
    max_attempts: int | None = None,
    expert_variety: str = "task",
) -> dict:
    """Run the expert closed-loop at the control rate and record ``episodes`` episodes to ``out``.

    Episode i of the attempt sequence uses seed ``seed + i``; failed attempts are discarded (unless
    ``keep_failures``) and further seeds are tried until ``episodes`` are saved or ``max_attempts``
    (default 2x episodes) run out. ``expert_variety``: "task" (the task YAML's ``expert:`` ranges) or
    "wide" (``carp_sim.expert.WIDE_VARIETY``). Returns the summary dict (also in ``out/collect.json``).
    """
    from tqdm import tqdm

    from carp_policy.actions import ACTION_NAMES, STATE_NAMES
    from carp_policy.dataset import DatasetWriter
    from carp_sim.env import ENV_STATE_NAMES, SimCell, SimConfig
    from carp_sim.expert import run_expert_episode

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    max_attempts = max_attempts or 2 * episodes
    _refuse_recorded_seeds(Path(out), seed, max_attempts)
    env = SimCell(task, SimConfig(image_size=image_size))
    cams = {c: tuple(image_size) for c in env.config.cameras}
    writer = DatasetWriter(
        out, fps=env.config.control_hz, cameras=cams, state_names=STATE_NAMES,
        action_names=ACTION_NAMES, robot_type="ur5e", env_state_names=ENV_STATE_NAMES,
    )  # fmt: skip
    saved, attempts, lengths, reasons = 0, 0, [], {}
    t0 = time.perf_counter()
    bar = tqdm(total=episodes, desc=f"collect {task}", unit="ep")
    try:
        while saved < episodes and attempts < max_attempts:
            s = seed + attempts
            attempts += 1
            writer.begin_episode(task=TASK_TEXT[env.task.name])

            def record(obs, action):
                writer.add_frame(obs.timestamp, obs.images, obs.state, action, env_state=obs.env_state)

            outcome, steps = run_expert_episode(env, s, on_step=record, variety=expert_variety)
            reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
            if outcome.success or keep_failures:
                writer.save_episode(
                    success=outcome.success,
                    metadata={
                        "seed": s,
                        "reason": outcome.reason,
                        "operator": "scripted-expert",
                        "expert_variety": expert_variety,
                        "sim": True,
                    },
                )
                saved += 1
                lengths.append(steps)
                bar.update(1)
            else:
                writer.discard_episode()
            bar.set_postfix(success=f"{sum(v for k, v in reasons.items() if k == 'ok')}/{attempts}")
    finally:
        bar.close()
        writer.close()
        env.close()
    wall = time.perf_counter() - t0
    summary = {
        "task": task,
        "saved_episodes": saved,
        "attempts": attempts,
        "expert_success_rate": reasons.get("ok", 0) / max(attempts, 1),
        "outcomes": reasons,
        "mean_length_steps": float(np.mean(lengths)) if lengths else 0.0,
        "frames": int(np.sum(lengths)),
        "wall_s": wall,
        "seeds": [seed, seed + attempts - 1],
        "expert_variety": expert_variety,
        "out": str(out),
    }
    (Path(out) / "collect.json").write_text(json.dumps(summary, indent=2))
    return summary


def bench(
    task: str, episodes: int = 100, seed: int = 0, render_steps: int = 50, expert_variety: str = "task"
) -> dict:
    """Expert success over ``episodes`` seeds without rendering, and the twin's speed.

    Speed is given as wall-clock and as process CPU time: the CPU figure is what the twin costs on
    one core even when other jobs share the machine.
    """
    from tqdm import tqdm

    from carp_sim.env import SimCell, SimConfig
    from carp_sim.expert import make_expert, run_expert_episode

    env = SimCell(task, SimConfig(render=False))
    reasons, fails, sim_s, lengths = {}, [], 0.0, []
    w0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(seed, seed + episodes), desc=f"expert {task}", unit="ep")
    for s in bar:
        outcome, steps = run_expert_episode(env, s, variety=expert_variety)
        reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
        sim_s += env.time
        lengths.append(steps)
        if not outcome.success:
            fails.append((s, outcome.reason))
        bar.set_postfix(success=f"{reasons.get('ok', 0)}/{len(lengths)}")
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    env.close()
    # Rendering cost: both 120x160 cameras per control step, the expert moving the arm.
    renv = SimCell(task, SimConfig(render=True))
    obs = renv.reset(seed)
    expert = make_expert(renv, seed)
    renv.observe()  # create the GL context outside the timing
    render_ms, render_cpu_ms = [], []
    for _ in range(render_steps):
        renv.config.render = False
        chunk = expert.predict(obs)
        obs = renv.step(chunk.actions[0])
        renv.config.render = True
        w, c = time.perf_counter(), time.process_time()
        obs = renv.observe()
        render_ms.append(1e3 * (time.perf_counter() - w))
        render_cpu_ms.append(1e3 * (time.process_time() - c))
    renv.close()
    return {
        "task": task,
        "episodes": episodes,
        "expert_success_rate": reasons.get("ok", 0) / episodes,
        "outcomes": reasons,
        "failed_seeds": fails,
        "mean_length_s": float(np.mean(lengths)) / env.config.control_hz,
        "physics_realtime_factor_wall": sim_s / wall,
        "physics_realtime_factor_cpu": sim_s / cpu,
        "render_both_cameras_ms_median": float(np.median(render_ms)),
        "render_both_cameras_cpu_ms_median": float(np.median(render_cpu_ms)),
        "load_average": os.getloadavg()[0],
    }


def snapshot(task: str, seed: int, out: Path, steps: int = 0) -> list[Path]:
    """PNGs of both cameras and the video view after ``steps`` expert steps (0 = right after reset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from carp_sim.env import SimCell
    from carp_sim.expert import make_expert

    out.mkdir(parents=True, exist_ok=True)
    with SimCell(task) as env:
        obs = env.reset(seed)
        expert = make_expert(env, seed)
        for _ in range(steps):
            obs = env.step(expert.predict(obs).actions[0])
        paths = []
        for cam, img in [*obs.images.items(), ("video", env.render_video_frame())]:
            p = out / f"{task}_seed{seed}_t{steps:03d}_{cam}.png"
            plt.imsave(p, img)
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    ap = argparse.ArgumentParser(
        prog="carp-sim", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="record expert demonstrations through the dataset writer")
    c.add_argument("--task", default="cup", help="cup, bowl, or a task YAML path")
    c.add_argument("--episodes", type=int, default=50)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--seed", type=int, default=0, help="first seed; attempt i uses seed + i")
    c.add_argument("--keep-failures", action="store_true", help="also save failed episodes (success=False)")
    c.add_argument("--image-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    variety_help = "expert ranges: the task YAML's expert: section (default) or the wide WIDE_VARIETY"
    c.add_argument("--expert-variety", choices=["task", "wide"], default="task", help=variety_help)
    b = sub.add_parser("bench", help="expert success rate (no rendering) and twin speed")
    b.add_argument("--task", default="cup")
    b.add_argument("--episodes", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", type=Path, help="also write the results here")
    b.add_argument("--expert-variety", choices=["task", "wide"], default="task", help=variety_help)
    s = sub.add_parser("snapshot", help="PNGs of the cameras")
    s.add_argument("--task", default="cup")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=0, help="expert steps before the snapshot")
    s.add_argument("--out", type=Path, default=Path("snapshots"))
    args = ap.parse_args(argv)
    return run_main("carp-sim", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "collect":
        r = collect(
            args.task,
            args.episodes,
            args.out,
            args.seed,
            args.keep_failures,
            tuple(args.image_size),
            expert_variety=args.expert_variety,
        )
        print(
            f"\ncollected {r['saved_episodes']} {r['task']} episodes ({r['frames']} frames) "
            f"in {r['out']}\n  expert success {r['expert_success_rate']:.1%} over "
            f"{r['attempts']} attempts {r['outcomes']}\n"
            f"  mean length {r['mean_length_steps']:.1f} steps, wall time {r['wall_s']:.1f} s"
        )
        return 0 if r["saved_episodes"] == args.episodes else 1
    if args.cmd == "bench":
        r = bench(args.task, args.episodes, args.seed, expert_variety=args.expert_variety)
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))
        print(
            f"\n{r['task']}: expert success {r['expert_success_rate']:.1%} over {r['episodes']} seeds "
            f"{r['outcomes']}\n  failed seeds: {r['failed_seeds']}\n"
            f"  mean episode {r['mean_length_s']:.1f} s sim\n"
            f"  physics (no rendering): {r['physics_realtime_factor_wall']:.1f}x real time wall, "
            f"{r['physics_realtime_factor_cpu']:.1f}x per CPU second\n"
            f"  both cameras 120x160: {r['render_both_cameras_ms_median']:.1f} ms wall, "
            f"{r['render_both_cameras_cpu_ms_median']:.1f} ms CPU per control step "
            f"(load average {r['load_average']:.1f})"
        )
        return 0
    for p in snapshot(args.task, args.seed, args.out, args.steps):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

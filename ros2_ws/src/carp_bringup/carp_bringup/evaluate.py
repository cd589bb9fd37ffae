"""The N-trial evaluation protocol (`carp-eval`).

observation -> policy -> the driver executes the first ``execute_steps`` of the chunk -> re-plan,
with the policy's real inference time accounted for: while the policy thinks, the world moves on
(the driver holds the arm at the end of what it was given), then the chunk goes to the driver core
the robot runs (``carp_hardware.driver.ArmDriver`` in the twin: ``SimCell.submit_chunk``), which
drops the steps whose time has passed, schedules the rest at their absolute times and checks every
target against the safety limits. The loop observes at each executed step's time.

The loop only talks to a :class:`Cell` (reset/submit_chunk/run_until/hold/outcome), so the same
protocol drives the MuJoCo twin and the real cell, where an operator resets the scene and judges
each trial (``robot_eval.RobotCell``, ``--cell robot``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carp_hardware.driver import EXECUTORS
from carp_policy.actions import ActionChunk, Observation, ObservationHistory, Policy
from carp_policy.cli import UserError, add_device_argument, run_main


class Cell(Protocol):
    """What the protocol needs from a cell: the twin's ``SimCell``, or the real cell with an
    operator. Chunks go to the cell's driver (``carp_hardware.driver.ArmDriver``), the loop runs
    time forward and observes."""

    time: float
    max_duration_s: float
    done: bool
    driver: Any  # carp_hardware.driver.ArmDriver, or its DriverProcess on a cell

    def reset(self, seed: int) -> Observation: ...
    def submit_chunk(self, chunk: ActionChunk): ...  # -> carp_hardware.driver.ChunkResult
    def run_until(self, t: float) -> Observation: ...
    def hold(self, seconds: float) -> None: ...
    def outcome(self): ...  # -> object with .success: bool and .reason: str


@dataclass
class EvalConfig:
    """Settings of one evaluation run."""

    task: str = "cup"
    trials: int = 20
    seed: int = 10_000  # trial i uses seed + i; keep it away from the data-collection seeds
    # of the 16 predicted steps, execute this many, then re-plan; None: the model's contract (its
    # manifest's execute_steps; 8 for the scripted expert)
    execute_steps: int | None = None
    # the driver's chunk executor (carp_hardware.driver.EXECUTORS): replace, or keyframe_ensemble
    # (Chain-of-Action's reverse temporal ensemble)
    executor: str = "replace"
    account_latency: bool = True  # let sim time pass while the policy computes
    # s: let this much sim time pass per chunk instead of the measured inference time (the same
    # rollouts on a loaded machine as on an idle one); None = the measured time
    sim_latency_s: float | None = None
    videos: int = 2  # rollout MP4s for the first N trials
    # shift ensemble (carp_policy.policies.base.EnsembleConfig): None runs the model's own setting
    ensemble_grid: int | None = None
    ensemble_radius: float = 0.0
    video_size: tuple[int, int] = (240, 320)
    rerun: str | None = None  # a .rrd file: the live view of every trial (carp_bringup.live_view)


@dataclass
class TrialResult:
    seed: int
    success: bool
    reason: str
    steps: int
    duration_s: float
    plans: int
    latency_ms: list[float] = field(default_factory=list)
    refused: int = 0  # chunks the driver refused (the arm stopped; the loop re-planned)
    refusals: dict[str, int] = field(default_factory=dict)  # the driver's refusals by reason
    object_xy: list[float] | None = None  # m, the object's start (the twin's layout; None on a robot)
    target_xy: list[float] | None = None  # m, the target area / pot centre


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_trial(
    cell: Cell,
    policy: Policy,
    seed: int,
    cfg: EvalConfig,
    frames: list[np.ndarray] | None = None,
    view=None,
) -> TrialResult:
    """Run one closed-loop episode and return its outcome. Appends video frames if a list is given;
    ``view`` (a ``live_view.LiveView``) gets every observation, chunk, refusal and the outcome.

    Every chunk goes through the cell's driver (``submit_chunk`` / ``run_until``): the same
    scheduling, latency compensation, interpolation and limits as on the robot."""
    obs = cell.reset(seed)
    policy.reset()
    driver = cell.driver  # an ArmDriver, or a DriverProcess on a cell: called by method only
    driver.set_executor(cfg.executor, cfg.execute_steps)  # its history cleared
    before = driver.refusal_counts()
    history = ObservationHistory(policy.obs_horizon, policy.obs_stride)
    stacked = history.push(obs)
    latencies: list[float] = []
    steps = plans = refused = 0

    def grab() -> None:
        if frames is not None:
            frames.append(cell.render_video_frame(*cfg.video_size))
        if view is not None:
            view.observation(stacked)

    if view is not None:
        view.start_trial(seed, cell.time)
    grab()
    while not cell.done and cell.time < cell.max_duration_s:
        t0 = time.perf_counter()
        chunk: ActionChunk = policy.predict(stacked)
        latency = time.perf_counter() - t0
        latencies.append(latency * 1e3)
        plans += 1
        if cfg.account_latency:  # the driver runs on: the arm holds at the end of the last chunk
            cell.hold(latency if cfg.sim_latency_s is None else cfg.sim_latency_s)
        result = cell.submit_chunk(chunk)
        if view is not None:
            view.chunk(chunk, result.kept if result.accepted else 0)
        if not result.accepted:  # refused whole (stale, unsafe): the arm stopped; re-plan
            refused += 1
            if view is not None:
                view.event(cell.time, f"chunk refused: {result.refusal}")
            stacked = history.push(cell.run_until(cell.time + chunk.dt))
            grab()
            continue
        # Observe at each executed step's time, as the policy was trained (one row per period).
        for t in chunk.step_times()[result.dropped : result.dropped + result.kept]:
            stacked = history.push(cell.run_until(t))
            steps += 1
            grab()
            if cell.done or cell.time >= cell.max_duration_s:
                break
    outcome = cell.outcome()
    after = driver.refusal_counts()
    layout = getattr(cell, "layout", None)  # the twin's: where this seed put the object and target
    if view is not None:
        said = "success" if outcome.success else "failure"
        view.event(cell.time, f"seed {seed}: {said} ({outcome.reason})", warning=not outcome.success)
    return TrialResult(
        seed=seed,
        success=bool(outcome.success),
        reason=str(outcome.reason),
        steps=steps,
        duration_s=float(cell.time),
        plans=plans,
        latency_ms=latencies,
        refused=refused,
        refusals={k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)},
        object_xy=None if layout is None else [float(v) for v in layout.object_xy],
        target_xy=None if layout is None else [float(v) for v in layout.target_xy],
    )


def load_policy(spec: str, device: str = "cpu", cfg: EvalConfig | None = None, spin: bool = True) -> Policy:
    """A trained run directory, an exported model directory, or a released model name, with the
    shift ensemble ``cfg`` asks for (the model's own when it asks for none). A model made for
    another task than ``cfg.task`` is refused (ValueError naming both)."""
    from carp_policy import load_policy as _load
    from carp_policy.policies.base import EnsembleConfig

    ensemble = None
    if cfg is not None and cfg.ensemble_grid is not None:
        ensemble = EnsembleConfig(grid=cfg.ensemble_grid, radius=cfg.ensemble_radius)
    policy = _load(spec, device=device, ensemble=ensemble, spin=spin)
    task, tasks = policy.contract.get("task"), policy.contract.get("tasks") or []
    if cfg is not None and (task or tasks):
        from carp_sim.tasks import TaskConfig

        ran = TaskConfig.load(cfg.task).name  # a variant (e.g. cup_beyond) is its task
        if tasks:  # a multi-task model: the task selects its embedding
            if ran not in tasks:
                raise ValueError(f"{spec} is a multi-task model for {tasks}, not {ran!r}")
            policy.select_task(ran)
        elif task != ran:
            raise ValueError(f"{spec} is a model for task {task!r}, not {ran!r} (use --task {task})")
    return policy


def _git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarize(results: list[TrialResult], cfg: EvalConfig, policy_name: str) -> dict:
    """The results.json payload: success with a Wilson interval, per-trial outcomes, latency percentiles."""
    n = len(results)
    k = sum(r.success for r in results)
    lat = np.array([x for r in results for x in r.latency_ms]) if results else np.zeros(0)
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return {
        "task": cfg.task,
        "policy": policy_name,
        "trials": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "wilson_95": list(wilson_interval(k, n)),
        "outcomes": reasons,
        "mean_episode_s": float(np.mean([r.duration_s for r in results])) if results else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "count": len(lat)},
        "config": asdict(cfg),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "commit": _git_commit(),
        "per_trial": [
            {k2: v for k2, v in asdict(r).items() if k2 != "latency_ms"}
            | {"latency_ms_p50": float(np.median(r.latency_ms)) if r.latency_ms else None}
            for r in results
        ],
    }


def plot_summary(summary: dict, results: list[TrialResult], path: Path) -> None:
    """One-page PNG: per-trial outcomes, failure reasons, latency histogram, episode lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    lo, hi = summary["wilson_95"]
    fig.suptitle(
        f"{summary['task']} | {summary['policy']} | success {summary['successes']}/{summary['trials']} "
        f"({100 * summary['success_rate']:.0f}%, 95% CI {100 * lo:.0f}-{100 * hi:.0f}%)"
    )
    ax = axes[0, 0]
    colors = ["tab:green" if r.success else "tab:red" for r in results]
    ax.bar(range(len(results)), [r.duration_s for r in results], color=colors)
    ax.set(xlabel="trial", ylabel="episode length (s)", title="trials (green = success)")
    ax = axes[0, 1]
    names = list(summary["outcomes"])
    ax.barh(names, [summary["outcomes"][n] for n in names], color="tab:blue")
    ax.set(xlabel="trials", title="outcome")
    ax = axes[1, 0]
    lat = [x for r in results for x in r.latency_ms]
    if lat:
        ax.hist(lat, bins=40, color="tab:purple")
    lm = summary["latency_ms"]
    ax.set(
        xlabel="policy latency (ms)",
        ylabel="chunks",
        title=f"latency p50 {lm['p50']:.1f} / p90 {lm['p90']:.1f} / p99 {lm['p99']:.1f} ms",
    )
    ax = axes[1, 1]
    ax.axis("off")
    rows = [
        [str(r.seed), "yes" if r.success else "no", r.reason, f"{r.duration_s:.1f}"] for r in results[:20]
    ]
    if rows:
        table = ax.table(
            cellText=rows,
            colLabels=["seed", "success", "reason", "s"],
            colWidths=[0.15, 0.13, 0.57, 0.15],  # outcome reasons run to ~30 characters
            cellLoc="center",
            loc="center",
        )
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_mp4(frames: list[np.ndarray], path: Path, fps: float = 10.0) -> None:
    """Encode RGB frames (H, W, 3) uint8 to an H.264 MP4 with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def evaluate(
    cfg: EvalConfig, policy_spec: str, out: Path, device: str = "cpu", sim_config=None, resume: bool = False
) -> dict:
    """Run ``cfg.trials`` trials in the twin and write results.json, summary.png and rollout MP4s
    (``resume``: keep the trials of an interrupted run in ``out`` and run the rest)."""
    from carp_sim.env import SimCell, SimConfig

    out.mkdir(parents=True, exist_ok=True)
    is_expert = policy_spec == "expert"
    policy = None if is_expert else load_policy(policy_spec, device=device, cfg=cfg)
    if cfg.execute_steps is None:  # what the model was made to run with, recorded in results.json
        cfg.execute_steps = 8 if policy is None else int(policy.contract["execute_steps"])
    if sim_config is None:  # render only the cameras the policy looks at (none for state policies)
        cams = () if policy is None else tuple(policy.cameras)
        sim_config = SimConfig(cameras=cams, render=bool(cams))
    cell = SimCell(task=cfg.task, config=sim_config)
    if is_expert:
        from carp_sim.expert import make_expert

        policy = lambda seed: make_expert(cell, seed)  # noqa: E731  (one expert per layout)
    try:
        return run_trials(cell, policy, cfg, out, policy_spec, resume=resume, extra={"cell": "sim"})
    finally:
        cell.close()


def run_trials(
    cell: Cell, policy, cfg: EvalConfig, out: Path, name: str, resume: bool = False, extra: dict | None = None
) -> dict:
    """The trials of ``cfg`` on ``cell`` (the twin, or a real cell with its operator).

    ``policy``: a Policy, or a function seed -> Policy (the scripted expert). Each trial is appended
    to ``out/trials.jsonl`` and results.json is rewritten as soon as it ends, so a crash loses no
    finished trial; ``resume`` keeps the trials already in trials.jsonl and runs the rest. The
    summary PNG is written at the end, or when the run stops early. Returns the summary."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    results: list[TrialResult] = []
    if resume and log.exists():
        results = [TrialResult(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]
    else:
        log.write_text("")
    done_seeds = {r.seed for r in results}
    view = None
    if cfg.rerun:
        from carp_bringup.live_view import LiveView

        view = LiveView(cfg.task, save=cfg.rerun)

    def write() -> dict:
        summary = summarize(results, cfg, name)
        from carp_policy.policies.ensemble import ShiftEnsemble

        ens = policy.config if isinstance(policy, ShiftEnsemble) else None
        summary["ensemble"] = {"grid": ens.grid, "radius": ens.radius} if ens else {"grid": 1, "radius": 0.0}
        summary.update(extra or {})
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        return summary

    bar = tqdm(range(cfg.trials), desc=f"eval {cfg.task}", unit="trial")
    try:
        for i in bar:
            seed = cfg.seed + i
            if seed in done_seeds:
                continue
            frames: list[np.ndarray] | None = [] if i < cfg.videos else None
            run_policy = policy(seed) if callable(policy) and not hasattr(policy, "predict") else policy
            r = run_trial(cell, run_policy, seed, cfg, frames, view)
            results.append(r)
            with log.open("a") as f:
                f.write(json.dumps(asdict(r)) + "\n")
            write()
            if frames:
                write_mp4(frames, out / f"rollout_{i:02d}_seed{seed}_{'ok' if r.success else 'fail'}.mp4")
            k = sum(x.success for x in results)
            bar.set_postfix(success=f"{k}/{len(results)}", last=r.reason)
    finally:
        if view is not None:
            view.close()
        if results:
            results.sort(key=lambda r: r.seed)
            plot_summary(write(), results, out / "summary.png")
    return write()


def print_summary(summary: dict, out: Path) -> None:
    lo, hi = summary["wilson_95"]
    lm = summary["latency_ms"]
    print(
        f"\n{summary['task']} with {summary['policy']}: {summary['successes']}/{summary['trials']} succeeded "
        f"({100 * summary['success_rate']:.0f}%, Wilson 95% CI {100 * lo:.0f}-{100 * hi:.0f}%)"
    )
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in summary["outcomes"].items()))
    ens = summary.get("ensemble", {"grid": 1})
    if ens["grid"] > 1:
        print(f"shift ensemble: {ens['grid']}x{ens['grid']} offsets within +-{100 * ens['radius']:.1f} cm")
    print(f"policy latency per chunk: p50 {lm['p50']:.2f} ms, p90 {lm['p90']:.2f} ms, p99 {lm['p99']:.2f} ms")
    print(f"mean episode {summary['mean_episode_s']:.1f} s; results in {out}/results.json, {out}/summary.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="carp-eval",
        description="Evaluate a policy on a task: in the MuJoCo twin (default), or on the cell with an "
        "operator who resets the scene and judges each trial (--cell robot; docs/robot.md).",
    )
    p.add_argument(
        "--task",
        default="cup",
        help="task (cup, bowl), a variant (cup_beyond, bowl_beyond: carp_sim/configs) or a task YAML",
    )
    p.add_argument(
        "--policy",
        required=True,
        help="'expert', a training run dir, an exported model dir, or a released model (models/NAME)",
    )
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=10_000, help="trial i uses seed+i (keep away from data seeds)")
    p.add_argument(
        "--execute-steps",
        type=int,
        default=None,
        help="steps of each 16-step chunk executed before re-planning (default: the model's own)",
    )
    p.add_argument(
        "--executor",
        choices=sorted(EXECUTORS),
        default="replace",
        help="the driver's chunk executor: replace (default), or keyframe_ensemble: Chain-of-Action's "
        "reverse temporal ensemble (chains aligned on their keyframe)",
    )
    p.add_argument(
        "--ensemble-grid",
        type=int,
        help="shift ensemble: an N x N grid of scene offsets averaged per chunk; 1 = off "
        "(default: the model's own setting)",
    )
    p.add_argument(
        "--ensemble-radius", type=float, default=0.0, help="m, half side of the --ensemble-grid offsets"
    )
    p.add_argument("--videos", type=int, default=2, help="write rollout MP4s for the first N trials")
    p.add_argument(
        "--no-latency", action="store_true", help="freeze sim time during inference (debugging only)"
    )
    p.add_argument(
        "--sim-latency-ms",
        type=float,
        help="let this much sim time pass per chunk instead of the measured inference time "
        "(reproducible rollouts on a loaded machine)",
    )
    p.add_argument(
        "--rerun",
        metavar="FILE.rrd",
        help="save a rerun recording of every trial (cameras, TCP path, chunks, refusals, outcomes); "
        "open it with `rerun FILE.rrd`",
    )
    p.add_argument(
        "--cell",
        choices=["sim", "robot", "live-twin"],
        default="sim",
        help="sim: the twin, as fast as the CPU allows (default); robot: the UR5e, the 2F-85 and the "
        "cameras of --cameras, with operator prompts; live-twin: the robot's protocol against the "
        "twin at wall-clock pace, the twin resetting the scene and judging (a rehearsal)",
    )
    p.add_argument("--robot-ip", default="192.168.1.102", help="--cell robot: the UR controller")
    p.add_argument("--gripper-port", type=int, default=63352, help="--cell robot: the Robotiq URCap's port")
    p.add_argument("--limits", help="--cell robot: safety limits YAML (default: the shipped ur5e limits)")
    p.add_argument("--cameras", help="--cell robot: cameras YAML (carp_hardware.cameras; docs/recording.md)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the trials already in OUT/trials.jsonl (an interrupted run) and run the rest",
    )
    add_device_argument(p)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.trials < 1:
        p.error("--trials must be >= 1")
    if a.execute_steps is not None and not 1 <= a.execute_steps <= 16:
        p.error("--execute-steps must be in 1..16")
    cfg = EvalConfig(
        task=a.task,
        trials=a.trials,
        seed=a.seed,
        execute_steps=a.execute_steps,
        executor=a.executor,
        account_latency=not a.no_latency,
        sim_latency_s=None if a.sim_latency_ms is None else a.sim_latency_ms / 1e3,
        videos=a.videos,
        ensemble_grid=a.ensemble_grid,
        ensemble_radius=a.ensemble_radius,
        rerun=a.rerun,
    )

    if a.cell != "sim" and a.policy == "expert":
        p.error("the scripted expert reads the twin's scene: it runs with --cell sim only")

    def body() -> int:
        try:
            if a.cell == "sim":
                summary = evaluate(cfg, a.policy, a.out, device=a.device, resume=a.resume)
            else:
                from carp_bringup.robot_eval import CellError, evaluate_on_cell

                try:
                    summary = evaluate_on_cell(
                        cfg, a.policy, a.out, a.cell, a.device, a.robot_ip, a.gripper_port, a.limits,
                        a.cameras, a.resume,
                    )  # fmt: skip
                except CellError as e:
                    raise UserError(f"{e}; the judged trials are in {a.out}/trials.jsonl (--resume)") from e
        except KeyError as e:  # an unknown task or camera name
            raise UserError(str(e)) from e
        print_summary(summary, a.out)
        return 0

    return run_main("carp-eval", body)


if __name__ == "__main__":
    sys.exit(main())

"""The cup (or bowl) task in the twin through the ROS 2 nodes: success and frame-to-servo latency.

    python benchmarks/ros_task.py --task cup --trials 20 --seed 10000 [--model cup] [--out DIR]

Starts the node set with ``carp-launch <task>_task use_sim:=true`` (the driver node with the twin
as its backend, paced to the wall clock, and the policy node), watches ``/sim/episode``, and starts
the next episode through ``/sim/reset`` when one ends (success held, or the task's timeout). From
``/diagnostics`` it reads the driver's observation age at chunk arrival (the newest sample's capture
time to the moment the driver accepted the chunk; the first servo command follows within one servo
period) and the policy node's inference time. Writes ``ros_<task>.json`` (machine, commit, per-trial
outcomes, latency percentiles) and ``ros_<task>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info


def _value(text: str):
    """A diagnostics value: JSON where it parses (the driver's), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cup")
    ap.add_argument("--model", default=None, help="default: the released model of the task")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=10000, help="trial i uses seed + i (as carp-eval)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ros"))
    ap.add_argument("--startup-s", type=float, default=120.0)
    ap.add_argument("--camera-fps", type=float, default=0.0, help="twin camera fps (0: none)")
    args = ap.parse_args()

    os.environ.setdefault("ROS_DOMAIN_ID", str(50 + os.getpid() % 50))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from carp_sim.tasks import TaskConfig

    max_s = TaskConfig.load(args.task).max_duration_s
    cmd = [sys.executable, "-m", "carp_bringup.launcher", f"{args.task}_task", "use_sim:=true",
           f"seed:={args.seed - 1}", f"model:={args.model or args.task}", "device:=cpu",
           f"sim_camera_fps:={args.camera_fps}"]  # fmt: skip
    log_path = args.out / f"ros_{args.task}.log"
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    launch = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    node = rclpy.create_node("ros_task_benchmark")
    episode: dict = {}
    ages, inference = [], []

    def on_episode(m) -> None:
        episode.update(json.loads(m.data))

    def on_diag(m) -> None:
        for st in m.status:
            kv = {v.key: _value(v.value) for v in st.values}
            if st.name == "ur5e_driver" and isinstance(kv.get("obs_age_s"), dict) and kv["obs_age_s"]["last"]:
                ages.append(kv["obs_age_s"]["last"])
            if st.name == "policy_node" and kv.get("inference_ms_p50") not in (None, "nan"):
                inference.append(float(kv["inference_ms_p50"]))

    node.create_subscription(String, "/sim/episode", on_episode, 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    reset = node.create_client(Trigger, "/sim/reset")
    results = []
    t_start = time.monotonic()
    try:
        deadline = time.monotonic() + args.startup_s
        while not episode and time.monotonic() < deadline and launch.poll() is None:
            rclpy.spin_once(node, timeout_sec=0.1)
        if not episode:
            raise RuntimeError(f"no /sim/episode within {args.startup_s:.0f} s; see {log_path}")
        # the first episode started with the driver, while the policy node was still loading: wait
        # for the policy's first decision, then start the first counted episode afresh
        while not inference and time.monotonic() < deadline and launch.poll() is None:
            rclpy.spin_once(node, timeout_sec=0.1)
        fut = reset.call_async(Trigger.Request())
        rclpy.spin_until_future_complete(node, fut, timeout_sec=30)
        episode.clear()
        while not episode and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        seed = episode["seed"]
        while len(results) < args.trials:
            if launch.poll() is not None:
                raise RuntimeError(f"the node set exited (code {launch.returncode}); see {log_path}")
            rclpy.spin_once(node, timeout_sec=0.05)
            if episode.get("seed") != seed:
                continue
            if episode["done"] or episode["sim_time"] >= max_s:
                results.append({"seed": seed, "success": bool(episode["success"] and episode["done"]),
                                "reason": episode["reason"], "sim_time": episode["sim_time"]})  # fmt: skip
                print(f"trial {len(results)}/{args.trials} seed {seed}: {results[-1]['reason']}", flush=True)
                if len(results) < args.trials:
                    fut = reset.call_async(Trigger.Request())
                    rclpy.spin_until_future_complete(node, fut, timeout_sec=30)
                    seed += 1
    finally:
        launch.send_signal(signal.SIGINT)
        try:
            launch.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launch.kill()
        node.destroy_node()
        rclpy.shutdown()
        log.close()
    wall = time.monotonic() - t_start
    ok = sum(r["success"] for r in results)
    a = np.asarray(ages) * 1e3
    summary = {
        "benchmark": "ros_task",
        "machine": machine_info(),
        "task": args.task,
        "model": args.model or args.task,
        "seeds": [r["seed"] for r in results],
        "success": ok,
        "trials": len(results),
        "trial_results": results,
        "obs_age_at_driver_ms": (
            {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": int(a.size)}
            if a.size
            else None
        ),
        "policy_inference_ms_p50": float(np.median(inference)) if inference else None,
        "wall_s": wall,
    }
    (args.out / f"ros_{args.task}.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].bar(["success", "failure"], [ok, len(results) - ok], color=["tab:green", "tab:red"])
    ax[0].set_title(f"{args.task} through ROS: {ok}/{len(results)}")
    if a.size:
        ax[1].hist(a, bins=30)
        ax[1].set_xlabel("observation age when the driver accepts the chunk (ms)")
    fig.tight_layout()
    fig.savefig(args.out / f"ros_{args.task}.png", dpi=100)
    print(f"{args.task} through ROS: {ok}/{len(results)} succeeded; observation age at the driver "
          f"p50 {summary['obs_age_at_driver_ms'] and summary['obs_age_at_driver_ms']['p50']:.1f} ms; "
          f"wall {wall:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

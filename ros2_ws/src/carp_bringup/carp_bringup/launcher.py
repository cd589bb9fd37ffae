"""``carp-launch``: start a node set (``config/<name>.yaml``) as processes, without a ROS CLI.

    carp-launch cup_task [--sim] [name:=value ...]

The same nodes, parameters and conditions as ``ros2 launch carp_bringup <name>.launch.py``: both
read the node-set YAML (``carp_bringup.nodeset``). Each node runs as its console script with
``--ros-args``; output lines are prefixed with the node's name. When one node exits, the others are
stopped (a dead policy or driver must not leave the rest running); Ctrl-C stops all and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points

from carp_bringup.nodeset import NodeSet, NodeSpec, load
from carp_policy.cli import UserError, run_main

STOP_TIMEOUT_S = 10.0


def node_command(ns: NodeSet, node: NodeSpec, values: dict[str, str]) -> list[str]:
    """The command line of one node: its console script's function under this Python, with the
    node name, the parameters file and the parameters as ``--ros-args``."""
    eps = [e for e in entry_points(group="console_scripts") if e.name == node.executable]
    if not eps:
        raise UserError(
            f"{node.name}: no console script {node.executable!r} installed (package {node.package}); "
            "run `make setup`"
        )
    module, func = eps[0].value.split(":")
    cmd = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]
    cmd += ["--ros-args", "-r", f"__node:={node.name}"]
    if node.params_file:
        cmd += ["--params-file", str(ns.path.parent / node.params_file)]
    for k, v in ns.parameters(node, values).items():
        cmd += ["-p", f"{k}:={v}"]
    return cmd


def _pump(name: str, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()


def run(name: str, overrides: dict[str, str], duration: float | None = None) -> int:
    """Start the node set and supervise it. Returns 0 after Ctrl-C (or ``duration`` seconds), else
    the exit code of the first node that ended on its own."""
    ns = load(name)
    values = ns.resolve(overrides)
    nodes = ns.active_nodes(values)
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    procs: list[tuple[NodeSpec, subprocess.Popen]] = []
    settings = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"carp-launch {name}: {', '.join(n.name for n in nodes)} ({settings})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rc = 0
    try:
        for n in nodes:
            p = subprocess.Popen(node_command(ns, n, values), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            threading.Thread(target=_pump, args=(n.name, p.stdout), daemon=True).start()
            procs.append((n, p))
        t_end = None if duration is None else time.monotonic() + duration
        while not stop.is_set():
            ended = [(n, p) for n, p in procs if p.poll() is not None]
            if ended:
                n, p = ended[0]
                rc = p.returncode or 1
                print(f"carp-launch: {n.name} exited with code {p.returncode}; stopping the rest", flush=True)
                break
            if t_end is not None and time.monotonic() >= t_end:
                break
            stop.wait(0.1)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # rclpy nodes shut down cleanly on SIGINT
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for n, p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"carp-launch: {n.name} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it", flush=True)
                p.kill()
                p.wait()
    return rc


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``name:=value`` words -> dict (the ros2 launch syntax)."""
    out = {}
    for it in items:
        if ":=" not in it:
            raise UserError(f"launch arguments are name:=value, got {it!r}")
        k, v = it.split(":=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carp-launch", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="node set: cup_task, bowl_task (config/<name>.yaml), or a YAML path")
    ap.add_argument("arguments", nargs="*", help="launch arguments as name:=value")
    ap.add_argument("--sim", action="store_true", help="same as use_sim:=true")
    ap.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = ap.parse_args(argv)

    def body() -> int:
        overrides = parse_overrides(args.arguments)
        if args.sim:
            overrides["use_sim"] = "true"
        return run(args.name, overrides, args.duration)

    return run_main("carp-launch", body)


if __name__ == "__main__":
    sys.exit(main())

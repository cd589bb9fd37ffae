"""Node sets: which nodes a task runs, with which parameters, in one YAML per launch file.

``config/<name>.yaml`` is the single source of a launch: ``launch/<name>.launch.py`` turns it into a
standard launch_ros description (``launch_description``), and ``carp-launch <name>`` starts the same
nodes as plain processes on machines without a ROS CLI (``carp_bringup.launcher``). A file holds:

    arguments:            # every launch argument, with a default and a description
      use_sim: {default: "true", description: "run against the MuJoCo twin instead of the robot"}
    nodes:
      - name: policy_node
        package: carp_policy
        executable: policy_node            # lib/<package>/<executable> (colcon) = a console script
        if: use_sim                        # optional: start only if the argument is true
        unless: use_sim                    # optional: start only if it is false
        parameters: {model: "${model}", execute_steps: "${execute_steps}"}
        params_file: policy.yaml           # optional: a YAML beside this file (ROS parameter format)

``${arg}`` in a parameter value is replaced by the argument's value (strings; the node's parameter
declaration gives the type). Parsed strictly: an unknown key is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def config_dir() -> Path:
    """The installed ``share/carp_bringup/config`` (colcon, or the venv's ament layout), else the
    source tree's ``config/``."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            d = Path(get_package_share_directory("carp_bringup")) / "config"
            if d.is_dir():
                return d
        except (PackageNotFoundError, OSError):  # not installed, or no AMENT_PREFIX_PATH
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "config"

_REF = re.compile(r"\$\{(\w+)\}")
TRUE = ("true", "1", "yes", "on")


@dataclass
class Argument:
    """A launch argument (``name:=value`` on the command line)."""

    name: str
    default: str
    description: str


@dataclass
class NodeSpec:
    """One node of a set."""

    name: str
    package: str
    executable: str
    parameters: dict[str, Any] = field(default_factory=dict)
    params_file: str | None = None
    if_arg: str | None = None
    unless_arg: str | None = None


@dataclass
class NodeSet:
    """A parsed node-set file."""

    name: str
    path: Path
    arguments: list[Argument]
    nodes: list[NodeSpec]

    def resolve(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Argument values: the defaults with ``overrides`` applied (unknown names refused)."""
        values = {a.name: a.default for a in self.arguments}
        for k, v in (overrides or {}).items():
            if k not in values:
                raise ValueError(f"{self.name}: unknown launch argument {k!r} (known: {sorted(values)})")
            values[k] = str(v)
        return values

    def active_nodes(self, values: dict[str, str]) -> list[NodeSpec]:
        """The nodes whose ``if`` / ``unless`` conditions hold for these argument values."""
        out = []
        for n in self.nodes:
            if n.if_arg and values[n.if_arg].lower() not in TRUE:
                continue
            if n.unless_arg and values[n.unless_arg].lower() in TRUE:
                continue
            out.append(n)
        return out

    def parameters(self, node: NodeSpec, values: dict[str, str]) -> dict[str, str]:
        """The node's parameters with ``${arg}`` replaced by the argument values."""
        return {k: substitute(v, values) for k, v in node.parameters.items()}


def substitute(value: Any, values: dict[str, str]) -> str:
    """``${arg}`` references in a parameter value -> the argument's value (as a string)."""
    return _REF.sub(lambda m: values[m.group(1)], str(value))


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(allowed)})")


def load(name_or_path: str | Path) -> NodeSet:
    """A node-set YAML by launch name (``cup_task``) or path; strict keys, references checked."""
    p = Path(name_or_path)
    if not p.exists():
        p = config_dir() / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(f.stem for f in config_dir().glob("*.yaml") if "nodes:" in f.read_text())
        raise FileNotFoundError(f"no node set {name_or_path!r} (known: {', '.join(known)})")
    raw = yaml.safe_load(p.read_text()) or {}
    _check_keys(raw, {"arguments", "nodes"}, str(p))
    args = []
    for k, a in (raw.get("arguments") or {}).items():
        _check_keys(a, {"default", "description"}, f"{p}: argument {k}")
        if not a.get("description"):
            raise ValueError(f"{p}: argument {k} needs a description")
        args.append(Argument(k, str(a.get("default", "")), str(a["description"])))
    names = {a.name for a in args}
    nodes = []
    for i, n in enumerate(raw.get("nodes") or []):
        where = f"{p}: node {i}"
        _check_keys(n, {"name", "package", "executable", "parameters", "params_file", "if", "unless"}, where)
        spec = NodeSpec(
            name=n["name"],
            package=n["package"],
            executable=n["executable"],
            parameters=dict(n.get("parameters") or {}),
            params_file=n.get("params_file"),
            if_arg=n.get("if"),
            unless_arg=n.get("unless"),
        )
        refs = {m for v in spec.parameters.values() for m in _REF.findall(str(v))}
        refs |= {c for c in (spec.if_arg, spec.unless_arg) if c}
        missing = refs - names
        if missing:
            raise ValueError(f"{where} ({spec.name}) refers to undeclared argument(s) {sorted(missing)}")
        if spec.params_file and not (p.parent / spec.params_file).exists():
            raise FileNotFoundError(f"{where} ({spec.name}): params_file {spec.params_file} not found")
        nodes.append(spec)
    return NodeSet(p.stem, p, args, nodes)


def launch_description(name: str):
    """A launch_ros ``LaunchDescription`` of the node set: every argument declared with its default
    and description, each node a ``launch_ros.actions.Node`` with its conditions and parameters, and
    the whole launch shut down when any node exits (a dead node must not leave the arm commanded)."""
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
    from launch.conditions import IfCondition, UnlessCondition
    from launch.event_handlers import OnProcessExit
    from launch.events import Shutdown
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    ns = load(name)
    actions: list = [DeclareLaunchArgument(a.name, default_value=a.default, description=a.description)
                     for a in ns.arguments]  # fmt: skip

    def subst(value: Any) -> Any:
        # a plain value stays a plain value: launch_ros reads a list of strings as a list parameter
        if not _REF.search(str(value)):
            return value
        parts, pos, s = [], 0, str(value)
        for m in _REF.finditer(s):
            parts += [s[pos : m.start()], LaunchConfiguration(m.group(1))]
            pos = m.end()
        parts.append(s[pos:])
        return [x for x in parts if x != ""]

    for n in ns.nodes:
        params: list = [{k: subst(v) for k, v in n.parameters.items()}]
        if n.params_file:
            params.insert(0, str(ns.path.parent / n.params_file))
        condition = (
            IfCondition(LaunchConfiguration(n.if_arg)) if n.if_arg
            else UnlessCondition(LaunchConfiguration(n.unless_arg)) if n.unless_arg
            else None
        )  # fmt: skip
        node = Node(package=n.package, executable=n.executable, name=n.name, parameters=params,
                    output="screen", condition=condition)  # fmt: skip
        actions.append(node)
        stop_all = EmitEvent(event=Shutdown(reason=f"{n.name} exited"))
        actions.append(RegisterEventHandler(OnProcessExit(target_action=node, on_exit=[stop_all])))
    return LaunchDescription(actions)

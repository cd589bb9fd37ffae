"""Task definitions of the twin: randomisation ranges (from YAML) and success checks with reasons.

cup:  pick the cup from the left/middle of the table, put it upright inside the right-hand target
      area, release, retreat. Success: upright, inside the area, resting on the table, released,
      arm clear.
bowl: pick the small bowl and put it in the pot. Success: bowl inside the pot, released.

Both tasks sample the object poses, the target / pot position and a small arm start-pose noise from
a ``numpy.random.Generator`` seeded by the episode seed, so a seed fixes the whole episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from carp_hardware.kinematics import HOME_Q, IKError, ik_nearest, pose_matrix
from carp_policy.yaml_config import from_dict, load_yaml
from carp_sim.cell import (
    BOWL_APOTHEM,
    BOWL_HEIGHT,
    CUP_HEIGHT,
    CUP_RADIUS,
    FINGER_TIP_BELOW_TCP,
    POT_FLOOR,
    POT_INNER_RADIUS,
    TABLE_CENTER,
    TABLE_HALF,
    TARGET_RADIUS,
    CellLayout,
)

CONFIG_DIR = Path(__file__).parent / "configs"
TASKS = ("cup", "bowl")
# Top-down gripper orientation: tool z points down; yaw turns about world z.
DOWN = np.diag([1.0, -1.0, -1.0])


def top_down(yaw: float) -> np.ndarray:
    """Rotation of a gripper pointing straight down, turned by ``yaw`` about world z, (3, 3)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ DOWN


@dataclass
class TaskConfig:
    """Randomisation ranges and limits of one task (every range is [low, high], metres / radians)."""

    name: str = "cup"
    object_x: tuple[float, float] = (-0.55, -0.40)  # cup / bowl start position
    object_y: tuple[float, float] = (0.0, 0.25)
    # A band of object_y where no object starts ([low, high]; () = none): demonstrations with a
    # region in the middle left out, for a held-out evaluation there (cup_holed / cup_middle).
    object_y_exclude: tuple[float, ...] = ()
    object_yaw: tuple[float, float] = (-3.14159, 3.14159)
    target_x: tuple[float, float] = (-0.52, -0.45)  # cup target area / pot centre
    target_y: tuple[float, float] = (-0.28, -0.22)
    home_tcp: tuple[float, float, float] = (-0.40, 0.0, 0.30)  # arm start TCP position (points down)
    start_pos_noise: float = 0.02  # m, uniform per axis on the start TCP
    start_yaw_noise: float = 0.15  # rad
    max_duration_s: float = 25.0
    success_hold_s: float = 0.5  # success must hold this long before the episode is done
    max_tilt_deg: float = 12.0  # cup counts as upright below this tilt
    arm_clear_m: float = 0.04  # fingertips this far above the object's rim (or to the side) = clear
    lift_m: float = 0.03  # the object must have been lifted this far off the table (pushing is no grasp)
    expert: dict = field(default_factory=dict)  # expert variety ranges (see expert.py)

    @classmethod
    def load(cls, name_or_path: str | Path) -> TaskConfig:
        """A task by name (``cup``, ``bowl``, or a packaged variant such as ``cup_beyond``: the YAML
        in carp_sim/configs) or from a YAML file path.

        A variant names its task in ``variant_of`` and lists only what differs from it (e.g. the
        object's range for layouts no demonstration had); it is that task, so a model made for the
        task runs on it."""
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = CONFIG_DIR / f"{name_or_path}.yaml"
            if not path.exists():
                known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
                raise ValueError(f"unknown task {str(name_or_path)!r}; known tasks and variants: {known}")
        if not path.exists():
            raise FileNotFoundError(f"task config {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        base = raw.pop("variant_of", None) if isinstance(raw, dict) else None
        if base is None:
            cfg = load_yaml(cls, path)
        else:
            if base not in TASKS:
                raise ValueError(f"{path}: variant_of must be one of {', '.join(TASKS)}, got {base!r}")
            merged = {**(yaml.safe_load((CONFIG_DIR / f"{base}.yaml").read_text()) or {}), **raw}
            try:
                cfg = from_dict(cls, merged)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from e
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the problem if a range is malformed, off the table or out of reach."""
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; known tasks: {', '.join(TASKS)}")
        for key in ("object_x", "object_y", "object_yaw", "target_x", "target_y"):
            lo, hi = getattr(self, key)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"task {self.name}: range {key}={[lo, hi]} must be finite with low <= high")
        ex = tuple(self.object_y_exclude)
        if ex and not (len(ex) == 2 and self.object_y[0] < ex[0] < ex[1] < self.object_y[1]):
            raise ValueError(
                f"task {self.name}: object_y_exclude={list(ex)} must be a band [low, high] strictly "
                f"inside object_y={list(self.object_y)}"
            )
        tx, ty = TABLE_CENTER
        hx, hy = TABLE_HALF
        for what, xs, ys in (
            ("object", self.object_x, self.object_y),
            ("target", self.target_x, self.target_y),
        ):
            if (
                min(xs) < tx - hx + 0.1
                or max(xs) > tx + hx - 0.1
                or min(ys) < ty - hy + 0.1
                or max(ys) > ty + hy - 0.1
            ):
                raise ValueError(
                    f"task {self.name}: {what} range x={list(xs)} y={list(ys)} leaves the table "
                    f"(x in [{tx - hx + 0.1:.2f}, {tx + hx - 0.1:.2f}], "
                    f"y in [{ty - hy + 0.1:.2f}, {ty + hy - 0.1:.2f}])"
                )
        # Every corner of the ranges must be reachable top-down at grasp and at carry height.
        for what, xs, ys in (
            ("object", self.object_x, self.object_y),
            ("target", self.target_x, self.target_y),
        ):
            for x in xs:
                for y in ys:
                    for z in (0.03, 0.30):
                        try:
                            ik_nearest(pose_matrix([x, y, z], top_down(0.0)), HOME_Q)
                        except IKError as exc:
                            raise ValueError(
                                f"task {self.name}: {what} range corner ({x:.3f}, {y:.3f}) is unreachable "
                                f"for the UR5e at z={z}: {exc}"
                            ) from exc
        if self.max_duration_s <= 0:
            raise ValueError(f"task {self.name}: max_duration_s must be > 0")

    @property
    def layout(self) -> CellLayout:
        return (
            CellLayout(cup=True, target_area=True) if self.name == "cup" else CellLayout(bowl=True, pot=True)
        )


@dataclass
class TaskOutcome:
    """Result of a success check: ``reason`` is "ok" on success, else what is wrong."""

    success: bool
    reason: str


@dataclass
class EpisodeLayout:
    """What the seed decided: object pose, target / pot centre, arm start TCP pose."""

    object_xy: np.ndarray
    object_yaw: float
    target_xy: np.ndarray
    start_tcp: np.ndarray  # (4, 4)


def sample_layout(cfg: TaskConfig, rng: np.random.Generator) -> EpisodeLayout:
    """Draw one episode's layout; objects never start overlapping the target area / pot."""
    target = np.array([rng.uniform(*cfg.target_x), rng.uniform(*cfg.target_y)])
    for _ in range(100):
        obj = np.array([rng.uniform(*cfg.object_x), rng.uniform(*cfg.object_y)])
        ex = cfg.object_y_exclude
        if ex and ex[0] <= obj[1] <= ex[1]:
            continue  # the held-out band (a draw only where a band is set: other layouts unchanged)
        if np.linalg.norm(obj - target) > 0.2:
            break
    else:
        raise ValueError(f"task {cfg.name}: object range always overlaps the target range")
    start = pose_matrix(
        np.asarray(cfg.home_tcp) + rng.uniform(-cfg.start_pos_noise, cfg.start_pos_noise, 3),
        top_down(rng.uniform(-cfg.start_yaw_noise, cfg.start_yaw_noise)),
    )
    return EpisodeLayout(obj, float(rng.uniform(*cfg.object_yaw)), target, start)


# ----------------------------------------------------------------------------- success checks
@dataclass(frozen=True)
class SceneSnapshot:
    """What the success checks read from the cell at one instant (the twin measures all of it).

    The checks are pure functions of a snapshot and the task, so they can be tested on hand-made
    states and do not depend on the simulator."""

    object_pos: np.ndarray  # (3,) base of the task object, m
    object_rot: np.ndarray  # (3, 3) its orientation
    tcp_pos: np.ndarray  # (3,) TCP position, m
    target_xy: np.ndarray  # (2,) centre of the target area / pot
    gripper_contact: bool  # a gripper geom touches the task object
    lifted_m: float = 0.0  # the highest the object has been above its start height this episode


def _tilt_deg(rot: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(rot[2, 2], -1.0, 1.0))))


def _off_table(pos: np.ndarray) -> bool:
    tx, ty = TABLE_CENTER
    hx, hy = TABLE_HALF
    return pos[2] < -0.05 or abs(pos[0] - tx) > hx or abs(pos[1] - ty) > hy


def check(cfg: TaskConfig, s: SceneSnapshot) -> TaskOutcome:
    """Evaluate a scene snapshot against the task's success conditions.

    Both tasks: the object was lifted (``lift_m``: a push into the area is not a pick), released,
    and the fingertips are clear of it. Cup: upright, its whole footprint inside the target area,
    resting on the table. Bowl: inside the pot, resting on its floor. (``SimCell`` also requires the
    success to hold for ``success_hold_s``.)"""
    name = cfg.name
    pos, rot = s.object_pos, s.object_rot
    if _off_table(pos):
        return TaskOutcome(False, f"{name} fell off table")
    tcp = s.tcp_pos
    tip_z = tcp[2] - FINGER_TIP_BELOW_TCP
    target = s.target_xy
    if name == "cup":
        if _tilt_deg(rot) > cfg.max_tilt_deg:
            return TaskOutcome(False, "cup tipped")
        if np.linalg.norm(pos[:2] - target) + CUP_RADIUS > TARGET_RADIUS:
            return TaskOutcome(False, "cup outside target area")
        if s.gripper_contact:
            return TaskOutcome(False, "cup still held")
        if pos[2] > 0.01:
            return TaskOutcome(False, "cup not resting on table")
        if s.lifted_m < cfg.lift_m:
            return TaskOutcome(False, "cup never lifted")
        rim, radius = pos[2] + CUP_HEIGHT, CUP_RADIUS
    else:
        if (
            np.linalg.norm(pos[:2] - target) > POT_INNER_RADIUS - BOWL_APOTHEM + 0.01
            or pos[2] > POT_FLOOR + 0.02
        ):
            return TaskOutcome(False, "bowl not in pot")
        if s.gripper_contact:
            return TaskOutcome(False, "bowl still held")
        if s.lifted_m < cfg.lift_m:
            return TaskOutcome(False, "bowl never lifted")
        rim, radius = pos[2] + BOWL_HEIGHT, BOWL_APOTHEM
    horizontal = np.linalg.norm(tcp[:2] - pos[:2])
    if tip_z < rim + cfg.arm_clear_m and horizontal < radius + 0.06:
        return TaskOutcome(False, "arm not clear")
    return TaskOutcome(True, "ok")


def unrecoverable(cfg: TaskConfig, s: SceneSnapshot) -> str | None:
    """A reason if the episode cannot succeed any more (object off the table, cup lying down)."""
    name = cfg.name
    pos, rot = s.object_pos, s.object_rot
    if _off_table(pos):
        return f"{name} fell off table"
    if name == "cup" and _tilt_deg(rot) > 60.0 and not s.gripper_contact:
        return "cup tipped"
    return None

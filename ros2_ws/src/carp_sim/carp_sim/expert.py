"""Scripted experts: privileged waypoint plans executed through the same control seam as a policy.

At its first ``predict`` of an episode the expert reads the object pose from the twin and plans
top-down waypoints (approach, descend, grasp, lift, carry, place, release, retreat). Between
waypoints the TCP follows a minimum-jerk profile. ``predict`` returns the plan sampled at the 16
step times after the observation, so the expert is a ``Policy`` like any learned one and can run
through the evaluation loop. Variety between episodes (speeds, approach / carry heights, grasp
height and yaw, pauses, place point) comes from a generator seeded by the episode seed, within the
ranges of ``WIDE_VARIETY`` updated by the task YAML's ``expert:`` section.

The shipped tasks narrow every range to one value (a consistent expert). Why: CARP predicts the D
per-dimension tokens of a scale in parallel, so when the demonstrations of one state disagree (a high
or a low approach, fast or slow), x, y and z can each pick a different mode. With the wide ranges the
policy started its descent before it was above the cup and tipped it (docs/results.md).
They also keep pauses short and the gripper fast: while the arm waits and the fingers are blocked by
the object the observed state stands still, and a wait longer than the steps a policy executes per
chunk stalled it there. ``carp-sim collect --expert-variety wide`` records the varied demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carp_policy.actions import CHUNK_HORIZON, ActionChunk, Observation, pose_to_vector
from carp_sim.cell import BOWL_SIDES, GRIPPER_STROKE, POT_FLOOR
from carp_sim.env import SimCell
from carp_sim.tasks import top_down

# Every random choice of a plan, as [low, high]. The first four are drawn first, in this order.
WIDE_VARIETY = {
    "speed": (0.25, 0.40),  # m/s in free space; descents run at half speed
    "approach_height": (0.07, 0.14),  # m above the grasp point
    "carry_height": (0.20, 0.27),  # TCP height while carrying (bowl: WIDE_PER_TASK)
    "pause": (0.15, 0.4),  # s, dwell before/after gripper actions
    "pause_factor": (0.5, 1.0),  # the dwell before closing / opening is pause x this
    "place_jitter": (-0.015, 0.015),  # m, per axis, on the place point in the target area
    "grasp_yaw": (-0.4, 0.4),  # rad from the start yaw (cup: any yaw grips; bowl: nearest flat)
    "place_yaw": (-0.3, 0.3),  # rad from the grasp yaw
    "retreat": (0.12, 0.18),  # m, rise after the release
    "grip_time": (0.6, 0.6),  # s, the gripper command ramps between open and closed in this time
}
WIDE_PER_TASK = {  # grasp_z: TCP height on the cup / on the bowl wall
    "cup": {"grasp_z": (0.05, 0.065)},
    "bowl": {"grasp_z": (0.026, 0.032), "carry_height": (0.22, 0.28)},
}
EPISODE_KEYS = ("speed", "approach_height", "carry_height", "pause")


@dataclass
class Waypoint:
    t: float  # absolute sim time the TCP should arrive, s
    pos: np.ndarray  # (3,)
    yaw: float  # rad, top-down gripper yaw
    gripper: float  # opening command, m


class ScriptedExpert:
    """Waypoint expert for the cup and bowl tasks; implements ``carp_policy.actions.Policy``."""

    obs_horizon = 1
    obs_stride = 1
    cameras: tuple[str, ...] = ()

    def __init__(self, env: SimCell, seed: int, horizon: int = CHUNK_HORIZON, variety: str = "task") -> None:
        """``variety``: "task" (the task YAML's ``expert:`` ranges over the wide ones) or "wide"."""
        if variety not in ("task", "wide"):
            raise ValueError(f"expert variety must be 'task' or 'wide', got {variety!r}")
        self.env = env
        self.seed = int(seed)
        self.horizon = horizon
        self.dt = 1.0 / env.config.control_hz
        self.variety = {**WIDE_VARIETY, **WIDE_PER_TASK[env.task.name]}
        # bowl: turn the grasp yaw onto the nearest pair of flats. The bowl's yaw is not in the
        # environment state, so a state policy cannot see why the yaw differs between demonstrations.
        self.snap_to_flats = True
        if variety == "task":
            ranges = dict(env.task.expert)
            self.snap_to_flats = bool(ranges.pop("snap_to_flats", True))
            unknown = set(ranges) - set(self.variety)
            if unknown:
                raise ValueError(f"task {env.task.name}: unknown expert keys {sorted(unknown)}")
            self.variety.update({k: tuple(v) for k, v in ranges.items()})
        for key, (lo, hi) in self.variety.items():
            if not lo <= hi:
                raise ValueError(f"expert range {key}={[lo, hi]} needs low <= high")
        self.plan: list[Waypoint] | None = None

    def reset(self) -> None:
        """Forget the plan; the next predict plans from the scene as it is then."""
        self.plan = None

    def predict(self, observation: Observation) -> ActionChunk:
        """The plan sampled at the ``horizon`` step times after ``observation.timestamp``."""
        if self.plan is None:
            self.plan = self._make_plan(observation)
        t0 = observation.timestamp
        actions = np.stack([self.sample(t0 + (i + 1) * self.dt) for i in range(self.horizon)])
        return ActionChunk(actions=actions, timestamp=t0, dt=self.dt)

    def sample(self, t: float) -> np.ndarray:
        """The 10-number action of the plan at time ``t`` (holds the last waypoint after the end)."""
        wps = self.plan
        if t <= wps[0].t:
            a = b = wps[0]
            s = 0.0
        elif t >= wps[-1].t:
            a = b = wps[-1]
            s = 1.0
        else:
            i = next(k for k in range(1, len(wps)) if wps[k].t >= t)
            a, b = wps[i - 1], wps[i]
            tau = (t - a.t) / max(b.t - a.t, 1e-9)
            s = tau**3 * (10 - 15 * tau + 6 * tau**2)  # minimum-jerk profile
        pos = (1 - s) * a.pos + s * b.pos
        yaw = (1 - s) * a.yaw + s * b.yaw
        grip = (1 - s) * a.gripper + s * b.gripper  # gripper moves linearly in time
        if b is not a:
            tau = (t - a.t) / max(b.t - a.t, 1e-9)
            grip = (1 - tau) * a.gripper + tau * b.gripper
        return pose_to_vector(pos, top_down(yaw), grip)

    # ------------------------------------------------------------------ planning
    def _make_plan(self, obs: Observation) -> list[Waypoint]:
        rng = np.random.default_rng([self.seed, 7])  # own stream: the layout uses the plain seed
        r = self.variety
        v = {k: float(rng.uniform(*r[k])) for k in EPISODE_KEYS}
        # choices added later draw from a stream of their own, so older ones keep their values
        grip_time = float(np.random.default_rng([self.seed, 8]).uniform(*r["grip_time"]))
        state = np.asarray(obs.state).reshape(-1, 10)[-1]
        start = state[:3].copy()
        start_yaw = float(np.arctan2(state[4], state[3]))  # tool x axis = (cos yaw, sin yaw, 0)
        obj, rot = self.env.object_pose()
        target_xy = self.env.layout.target_xy + rng.uniform(*r["place_jitter"], 2)
        if self.env.task.name == "cup":
            grasp_z = float(rng.uniform(*r["grasp_z"]))  # TCP height on the cup (height 0.10)
            yaw = start_yaw + float(rng.uniform(*r["grasp_yaw"]))  # the cup is round: any yaw grips
            place_z = grasp_z + 0.004
        else:
            grasp_z = float(rng.uniform(*r["grasp_z"]))  # TCP height on the bowl wall (height 0.045)
            # Close on two opposite flats: tool y must be normal to a wall, i.e. yaw = bowl yaw mod 30 deg.
            bowl_yaw = float(np.arctan2(rot[1, 0], rot[0, 0]))
            step = 2 * np.pi / BOWL_SIDES
            pref = start_yaw + float(rng.uniform(*r["grasp_yaw"]))
            yaw = bowl_yaw + step * round((pref - bowl_yaw) / step) if self.snap_to_flats else pref
            place_z = grasp_z + POT_FLOOR + 0.008
        place_yaw = yaw + float(rng.uniform(*r["place_yaw"]))
        grasp = np.array([obj[0], obj[1], grasp_z])
        above = grasp + np.array([0.0, 0.0, v["approach_height"]])
        carry_z = max(v["carry_height"], above[2])
        place = np.array([target_xy[0], target_xy[1], place_z])

        wps = [Waypoint(obs.timestamp, start, start_yaw, GRIPPER_STROKE)]

        def go(pos, yaw_, grip, speed=v["speed"], extra=0.0) -> None:
            last = wps[-1]
            dist = np.linalg.norm(pos - last.pos) + 0.1 * abs(yaw_ - last.yaw)
            dur = 1.5 * dist / speed + 0.15 + extra  # min-jerk peaks at 1.875x its mean speed
            wps.append(Waypoint(last.t + dur, np.asarray(pos, float), float(yaw_), grip))

        def wait(seconds, grip=None) -> None:
            last = wps[-1]
            g = last.gripper if grip is None else grip
            wps.append(Waypoint(last.t + seconds, last.pos, last.yaw, g))

        open_, closed = GRIPPER_STROKE, 0.0
        go(above, yaw, open_)
        go(grasp, yaw, open_, speed=0.5 * v["speed"])
        wait(v["pause"] * rng.uniform(*r["pause_factor"]))
        wait(grip_time, grip=closed)  # close
        wait(v["pause"])
        go([grasp[0], grasp[1], carry_z], yaw, closed, speed=0.6 * v["speed"])
        go([place[0], place[1], carry_z], place_yaw, closed)
        go(place, place_yaw, closed, speed=0.5 * v["speed"])
        wait(v["pause"] * rng.uniform(*r["pause_factor"]))
        wait(grip_time, grip=open_)  # release
        wait(0.2)
        go(place + np.array([0.0, 0.0, rng.uniform(*r["retreat"])]), place_yaw, open_, speed=0.6 * v["speed"])
        return wps


def make_expert(env: SimCell, seed: int, variety: str = "task") -> ScriptedExpert:
    """The scripted expert for ``env``'s task (cup or bowl), with episode variety from ``seed``."""
    if env.task.name not in ("cup", "bowl"):
        raise ValueError(f"no scripted expert for task {env.task.name!r}")
    return ScriptedExpert(env, seed, variety=variety)


def run_expert_episode(env: SimCell, seed: int, replan_every: int = 1, on_step=None, variety: str = "task"):
    """Reset ``env`` with ``seed`` and run the expert in closed loop until done or time out.

    ``on_step(obs, action)`` is called with the observation an action was computed from and the
    action itself (what a recorder stores). Returns the outcome and the number of steps.
    """
    obs = env.reset(seed)
    expert = make_expert(env, seed, variety)
    expert.reset()
    steps = 0
    chunk = None
    while not env.done and env.time < env.max_duration_s:
        if chunk is None or steps % replan_every == 0:
            chunk, k = expert.predict(obs), 0
        action = chunk.actions[k]
        k += 1
        if on_step is not None:
            on_step(obs, action)
        obs = env.step(action)
        steps += 1
    return env.outcome(), steps

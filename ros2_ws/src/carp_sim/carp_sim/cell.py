# ruff: noqa: E501  (MJCF templates read best one element per line)
"""The UR5e cell as an MJCF scene built in code from primitives (no meshes, no downloads).

World frame = robot base frame (DH frame 0, as the UR controller reports poses); the table top is
the plane z = 0 and the workspace lies at x < 0 (where the UR5e reaches with shoulder pan ~ 0).
"Left" is +y, "right" is -y.

The arm's kinematic chain is the DH chain itself: body i+1 sits at Tz(d_i) Tx(a_i) Rx(alpha_i) in
body i and every joint turns about its body's z axis, so MuJoCo's forward kinematics equals
``carp_hardware.kinematics.fk`` exactly. Link geometry (capsules/cylinders) is visual only; the
gripper (palm, fingers, pads), the table and the objects collide. Full meshes are not used because
they render ~7x slower on a CPU (docs/design.md, "The MuJoCo twin").
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from carp_hardware.kinematics import DH_A, DH_ALPHA, DH_D, JOINT_LIMITS, TCP_OFFSET

# Gripper (2F-85-like): each finger slides 0..STROKE/2 along the tool y axis.
GRIPPER_STROKE = 0.085
FINGER_TIP_BELOW_TCP = 0.015  # fingertips reach this far past the TCP along tool z
# Cup: a solid cylinder collides (stabler grip than a ring of boxes); walls are drawn on top.
CUP_RADIUS, CUP_HEIGHT, CUP_MASS = 0.03, 0.10, 0.12
# Bowl: a 12-sided ring of box walls on a disc (the gripper closes on two opposite flats).
BOWL_APOTHEM, BOWL_HEIGHT, BOWL_WALL, BOWL_SIDES, BOWL_MASS = 0.036, 0.045, 0.006, 12, 0.10
# Pot: static, a ring of box walls on a floor disc.
POT_INNER_RADIUS, POT_HEIGHT, POT_WALL, POT_FLOOR, POT_SIDES = 0.085, 0.075, 0.01, 0.01, 16
TABLE_CENTER, TABLE_HALF = (-0.45, 0.0), (0.4, 0.55)  # table top extent in x, y (m)
TARGET_RADIUS = 0.07  # cup target area (drawn as a flat disc)

# Link masses (kg) from the UR5e datasheet model; arm inertia comes from the capsules.
LINK_MASSES = (3.761, 8.058, 2.846, 1.37, 1.3, 0.365)
ARM_KP = (10000.0, 10000.0, 6000.0, 1500.0, 1500.0, 1500.0)  # N m / rad, stiff joint servos
ARM_KV = (400.0, 400.0, 250.0, 50.0, 50.0, 50.0)  # ~critically damped with the armature below
ARM_ARMATURE = (1.0, 1.0, 0.5, 0.3, 0.3, 0.3)  # reflected rotor inertia of the harmonic drives
FINGER_KP, FINGER_KV, FINGER_FORCE = 400.0, 8.0, 40.0


@dataclass(frozen=True)
class CellLayout:
    """Which objects the scene holds (each task builds only what it uses)."""

    cup: bool = False
    target_area: bool = False
    bowl: bool = False
    pot: bool = False


def _fmt(v) -> str:
    return " ".join(f"{x:.6g}" for x in np.ravel(v))


def _quat_rx(angle: float) -> np.ndarray:
    return np.array([np.cos(angle / 2), np.sin(angle / 2), 0.0, 0.0])


def _ring(name: str, apothem: float, height: float, wall: float, sides: int, z0: float, rgba: str) -> str:
    """Box walls of a regular polygon (flats facing outwards at angles k * 2pi / sides)."""
    half_side = (apothem + wall) * np.tan(np.pi / sides) + 1e-4
    out = []
    for k in range(sides):
        a = 2 * np.pi * k / sides
        c = (apothem + wall / 2) * np.array([np.cos(a), np.sin(a)])
        quat = [np.cos(a / 2), 0, 0, np.sin(a / 2)]
        out.append(
            f'<geom name="{name}_wall{k}" type="box" size="{wall / 2:.5g} {half_side:.5g} {height / 2:.5g}" '
            f'pos="{c[0]:.5g} {c[1]:.5g} {z0 + height / 2:.5g}" quat="{_fmt(quat)}" rgba="{rgba}"/>'
        )
    return "\n".join(out)


def _look_at(pos: np.ndarray, target: np.ndarray) -> str:
    """MJCF xyaxes of a camera at ``pos`` looking at ``target`` with world z up."""
    f = (target - pos) / np.linalg.norm(target - pos)
    x = np.cross(f, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    return _fmt(np.concatenate([x, np.cross(x, f)]))


def _arm_xml() -> str:
    """The six-link DH chain, flange, 2F-85-like gripper, wrist camera and TCP site."""
    # Visual link shapes in each body's frame (the body frame is DH frame i-1 turned by q_i).
    # Offsets along z mimic the real arm's shoulder/elbow offsets; they do not change kinematics.
    visuals = [
        '<geom type="cylinder" size="0.06 0.06" pos="0 0 0.09" rgba="0.25 0.55 0.85 1"/>',
        '<geom type="cylinder" size="0.06 0.07" pos="0 0 0.07" rgba="0.25 0.55 0.85 1"/>'
        '<geom type="capsule" size="0.05" fromto="0 0 0.138 -0.425 0 0.138" rgba="0.7 0.7 0.72 1"/>'
        '<geom type="cylinder" size="0.055 0.07" pos="-0.425 0 0.07" rgba="0.25 0.55 0.85 1"/>',
        '<geom type="capsule" size="0.04" fromto="0 0 0.01 -0.392 0 0.01" rgba="0.7 0.7 0.72 1"/>',
        '<geom type="cylinder" size="0.045 0.06" pos="0 0 0.075" rgba="0.25 0.55 0.85 1"/>',
        '<geom type="cylinder" size="0.045 0.055" pos="0 0 0.045" rgba="0.25 0.55 0.85 1"/>',
        '<geom type="cylinder" size="0.045 0.04" pos="0 0 0.06" rgba="0.25 0.55 0.85 1"/>',
    ]
    pad = 'type="box" friction="1.5 0.02 0.001" condim="4" margin="0.0005" rgba="0.15 0.15 0.15 1"'
    finger = 'type="box" rgba="0.55 0.55 0.6 1"'
    fl = TCP_OFFSET - 0.065  # finger root along tool z; fingers end FINGER_TIP_BELOW_TCP past the TCP
    flen = (TCP_OFFSET + FINGER_TIP_BELOW_TCP - fl) / 2
    gripper = f"""
      <body name="flange" pos="0 0 {DH_D[5]}" gravcomp="1">
        <geom type="cylinder" size="0.04 0.015" pos="0 0 0.015" rgba="0.2 0.2 0.2 1" contype="0" conaffinity="0"/>
        <geom name="palm" type="box" size="0.03 0.045 0.035" pos="0 0 {fl - 0.035:.4f}" rgba="0.2 0.2 0.22 1"/>
        <site name="tcp" pos="0 0 {TCP_OFFSET}" size="0.004" rgba="1 0 0 0.6" group="4"/>
        <camera name="wrist" pos="0.085 0 0.06" xyaxes="0 1 0 {np.cos(0.3):.4f} 0 {np.sin(0.3):.4f}" fovy="75"/>
        <geom type="box" size="0.02 0.025 0.015" pos="0.07 0 0.045" rgba="0.1 0.1 0.1 1" contype="0" conaffinity="0"/>
        <body name="finger_left" pos="0 0 0">
          <joint name="finger_left" type="slide" axis="0 1 0" range="0 {GRIPPER_STROKE / 2}" damping="2" armature="0.01"/>
          <inertial pos="0 0.01 {fl + flen:.4f}" mass="0.05" diaginertia="2e-5 2e-5 1e-5"/>
          <geom name="pad_left" {pad} size="0.011 0.004 {flen * 0.6:.4f}" pos="0 0.004 {fl + 1.4 * flen:.4f}"/>
          <geom name="finger_left" {finger} size="0.011 0.005 {flen:.4f}" pos="0 0.013 {fl + flen:.4f}"/>
        </body>
        <body name="finger_right" pos="0 0 0">
          <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {GRIPPER_STROKE / 2}" damping="2" armature="0.01"/>
          <inertial pos="0 -0.01 {fl + flen:.4f}" mass="0.05" diaginertia="2e-5 2e-5 1e-5"/>
          <geom name="pad_right" {pad} size="0.011 0.004 {flen * 0.6:.4f}" pos="0 -0.004 {fl + 1.4 * flen:.4f}"/>
          <geom name="finger_right" {finger} size="0.011 0.005 {flen:.4f}" pos="0 -0.013 {fl + flen:.4f}"/>
        </body>
      </body>"""
    # Build the chain from the inside out.
    inner = gripper
    for i in reversed(range(6)):
        lo, hi = JOINT_LIMITS[i]
        body = f"""
    <body name="link{i + 1}" gravcomp="1">
      <joint name="joint{i + 1}" axis="0 0 1" range="{lo:.6f} {hi:.6f}" armature="{ARM_ARMATURE[i]}" damping="1"/>
      <inertial pos="0 0 0" mass="{LINK_MASSES[i]}" diaginertia="{_fmt(_link_inertia(i))}"/>
      {visuals[i].replace("<geom ", '<geom contype="0" conaffinity="0" ')}
      {inner}
    </body>"""
        if i > 0:  # body i+1 placed at DH transform of link i (theta = 0) inside body i
            pos = (DH_A[i - 1], 0.0, DH_D[i - 1])
            body = body.replace(
                f'<body name="link{i + 1}"',
                f'<body name="link{i + 1}" pos="{_fmt(pos)}" quat="{_fmt(_quat_rx(DH_ALPHA[i - 1]))}"',
                1,
            )
        inner = body
    return inner


def _link_inertia(i: int) -> np.ndarray:
    """Rough diagonal inertia (kg m^2) of link i: long links as rods, wrist links as small cylinders."""
    m = LINK_MASSES[i]
    length = [0.1, 0.425, 0.392, 0.1, 0.1, 0.05][i]
    return np.array([m * length**2 / 12 + 0.01, m * length**2 / 12 + 0.01, 0.01 + 0.002 * m])


def build_mjcf(
    layout: CellLayout, physics_dt: float = 0.002, max_render: tuple[int, int] = (480, 640)
) -> str:
    """The whole scene as an MJCF string (arm, gripper, table, cameras and the layout's objects)."""
    tx, ty = TABLE_CENTER
    hx, hy = TABLE_HALF
    scene_cam = np.array([-1.1, 0.0, 0.62])
    objects = []
    if layout.cup:
        # Cup walls drawn as a thin ring of boxes over an invisible solid collision cylinder.
        walls = _ring("cupvis", CUP_RADIUS - 0.004, CUP_HEIGHT, 0.004, 16, 0.0, "0.85 0.25 0.2 1")
        walls = walls.replace("<geom ", '<geom contype="0" conaffinity="0" mass="0" ')
        objects.append(f"""
    <body name="cup" pos="-0.45 0.1 0">
      <freejoint name="cup"/>
      <geom name="cup" type="cylinder" size="{CUP_RADIUS} {CUP_HEIGHT / 2}" pos="0 0 {CUP_HEIGHT / 2}"
            mass="{CUP_MASS}" friction="1.0 0.01 0.001" condim="4" rgba="0.85 0.25 0.2 1" group="3"/>
      <geom type="cylinder" size="{CUP_RADIUS - 0.003} 0.002" pos="0 0 {CUP_HEIGHT - 0.002}" mass="0"
            contype="0" conaffinity="0" rgba="0.35 0.08 0.05 1"/>
      {walls}
    </body>""")
    if layout.target_area:
        objects.append(
            f'<body name="target" pos="-0.5 -0.25 0"><geom name="target" type="cylinder" '
            f'size="{TARGET_RADIUS} 0.0005" pos="0 0 0.0005" rgba="0.2 0.75 0.3 1" contype="0" conaffinity="0"/></body>'
        )
    if layout.bowl:
        # Walls start just above the floor's underside so only the floor disc touches the table
        # (12 wall boxes on the table would add ~50 contacts and triple the cost of a physics step).
        ring = _ring(
            "bowl",
            BOWL_APOTHEM - BOWL_WALL,
            BOWL_HEIGHT - 0.002,
            BOWL_WALL,
            BOWL_SIDES,
            0.002,
            "0.95 0.8 0.2 1",
        )
        objects.append(
            f"""
    <body name="bowl" pos="-0.45 0.1 0">
      <freejoint name="bowl"/>
      <geom name="bowl_floor" type="cylinder" size="{BOWL_APOTHEM} 0.003" pos="0 0 0.003" rgba="0.9 0.75 0.2 1"/>
      {ring}
    </body>""".replace(
                "<geom ", f'<geom density="{_bowl_density():.1f}" friction="1.0 0.01 0.001" condim="4" '
            )
        )
    if layout.pot:
        ring = _ring("pot", POT_INNER_RADIUS, POT_HEIGHT, POT_WALL, POT_SIDES, 0.0, "0.3 0.3 0.35 1")
        objects.append(f"""
    <body name="pot" pos="-0.5 -0.25 0">
      <geom name="pot_floor" type="cylinder" size="{POT_INNER_RADIUS + POT_WALL} {POT_FLOOR / 2}"
            pos="0 0 {POT_FLOOR / 2}" rgba="0.25 0.25 0.3 1"/>
      {ring}
    </body>""")
    ox, oy = max_render
    return f"""
<mujoco model="carp_ur5e_cell">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{physics_dt}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <global offwidth="{oy}" offheight="{ox}"/>
    <quality shadowsize="0"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1="0.55 0.65 0.8" rgb2="0.2 0.22 0.25" width="64" height="64"/>
    <texture name="wood" type="2d" builtin="checker" rgb1="0.72 0.6 0.45" rgb2="0.68 0.56 0.42" width="64" height="64"/>
    <material name="table" texture="wood" texrepeat="6 8"/>
  </asset>
  <default>
    <geom solref="0.004 1" solimp="0.95 0.99 0.001"/>
  </default>
  <worldbody>
    <light pos="-0.4 0.3 1.8" dir="0 -0.1 -1" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" rgba="0.35 0.35 0.38 1"/>
    <geom name="table" type="box" size="{hx} {hy} 0.02" pos="{tx} {ty} -0.02" material="table" friction="0.8 0.01 0.001"/>
    <geom name="pedestal" type="cylinder" size="0.08 0.02" pos="0 0 0.02" rgba="0.2 0.2 0.2 1"/>
    <camera name="scene" pos="{_fmt(scene_cam)}" xyaxes="{_look_at(scene_cam, np.array([-0.42, 0.0, 0.03]))}" fovy="48"/>
    {_arm_xml()}
    {"".join(objects)}
  </worldbody>
  <contact>
    <exclude body1="finger_left" body2="finger_right"/>
  </contact>
  <actuator>
    {"".join(f'<position name="joint{i + 1}" joint="joint{i + 1}" kp="{ARM_KP[i]}" kv="{ARM_KV[i]}"/>' for i in range(6))}
    <position name="finger_left" joint="finger_left" kp="{FINGER_KP}" kv="{FINGER_KV}" ctrlrange="0 {GRIPPER_STROKE / 2}" forcerange="-{FINGER_FORCE} {FINGER_FORCE}"/>
    <position name="finger_right" joint="finger_right" kp="{FINGER_KP}" kv="{FINGER_KV}" ctrlrange="0 {GRIPPER_STROKE / 2}" forcerange="-{FINGER_FORCE} {FINGER_FORCE}"/>
  </actuator>
</mujoco>"""


def _bowl_density() -> float:
    """Density (kg/m^3) that gives the bowl's geoms a total mass of BOWL_MASS."""
    side = 2 * BOWL_APOTHEM * np.tan(np.pi / BOWL_SIDES)
    volume = BOWL_SIDES * BOWL_WALL * side * BOWL_HEIGHT + np.pi * BOWL_APOTHEM**2 * 0.006
    return BOWL_MASS / volume


def build_model(layout: CellLayout, physics_dt: float = 0.002) -> mujoco.MjModel:
    """Compile the scene; raises ValueError with MuJoCo's message if the MJCF is invalid."""
    try:
        return mujoco.MjModel.from_xml_string(build_mjcf(layout, physics_dt))
    except Exception as exc:  # mujoco raises a bare ValueError/FatalError; say where it came from
        raise ValueError(f"building the cell MJCF failed: {exc}") from exc

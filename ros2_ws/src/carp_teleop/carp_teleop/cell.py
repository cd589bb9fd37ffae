"""The robot side of ``carp-record``: the UR5e through the driver package's ``ArmDriver`` (its
``command_pose`` and ``SafetyLimits``) behind ``TeleopArm``. Until that driver is installed, the
recorder runs in the twin only."""

from __future__ import annotations


def open_cell_arm() -> str:
    """Why the cell cannot be opened here (a sentence for the user)."""
    try:
        import carp_hardware.driver  # noqa: F401
    except ImportError:
        return "the UR5e driver (carp_hardware.driver) is not installed here; record in the twin with --sim"
    return "the UR5e adapter for carp-record is not wired to carp_hardware.driver yet; use --sim"

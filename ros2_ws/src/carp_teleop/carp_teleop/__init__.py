"""carp_teleop: SpaceMouse reader, teleoperation node and demonstration recorder node."""

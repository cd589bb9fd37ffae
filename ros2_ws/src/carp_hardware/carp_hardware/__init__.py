"""carp_hardware: Camera node, UR5e driver node (+ Robotiq 2F-85), UR5e kinematics and safety limits."""

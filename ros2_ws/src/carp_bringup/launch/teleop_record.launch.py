"""ros2 launch carp_bringup teleop_record.launch.py operator:=NAME [use_sim:=true] [out:=data/cup] ...

Record demonstrations by SpaceMouse through the ROS nodes (driver, cameras, spacemouse, teleop,
recorder); the nodes, arguments and defaults are in config/teleop_record.yaml (shared with
carp-launch teleop_record). `ros2 launch carp_bringup teleop_record.launch.py --show-args` lists them.
"""

from carp_bringup.nodeset import launch_description


def generate_launch_description():
    return launch_description("teleop_record")

"""ros2 launch carp_bringup teleop_record.launch.py [use_sim:=true] task:=cup out:=data/cup operator:=NAME

SpaceMouse teleoperation and the demonstration recorder; the node set is config/teleop_record.yaml
(shared with carp-launch teleop_record).
"""

from carp_bringup.nodeset import launch_description


def generate_launch_description():
    return launch_description("teleop_record")

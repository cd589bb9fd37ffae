"""ros2 launch carp_bringup cup_task.launch.py [use_sim:=true] [model:=...] [robot_ip:=...]

The cup task's node set; the nodes, arguments and defaults are in config/cup_task.yaml (shared
with carp-launch cup_task). `ros2 launch carp_bringup cup_task.launch.py --show-args` lists them.
"""

from carp_bringup.nodeset import launch_description


def generate_launch_description():
    return launch_description("cup_task")

"""ros2 launch carp_bringup bowl_task.launch.py [use_sim:=true] [model:=...] [robot_ip:=...]

The bowl task's node set; the nodes, arguments and defaults are in config/bowl_task.yaml (shared
with carp-launch bowl_task). `ros2 launch carp_bringup bowl_task.launch.py --show-args` lists them.
"""

from carp_bringup.nodeset import launch_description


def generate_launch_description():
    return launch_description("bowl_task")

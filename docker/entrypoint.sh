#!/usr/bin/env bash
# Source ROS 2 and the workspace, put the venv first, then run the command (default: the cup task).
set -e
. /opt/ros/jazzy/setup.bash
. /opt/carp/ros2_ws/install/setup.bash
export PATH=/opt/carp/venv/bin:$PATH
exec "$@"

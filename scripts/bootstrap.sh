#!/usr/bin/env bash
# Creates .venv with everything the stack needs and installs the ROS 2 packages editable.
# Idempotent: a stamp file records what was installed; re-running with nothing changed is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
PKGS=(carp_policy carp_sim carp_hardware carp_teleop carp_bringup)

stamp_input() {
  cat requirements.txt scripts/bootstrap.sh scripts/ament_develop.py
  if [ -f ../shared/ros2-launch/SOURCES.txt ]; then cat ../shared/ros2-launch/SOURCES.txt; fi
  for p in "${PKGS[@]}"; do cat "ros2_ws/src/$p/setup.py"; done
}
want=$(stamp_input | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.carp-stamp" ] && [ "$(cat "$VENV/.carp-stamp")" = "$want" ]; then
  # the ament layout links follow the tree (a new launch/ or config/ folder): refresh them, quietly
  "$VENV/bin/python" scripts/ament_develop.py "$VENV" > /dev/null
  exit 0
fi

# Shared libraries of the device wheels: pyrealsense2 loads libusb, pyspacemouse (easyhid) hidapi.
APT_PKGS=(libusb-1.0-0 libhidapi-hidraw0 libhidapi-libusb0)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[bootstrap] apt-get install ${missing[*]}"
    apt-get install -y -qq "${missing[@]}" || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
  else
    echo "[bootstrap] warning: missing apt packages ${missing[*]} (sudo apt-get install ${missing[*]}); cameras and the SpaceMouse need them" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# torch 2.14.1 + torchvision 0.29.1: a CUDA build that also runs on CPU (code stays compatible with torch 2.11).
echo "[bootstrap] installing torch (first run takes a few minutes)"
pip install -q "torch==2.14.1" "torchvision==0.29.1"
echo "[bootstrap] installing requirements"
pip install -q -r requirements.txt
echo "[bootstrap] installing the workspace packages (editable)"
args=()
for p in "${PKGS[@]}"; do args+=(-e "ros2_ws/src/$p"); done
pip install -q --no-deps "${args[@]}"
# The ROS 2 launch system is not on PyPI: where the shared test copy of its sources exists, install it
# (ros2 launch, launch_ros; tests that need it skip with a reason elsewhere).
LAUNCH_SRC="$ROOT/../shared/ros2-launch/install.sh"
if [ -f "$LAUNCH_SRC" ]; then
  echo "[bootstrap] installing the ROS 2 launch system from ../shared/ros2-launch"
  bash "$LAUNCH_SRC" "$VENV"
fi
"$VENV/bin/python" scripts/ament_develop.py "$VENV"
echo "$want" > "$VENV/.carp-stamp"
echo "[bootstrap] ready: $VENV"

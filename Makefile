# Entry points of the repository. Every target sets up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup demo demo-ros test lint
setup:
	@bash scripts/bootstrap.sh

demo: setup
	@bash scripts/demo.sh

# The cup task in the twin through the ROS 2 nodes (driver node with the twin, policy node).
demo-ros: setup
	$(PY) benchmarks/ros_task.py --task cup --trials $${TRIALS:-5} --seed $${SEED:-10000} --out $${OUT:-out/demo_ros}

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25

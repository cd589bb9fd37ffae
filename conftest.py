"""Fixtures shared by every test directory (``testpaths`` in pyproject.toml)."""

from __future__ import annotations

import os
import signal
import subprocess
import zlib

import pytest


@pytest.fixture()
def ros_env(tmp_path, request) -> dict[str, str]:
    """The environment for one test's ROS 2 processes and in-test rclpy contexts: DDS on localhost
    only, Fast DDS, a ROS home in the test's folder and a domain id of the test's own (so nodes a
    failed test left behind never talk to the next one). Also set in ``os.environ`` for the test and
    restored after it."""
    env = {
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(1 + zlib.crc32(request.node.nodeid.encode()) % 100),
        "ROS_HOME": str(tmp_path / "ros"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield dict(os.environ)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """SIGINT (a node's Ctrl-C) if it still runs, then its whole output; killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.fixture()
def one_thread():
    """One torch intra-op thread for a test that trains a tiny model: as fast as two, and immune to
    OpenMP's contention cliff (two threads beside any other busy process ran 20x slower here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def stop():
    """``stop_process`` for tests (a fixture: test modules cannot import each other here)."""
    return stop_process

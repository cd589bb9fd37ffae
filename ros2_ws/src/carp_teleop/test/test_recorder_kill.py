"""kill -9 of a running ``carp-record --sim`` at random moments loses at most the episode in
progress: the dataset validates and holds every episode the recorder reported saved (the pattern
of carp_policy's test_dataset_kill, on the whole recorder process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carp_policy.dataset import DatasetWriter, EpisodeDataset, validate_dataset

# short episodes (the recorder saves at max_episode_s), loose stream limits for a shared CI CPU
ARGS = [
    "--task",
    "cup",
    "--operator",
    "kill-test",
    "--sim",
    "--input",
    "scripted",
    "--set",
    "max_episode_s=0.8",
    "--set",
    "max_frame_age=0.5",
    "--set",
    "max_skew=0.5",
]


@pytest.mark.slow
def test_kill9_of_the_recorder_loses_at_most_the_episode_in_progress(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(int(time.time()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    reported = 0
    for trial in range(3):
        cmd = [
            sys.executable,
            "-m",
            "carp_teleop.record",
            "--out",
            str(root),
            "--seed",
            str(100 * trial),
            *ARGS,
        ]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        saved_here = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the first save of this process
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"recorder exited early: {proc.returncode}"
            if "SAVED episode" in line:
                saved_here += 1
                break
        assert saved_here, "the recorder saved nothing within 60 s"
        time.sleep(rng.uniform(0.0, 1.5))  # then kill it at a random moment
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.communicate()[1]
        saved_here += rest.count("SAVED episode")
        reported += saved_here
        rep = validate_dataset(root)
        assert rep.ok, rep.errors
        ds = EpisodeDataset(root)
        # one more than reported if the kill landed between the commit and the message
        assert reported <= len(ds) <= reported + 1
        for i in range(len(ds)):
            ep = ds.episode(i)
            assert len(ep.state) == ep.metadata["frames"] == len(ep.images["wrist"])
        reported = len(ds)
        print(f"trial {trial}: {saved_here} saved by this process, {len(ds)} in the dataset")
    with DatasetWriter(
        root,
        fps=10.0,
        cameras={"wrist": (120, 160), "scene": (120, 160)},
        env_state_names=EpisodeDataset(root).info["features"]["observation.environment_state"]["names"],
    ):
        pass  # a writer opening it repairs what the kills left
    rep = validate_dataset(root)
    assert rep.ok and not rep.warnings, rep

"""kill -9 of a real recording process at random moments never corrupts the dataset."""

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

H, W = 32, 48
CAMS = {"wrist": (H, W), "scene": (H, W)}

# The child records short episodes back to back (content is a function of the episode number, so
# the parent can check every saved episode bit for bit) and prints "saved N" after each commit.
CHILD = r"""
import sys, numpy as np
from carp_policy.dataset import DatasetWriter
sys.path.insert(0, sys.argv[2])
from test_dataset_kill import episode_content, CAMS
with DatasetWriter(sys.argv[1], fps=10.0, cameras=CAMS) as w:
    k = w.num_episodes
    while True:
        st, act, imgs = episode_content(k)
        w.begin_episode(task=f"task {k % 3}")
        for t in range(len(st)):
            w.add_frame(0.1 * t, {c: imgs[c][t] for c in CAMS}, st[t], act[t])
        w.save_episode(success=k % 2 == 0, metadata={"k": k})
        print("saved", k, flush=True)
        k += 1
"""


def episode_content(k: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Deterministic episode number k: (state (T, 10), action (T, 10), images cam -> (T, H, W, 3))."""
    rng = np.random.default_rng(k)
    T = 4 + k % 5
    imgs = {c: np.repeat(rng.integers(0, 255, (T, 1, 1, 3), dtype=np.uint8), H, 1).repeat(W, 2) for c in CAMS}
    return rng.normal(size=(T, 10)), rng.normal(size=(T, 10)), imgs


def check_intact(root: Path, saved: int) -> int:
    """The dataset loads, validates, and holds every episode the child reported saved, unchanged."""
    rep = validate_dataset(root)
    assert rep.ok, rep.errors
    ds = EpisodeDataset(root)
    assert len(ds) >= saved  # one more if the kill landed after the commit but before the print
    for i in range(len(ds)):
        ep = ds.episode(i)
        st, act, imgs = episode_content(i)
        np.testing.assert_array_equal(ep.state, st.astype(np.float32))
        np.testing.assert_array_equal(ep.action, act.astype(np.float32))
        assert ep.metadata["k"] == i and ep.task == f"task {i % 3}" and ep.success is (i % 2 == 0)
        for c in CAMS:
            assert np.abs(ep.images[c].astype(int) - imgs[c].astype(int)).max() <= 8
    return len(ds)


@pytest.mark.slow
def test_kill9_at_random_moments_leaves_a_loadable_dataset(tmp_path: Path) -> None:
    # new moments every run; a failure names the seed, and CARP_KILL_SEED=<seed> replays its moments
    seed = int(os.environ.get("CARP_KILL_SEED", time.time_ns() % 2**32))
    try:
        _kill_trials(tmp_path / "ds", seed)
    except Exception as e:
        raise AssertionError(f"kill test failed with seed {seed} (CARP_KILL_SEED={seed} replays): {e}") from e


def _kill_trials(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    total_warnings = 0
    for trial in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), here], stdout=subprocess.PIPE, text=True, env=env
        )
        # let it reach steady recording (imports take ~1 s), then kill at a random moment
        first = proc.stdout.readline()
        assert first.startswith("saved"), f"child failed to start: {first!r}"
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.communicate()[0]
        saved = (
            1 + int(first.split()[1])
            if not rest.strip()
            else 1 + int(rest.strip().splitlines()[-1].split()[1])
        )
        total_warnings += len(validate_dataset(root).warnings)
        n = check_intact(root, saved)
        print(f"trial {trial}: {saved} saved, {n} in dataset")
    # a writer opening the dataset repairs whatever the kills left behind
    with DatasetWriter(root, fps=10.0, cameras=CAMS):
        pass
    rep = validate_dataset(root)
    assert rep.ok and not rep.warnings, rep
    print(f"leftovers seen across kills: {total_warnings}")

"""The rerun live view writes a recording a viewer can open."""

import numpy as np
import pytest

from carp_policy.actions import ActionChunk, Observation


def test_live_view_saves_a_recording_with_cameras_chunks_and_events(tmp_path):
    pytest.importorskip("rerun", reason="rerun-sdk is optional")
    from carp_bringup.live_view import LiveView

    path = tmp_path / "eval.rrd"
    view = LiveView("test", save=path)
    state = np.r_[-0.4, 0.1, 0.3, 1, 0, 0, 0, -1, 0, 0.085]
    for k in range(5):
        s = state.copy()
        s[1] += 0.01 * k
        img = np.full((12, 16, 3), k * 40, np.uint8)
        view.observation(Observation(state=s, images={"wrist": img}, timestamp=0.1 * k))
    actions = np.tile(state, (16, 1))
    actions[:, 0] += np.linspace(0, 0.1, 16)
    view.chunk(ActionChunk(actions, timestamp=0.4, latency_s=0.02), executed=8)
    view.event(0.5, "refused: tcp speed 0.9 m/s over 0.5 m/s")
    view.close()
    data = path.read_bytes()
    assert len(data) > 1000 and data[:4] == b"RRF2"  # rerun's recording file header


def test_carp_eval_rerun_records_every_trial(tmp_path):
    """``carp-eval --rerun FILE.rrd``: read back with rerun's own CLI (``rerun rrd print``), the
    recording holds one chunk per plan of every trial and a start and an outcome event per trial."""
    pytest.importorskip("rerun", reason="rerun-sdk is optional")
    import json
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("rerun", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no rerun CLI beside this Python")
    from carp_bringup.evaluate import main

    rrd, out = tmp_path / "eval.rrd", tmp_path / "eval"
    assert main(["--task", "cup", "--policy", "expert", "--trials", "2", "--videos", "0",
                 "--out", str(out), "--rerun", str(rrd)]) == 0  # fmt: skip
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))  # the CLI's first-run settings
    subprocess.run([exe, "analytics", "disable"], env=env, capture_output=True, timeout=60)
    printed = subprocess.run([exe, "rrd", "print", str(rrd)], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
    rows: dict[str, int] = {}
    for n, entity in re.findall(r"with (\d+) rows .*? - (/\S+) - ", printed):
        rows[entity] = rows.get(entity, 0) + int(n)
    summary = json.loads((out / "results.json").read_text())
    plans = sum(t["plans"] for t in summary["per_trial"])
    assert rows["/world/chunk"] == plans, rows
    assert rows["/events"] == 2 * 2, rows  # start + outcome per trial, no refusals for the expert
    assert rows["/world/tcp"] >= sum(t["steps"] for t in summary["per_trial"]), rows

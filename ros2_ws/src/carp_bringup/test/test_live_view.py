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

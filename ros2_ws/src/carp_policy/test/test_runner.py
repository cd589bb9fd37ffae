"""The policy node's core: streams from the twin -> aligned observation -> the released model's chunk."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from carp_policy import load_policy
from carp_policy.actions import AlignerConfig, ObservationHistory
from carp_policy.runner import PolicyRunner


@pytest.fixture(scope="module")
def cup_policy():
    return load_policy("cup")


def _feed(runner: PolicyRunner, obs) -> None:
    t = obs.timestamp
    runner.push_tcp(t, obs.state[:9])
    runner.push_gripper(t, obs.state[9])
    runner.push_env_state(t, obs.env_state)


def _twin_decisions(runner: PolicyRunner, hist: ObservationHistory, steps: int):
    """Drive the twin one control period per decision, feeding the runner's streams and the
    evaluation's history the same samples: yields (the history's stacked observation, the
    runner's chunk); the runner must not refuse any."""
    from carp_sim.env import SimCell, SimConfig

    with SimCell("cup", SimConfig(render=False)) as cell:
        obs = cell.reset(10_000)
        for _ in range(steps):
            _feed(runner, obs)
            stacked = hist.push(obs)
            chunk, why = runner.decide(now=obs.timestamp)
            assert why == "" and chunk is not None
            yield stacked, chunk
            obs = cell.step(chunk.actions[0])


def test_runner_chunks_equal_the_policy_on_the_same_history(cup_policy):
    """Fed the twin's synchronous samples, the aligner rebuilds exactly the history the evaluation
    stacks, so the runner's chunk is the policy's chunk, stamped with the observation time."""
    runner = PolicyRunner(cup_policy)
    hist = ObservationHistory(cup_policy.obs_horizon)
    for k, (stacked, chunk) in enumerate(_twin_decisions(runner, hist, 3)):
        want = cup_policy.predict(stacked)
        np.testing.assert_array_equal(chunk.actions, want.actions)
        assert chunk.timestamp == stacked.timestamp and chunk.dt == cup_policy.contract["dt"] == 0.1
        assert runner.stats.chunks == k + 1
    s = runner.stats.summary()
    assert s["chunks"] == 3 and s["refused"] == 0 and s["inference_ms_p50"] > 0


class _Strided:
    """The cup model's network behind a contract whose rows are ``stride`` periods apart; keeps
    what it was given."""

    def __init__(self, policy, stride: int) -> None:
        self.policy, self.obs_horizon, self.obs_stride = policy, policy.obs_horizon, stride
        self.cameras, self.contract = (), {**policy.contract, "obs_stride": stride}
        self.seen = []

    def reset(self) -> None:
        self.policy.reset()

    def predict(self, obs):
        self.seen.append(obs)
        return self.policy.predict(obs)


def test_runner_rebuilds_a_strided_history_as_the_evaluation_does(cup_policy):
    """A model whose rows are 3 periods apart: the aligner (a cell's path, by time) and the
    ObservationHistory (the twin's, by push) give the policy the same rows, 0.3 s apart."""
    policy = _Strided(cup_policy, 3)
    runner = PolicyRunner(policy)
    assert runner.config.stride == 3 and runner.streams["tcp"].capacity >= 512
    hist = ObservationHistory(policy.obs_horizon, policy.obs_stride)
    for stacked, _ in _twin_decisions(runner, hist, 6):
        np.testing.assert_array_equal(policy.seen[-1].state, stacked.state)
    np.testing.assert_allclose(np.diff(policy.seen[-1].stamps["tcp"]), 0.3, atol=1e-9)


def test_runner_refuses_stale_and_missing_streams_and_counts_them(cup_policy):
    runner = PolicyRunner(cup_policy, AlignerConfig(max_age=0.1))
    chunk, why = runner.decide(now=1.0)
    assert chunk is None and "no sample" in why
    runner.push_tcp(1.0, np.r_[-0.4, 0.1, 0.3, 1, 0, 0, 0, -1, 0])
    runner.push_gripper(1.0, 0.085)
    runner.push_env_state(1.0, np.r_[-0.5, 0.1, 0.0, 0, 0, 1, -0.5, -0.2])
    assert runner.decide(now=1.05)[0] is not None
    chunk, why = runner.decide(now=1.25)  # every stream 250 ms old: the arm must hold, not replan
    assert chunk is None and "stale" in why
    s = runner.stats.summary()
    assert s["refused_missing"] == 1 and s["refused_stale"] == 1 and s["chunks"] == 1
    with pytest.raises(ValueError, match="9 numbers"):
        runner.push_tcp(2.0, np.zeros(10))


def test_runner_accepts_samples_from_device_threads_while_it_decides(cup_policy):
    # the gripper and scene samples stay at t=0: wide age and skew limits, this test is about threads
    runner = PolicyRunner(cup_policy, AlignerConfig(max_age=10.0, max_skew=10.0))
    tcp = np.r_[-0.4, 0.1, 0.3, 1, 0, 0, 0, -1, 0]
    env = np.r_[-0.5, 0.1, 0.0, 0, 0, 1, -0.5, -0.2]
    runner.push_gripper(0.0, 0.085)
    runner.push_env_state(0.0, env)

    def robot() -> None:  # a 500 Hz state stream, 1 s of it
        for i in range(500):
            runner.push_tcp(i * 0.002, tcp)

    th = threading.Thread(target=robot)
    th.start()
    chunks, reasons = [], set()
    for _ in range(200):  # decisions while the stream fills (bounded: the test must end)
        c, why = runner.decide(now=1.0)
        chunks += [c] if c is not None else []
        reasons |= {why.split(" ")[0]} if why else set()
        if not th.is_alive() and chunks:
            break
    th.join()
    assert chunks and all(np.all(np.isfinite(c.actions)) for c in chunks), reasons
    assert runner.stats.chunks == len(chunks)


def test_runner_fits_camera_frames_to_the_model_input_size():
    """A 640x480 camera frame reaches a visual model as its 120x160 input (images.fit_image)."""
    policy = load_policy("cup_visual")
    runner = PolicyRunner(policy, AlignerConfig(max_age=1.0, max_skew=1.0))
    H, W = policy.contract["cameras"]["wrist"]
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, 320:] = 200  # right half bright: still the right half after the fit
    for cam in policy.cameras:
        runner.push_image(cam, 1.0, frame)
    runner.push_tcp(1.0, np.r_[-0.4, 0.1, 0.3, 1, 0, 0, 0, -1, 0])
    runner.push_gripper(1.0, 0.085)
    obs, _ = runner.aligner.build(1.0)
    img = obs.images["wrist"][-1]
    assert img.shape == (H, W, 3) and img[:, : W // 2 - 1].max() == 0 and img[:, W // 2 + 1 :].min() == 200
    chunk, why = runner.decide(now=1.0)
    assert why == "" and chunk.actions.shape == (16, 10)

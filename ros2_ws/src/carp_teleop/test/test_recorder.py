"""The recorder on the twin's live streams: episodes start and save from the buttons, hold what the
collector's definitions say (a replay reproduces every recorded state), a camera that stops
mid-episode discards only that episode, and a full disk refuses to start one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from carp_hardware.cameras import SimCamera
from carp_policy.actions import ACTION_NAMES, STATE_NAMES
from carp_policy.dataset import DatasetWriter, EpisodeDataset, validate_dataset
from carp_sim.env import ENV_STATE_NAMES, SimCell, SimConfig
from carp_teleop.arm import TwinArm
from carp_teleop.inputs import ScriptedInput
from carp_teleop.recorder import Recorder, RecorderConfig
from carp_teleop.teleop import TeleopCore

IDLE = ([0.0] * 6, (0, 0))
CLICK_RECORD = [([0.0] * 6, (0, 1)), IDLE]
# loose stream limits: this test is about the recorder, and CI's CPU is shared
LOOSE = {"max_frame_age": 0.4, "max_skew": 0.4}


class Cell:
    """The twin with its live streams, as carp-record --sim builds it."""

    def __init__(self, tmp: Path, steps: list, seed: int = 0, policy=None, **cfg) -> None:
        self.cfg = RecorderConfig(**{**LOOSE, **cfg})
        self.env = SimCell("cup", SimConfig(render=False))
        self.lock = threading.Lock()
        self.arm = TwinArm(self.env, lock=self.lock)
        self.arm.reset(seed)
        self.sent: list[np.ndarray] = []  # every action the twin was stepped with
        step = self.env.step
        self.env.step = lambda a: (self.sent.append(np.array(a)), step(a))[1]
        self.seed = seed
        self.teleop = TeleopCore(self.arm, ScriptedInput(steps), self.cfg.teleop)
        self.cams = {c: SimCamera(c, self.env.model, self.env.data, self.lock) for c in ("wrist", "scene")}
        self.out = tmp / "ds"
        self.writer = DatasetWriter(
            self.out,
            fps=10.0,
            cameras={c: (120, 160) for c in self.cams},
            state_names=STATE_NAMES,
            action_names=ACTION_NAMES,
            env_state_names=ENV_STATE_NAMES,
        )
        self.cues: list[str] = []
        self.rec = Recorder(
            self.cfg,
            self.arm,
            self.cams,
            self.teleop,
            self.writer,
            "pick up the cup",
            self.out,
            {"operator": "test", "calibration_id": "cal-x"},
            env_buffer=self.arm.env_buffer,
            cue=self.cues.append,
            policy=policy,
        )
        self.rec.scene_facts = {"seed": seed}

    def __enter__(self) -> Cell:
        self.arm.start()
        for c in self.cams.values():
            c.start()
        return self

    def __exit__(self, *exc) -> None:
        for c in self.cams.values():
            c.stop()
        self.arm.stop()
        self.writer.close()
        self.env.close()


def test_records_from_buttons_with_the_collectors_definitions(tmp_path: Path) -> None:
    move = [([0.6, 0.3, -0.4, 0.0, 0.0, 0.5], (0, 0))] * 12 + [([0.0] * 6, (1, 0)), IDLE] + [IDLE] * 4
    with Cell(tmp_path, [IDLE, *CLICK_RECORD, *move, *CLICK_RECORD, IDLE], seed=3) as cell:
        summary = cell.rec.run(max_episodes=1, duration_s=8.0)
    assert summary["saved"] == [0], cell.cues
    assert validate_dataset(cell.out).ok
    ds = EpisodeDataset(cell.out)
    ep = ds.episode(0)
    assert ep.state.shape[1] == 10 and ep.images["wrist"].shape[1:] == (120, 160, 3)
    meta = ep.metadata
    assert meta["operator"] == "test" and meta["calibration_id"] == "cal-x" and meta["seed"] == 3
    assert len(meta["camera_skew_s"]) == len(ep.state) and set(meta["capture_times"]) >= {"wrist", "scene"}
    assert meta["intervention"] == [1] * len(ep.state)
    # The collector's definitions: the state is what SimCell.observe() measures before the action,
    # the action the target SimCell.step() is given. Replaying every target the twin was sent in a
    # fresh twin from the same layout reproduces every recorded state.
    sent = np.array(cell.sent)
    j0 = int(np.argmin(np.abs(sent - ep.action[0]).max(axis=1)))  # the command of the first frame
    np.testing.assert_allclose(sent[j0 : j0 + len(ep.action)], ep.action, atol=1e-6)
    env = SimCell("cup", SimConfig(render=False))
    env.reset(3)
    for a in sent[:j0]:
        env.step(a)
    for k in range(len(ep.state)):
        np.testing.assert_allclose(env.observe().state, ep.state[k], atol=2e-5)
        env.step(ep.action[k].astype(np.float64))
    assert np.linalg.norm(ep.state[-1, :3] - ep.state[0, :3]) > 0.05  # the operator moved the arm
    assert ep.action[-1, 9] < 0.085  # and closed the gripper
    env.close()


def test_a_camera_stopping_discards_only_that_episode_and_a_full_disk_refuses_to_start(
    tmp_path: Path,
) -> None:
    move = [([0.0, 0.5, 0.0, 0.0, 0.0, 0.0], (0, 0))] * 5
    steps = [
        IDLE,
        *CLICK_RECORD,
        *move,
        *CLICK_RECORD,
        *CLICK_RECORD,
        *move * 3,
        IDLE,
        *CLICK_RECORD,
        IDLE,
        IDLE,
    ]
    with Cell(tmp_path, steps) as cell:
        ticks = [0]

        def operator(t: float) -> None:
            ticks[0] += 1
            if ticks[0] == 14:  # during the second episode: the wrist camera stops delivering
                cell.cams["wrist"].paused = True
            if ticks[0] == 22:
                cell.cams["wrist"].paused = False
                cell.rec.config.min_free_gb = 1e9  # and now the disk is "full"

        summary = cell.rec.run(duration_s=3.6, before_tick=operator)
    assert summary["saved"] == [0] and summary["discarded"] == 1, cell.cues
    msg = next(c for c in cell.cues if "DISCARDED" in c)
    assert "'wrist'" in msg and "earlier episodes are intact" in msg
    assert any("NOT RECORDING" in c and "GB free" in c for c in cell.cues)
    assert validate_dataset(cell.out).ok and len(EpisodeDataset(cell.out)) == 1


class SideStepPolicy:
    """Moves the TCP 1 cm along +y per step from the observed pose (sees the wrist camera)."""

    obs_horizon = 1
    obs_stride = 1
    cameras = ("wrist",)

    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        pass

    def predict(self, obs):
        from carp_policy.actions import ActionChunk

        assert obs.images["wrist"].shape == (1, 120, 160, 3)
        self.calls += 1
        acts = np.repeat(obs.state[-1][None], 16, axis=0)
        acts[:, 1] += 0.01 * np.arange(1, 17)
        return ActionChunk(acts, timestamp=obs.timestamp)


def test_dagger_rollout_flags_policy_and_human_frames(tmp_path: Path) -> None:
    push = ([0.0, 0.0, 0.6, 0.0, 0.0, 0.0], (0, 0))
    steps = [IDLE, *CLICK_RECORD, *[IDLE] * 10, *[push] * 5, *[IDLE] * 16, *CLICK_RECORD, IDLE]
    policy = SideStepPolicy()
    with Cell(tmp_path, steps, policy=policy) as cell:
        summary = cell.rec.run(max_episodes=1, duration_s=6.0)
    assert summary["saved"] == [0], cell.cues
    ep = EpisodeDataset(cell.out).episode(0)
    flags = np.array(ep.metadata["intervention"])
    # policy, then the operator's push (and the rest before the hand-back), then the policy again
    first_human, last_human = np.flatnonzero(flags)[[0, -1]]
    assert flags[0] == 0 and flags[-1] == 0 and first_human > 3
    assert np.all(flags[first_human : last_human + 1] == 1) and last_human - first_human >= 9
    assert "operator took over" in cell.cues and "handed back to the policy" in cell.cues
    assert policy.calls >= 2
    y = ep.action[:first_human, 1]
    assert np.all(np.diff(y) > 0.005)  # the policy's side steps were commanded
    assert ep.state[last_human, 2] - ep.state[first_human - 1, 2] > 0.01  # the operator lifted it

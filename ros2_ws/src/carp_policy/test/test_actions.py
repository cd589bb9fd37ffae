"""The shared contract: rotation conversions, ActionChunk checks, observation history."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from carp_policy.actions import (
    STATE_NAMES,
    ActionChunk,
    AlignerConfig,
    Observation,
    ObservationAligner,
    ObservationHistory,
    StaleObservationError,
    StreamBuffer,
    matrix_to_rot6d,
    quat_to_rot6d,
    rot6d_to_matrix,
    rot6d_to_quat,
    rot6d_to_rotvec,
    rotation_error_deg,
    rotvec_to_rot6d,
    validate_observation,
)


def test_rot6d_round_trips_through_every_representation():
    rots = Rotation.random(200, random_state=0)
    r6d = matrix_to_rot6d(rots.as_matrix())
    np.testing.assert_allclose(rot6d_to_matrix(r6d), rots.as_matrix(), atol=1e-12)
    back = Rotation.from_rotvec(rot6d_to_rotvec(r6d))
    assert np.all(rotation_error_deg(matrix_to_rot6d(back.as_matrix()), r6d) < 1e-6)
    np.testing.assert_allclose(rotvec_to_rot6d(rots.as_rotvec()), r6d, atol=1e-12)
    q = rot6d_to_quat(r6d)
    np.testing.assert_allclose(np.abs(np.sum(q * rots.as_quat(), axis=1)), 1.0, atol=1e-12)  # q and -q agree
    np.testing.assert_allclose(quat_to_rot6d(q), r6d, atol=1e-12)


def test_rot6d_is_reorthonormalised_and_degenerate_input_is_refused():
    r6d = matrix_to_rot6d(np.eye(3)) + np.array([0.05, -0.02, 0.0, 0.01, 0.03, -0.04])
    mat = rot6d_to_matrix(r6d)
    np.testing.assert_allclose(mat.T @ mat, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(mat), 1.0)
    with pytest.raises(ValueError, match="parallel"):
        rot6d_to_matrix(np.array([1.0, 0, 0, 2.0, 0, 0]))


def test_rotation_error_matches_known_angle():
    a = matrix_to_rot6d(np.eye(3))
    b = matrix_to_rot6d(Rotation.from_euler("z", 30, degrees=True).as_matrix())
    assert rotation_error_deg(a, b) == pytest.approx(30.0)


def test_action_chunk_conversions_and_timing():
    acts = np.zeros((16, 10))
    acts[:, 0] = np.linspace(0.3, 0.45, 16)
    acts[:, 3:9] = matrix_to_rot6d(Rotation.from_euler("x", 180, degrees=True).as_matrix())
    acts[:, 9] = 0.085
    chunk = ActionChunk(acts, timestamp=2.0, dt=0.1)
    assert chunk.ur_poses().shape == (16, 6)
    np.testing.assert_allclose(np.linalg.norm(chunk.rotvecs, axis=1), np.pi, atol=1e-9)
    np.testing.assert_allclose(chunk.step_times()[[0, -1]], [2.1, 3.6])
    assert chunk.quaternions.shape == (16, 4)


@pytest.mark.parametrize("bad", [np.zeros((16, 9)), np.zeros(10)])
def test_action_chunk_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="must be"):
        ActionChunk(bad)


def test_action_chunk_rejects_nan_and_names_the_dimension():
    acts = np.zeros((16, 10))
    acts[:, 3] = acts[:, 7] = 1.0
    acts[5, 9] = np.nan
    with pytest.raises(ValueError, match="step 5, dim gripper"):
        ActionChunk(acts)


def test_observation_history_pads_with_first_and_keeps_last():
    hist = ObservationHistory(2)
    o1 = Observation(state=np.full(10, 1.0), images={"wrist": np.full((4, 5, 3), 1, np.uint8)}, timestamp=0.1)
    o2 = Observation(state=np.full(10, 2.0), images={"wrist": np.full((4, 5, 3), 2, np.uint8)}, timestamp=0.2)
    o3 = Observation(state=np.full(10, 3.0), images={"wrist": np.full((4, 5, 3), 3, np.uint8)}, timestamp=0.3)
    s = hist.push(o1)
    assert s.state.shape == (2, 10) and np.all(s.state == 1.0) and s.images["wrist"].shape == (2, 4, 5, 3)
    hist.push(o2)
    s = hist.push(o3)
    assert s.state[:, 0].tolist() == [2.0, 3.0] and s.timestamp == 0.3
    assert s.images["wrist"][:, 0, 0, 0].tolist() == [2, 3]



def test_observation_history_with_a_stride_spaces_its_rows_and_pads_the_start():
    hist = ObservationHistory(3, stride=2)  # rows at pushes n-4, n-2 and n
    obs = [Observation(state=np.full(10, float(i)), timestamp=0.1 * i) for i in range(7)]
    rows = [hist.push(o).state[:, 0].tolist() for o in obs]
    assert rows[0] == [0.0, 0.0, 0.0] and rows[1] == [0.0, 0.0, 1.0] and rows[3] == [0.0, 1.0, 3.0]
    assert rows[4] == [0.0, 2.0, 4.0] and rows[6] == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ObservationHistory(2, stride=0)


EPOCH = 1.8e9  # wall-clock sized times: the aligner must not lose precision on them


def _streams(t0: float = EPOCH):
    """A robot state at 500 Hz, a gripper at 50 Hz and two cameras at 30 fps with 5 ms offset."""
    tcp, grip = StreamBuffer("tcp", 1024), StreamBuffer("gripper", 128)
    wrist, scene = StreamBuffer("wrist"), StreamBuffer("scene")
    for i in range(500):  # 1 s
        t = t0 + i * 0.002
        tcp.push(t, np.full(9, t - t0))
        if i % 10 == 0:
            grip.push(t, np.array([t - t0]))
    for i in range(30):
        wrist.push(t0 + i / 30, np.full((4, 5, 3), i, np.uint8))
        scene.push(t0 + 0.005 + i / 30, np.full((4, 5, 3), 100 + i, np.uint8))
    return tcp, grip, wrist, scene


def test_aligner_takes_the_latest_sample_at_or_before_each_row_time():
    tcp, grip, wrist, scene = _streams()
    al = ObservationAligner([tcp, grip], {"wrist": wrist, "scene": scene}, config=AlignerConfig(horizon=2))
    t = EPOCH + 0.95
    obs, info = al.build(t)
    assert obs.state.shape == (2, 10) and obs.images["wrist"].shape == (2, 4, 5, 3)
    # rows at 0.85 s and 0.95 s: tcp at 2 ms steps, gripper at 20 ms, cameras at 1/30 s
    np.testing.assert_allclose(obs.state[:, 0], [0.85, 0.95], atol=1e-6)
    np.testing.assert_allclose(obs.state[:, 9], [0.84, 0.94], atol=1e-6)
    assert obs.images["wrist"][:, 0, 0, 0].tolist() == [25, 28]  # frames at 0.8333 s and 0.9333 s
    assert obs.images["scene"][:, 0, 0, 0].tolist() == [125, 128]
    np.testing.assert_allclose(obs.stamps["wrist"] - EPOCH, [25 / 30, 28 / 30], atol=1e-6)
    assert obs.timestamp == t
    # ages and skew as measured from the stamps, at full float64 precision on epoch-sized times
    assert info.ages["wrist"] == pytest.approx(0.95 - 28 / 30, abs=1e-6)
    assert info.skew == pytest.approx(obs.stamps["tcp"][-1] - obs.stamps["wrist"][-1], abs=1e-6)
    # default decision time: the newest capture time of any stream
    assert al.build()[0].timestamp == pytest.approx(EPOCH + 0.998, abs=1e-6)


def test_aligner_with_a_stride_looks_stride_periods_back():
    tcp, grip, wrist, _ = _streams()
    cfg = AlignerConfig(horizon=2, stride=6)  # rows 0.6 s apart
    obs, _ = ObservationAligner([tcp, grip], {"wrist": wrist}, config=cfg).build(EPOCH + 0.95)
    np.testing.assert_allclose(obs.state[:, 0], [0.35, 0.95], atol=1e-6)
    assert obs.images["wrist"][:, 0, 0, 0].tolist() == [10, 28]  # frames at 0.3333 s and 0.9333 s


def test_aligner_refuses_a_row_older_than_the_buffer_holds():
    tcp = StreamBuffer("tcp", 100)  # 0.2 s at 500 Hz: it has let go of the first 0.8 s
    for i in range(500):
        tcp.push(EPOCH + i * 0.002, np.full(10, float(i)))
    with pytest.raises(StaleObservationError, match=r"'tcp' holds 0.20 s of history.*0.60 s back") as e:
        ObservationAligner([tcp], config=AlignerConfig(horizon=2, stride=6)).build(EPOCH + 0.998)
    assert e.value.reason == "history"
    # a buffer that never dropped a sample pads instead: the episode just began
    young = StreamBuffer("tcp", 100)
    young.push(EPOCH, np.zeros(10))
    obs, _ = ObservationAligner([young], config=AlignerConfig(horizon=2, stride=6)).build(EPOCH)
    assert obs.state.shape == (2, 10)


def test_aligner_edge_pads_before_the_first_sample():
    buf = StreamBuffer("state")
    buf.push(5.0, np.full(10, 1.0))
    obs, _ = ObservationAligner([buf], config=AlignerConfig(horizon=3)).build(5.0)
    assert obs.state.shape == (3, 10) and np.all(obs.state == 1.0)


def test_aligner_refuses_stale_missing_and_skewed_streams():
    tcp, grip, wrist, scene = _streams()
    cams = {"wrist": wrist, "scene": scene}
    al = ObservationAligner([tcp, grip], cams, config=AlignerConfig(max_age=0.1, max_skew=0.05))
    with pytest.raises(StaleObservationError, match=r"stale stream\(s\).*'wrist' 1\d\d ms") as e:
        al.build(EPOCH + 28 / 30 + 0.15)  # every camera frame is > 100 ms old by then
    assert e.value.reason == "stale"
    with pytest.raises(StaleObservationError, match="no sample at or before") as e:
        al.build(EPOCH - 1.0)
    assert e.value.reason == "missing"
    empty = ObservationAligner([tcp], {"wrist": StreamBuffer("wrist")})
    with pytest.raises(StaleObservationError, match=r"no sample yet from stream\(s\) \['wrist'\]"):
        empty.build()
    late = StreamBuffer("scene")
    late.push(EPOCH + 0.89, np.zeros((4, 5, 3), np.uint8))
    skewed = ObservationAligner([tcp], {"wrist": wrist, "scene": late}, config=AlignerConfig(max_skew=0.02))
    with pytest.raises(StaleObservationError, match="ms apart") as e:
        skewed.build(EPOCH + 0.89)  # wrist frame at 0.8667 s, scene at 0.89 s: 23 ms apart
    assert e.value.reason == "skew"


def test_stream_buffer_refuses_time_going_backwards_and_nan():
    buf = StreamBuffer("tcp", capacity=2)
    buf.push(1.0, np.zeros(1))
    with pytest.raises(ValueError, match="went backwards"):
        buf.push(0.5, np.zeros(1))
    with pytest.raises(ValueError, match="not finite"):
        buf.push(float("nan"), np.zeros(1))
    buf.push(2.0, np.ones(1))
    buf.push(3.0, np.ones(1) * 2)
    assert len(buf) == 2 and buf.earliest().t == 2.0  # the ring keeps the newest `capacity`
    assert buf.latest(max_age=0.5, now=3.4).t == 3.0 and buf.latest(max_age=0.5, now=3.6) is None


def test_environment_state_is_stacked_validated_and_appended():
    hist = ObservationHistory(2)
    hist.push(Observation(state=np.full(10, 1.0), env_state=np.full(3, 10.0)))
    s = hist.push(Observation(state=np.full(10, 2.0), env_state=np.full(3, 20.0)))
    assert s.env_state.shape == (2, 3) and s.env_state[:, 0].tolist() == [10.0, 20.0]
    state, _ = validate_observation(s, 2, 10, (), env_state_dim=3)
    assert state.shape == (2, 13) and state[1].tolist() == [2.0] * 10 + [20.0] * 3
    # a policy without environment state ignores it; one that needs it refuses an observation without
    assert validate_observation(s, 2, 10, ())[0].shape == (2, 10)
    with pytest.raises(ValueError, match=r"needs observation\.env_state"):
        validate_observation(Observation(state=s.state), 2, 10, (), env_state_dim=3)
    with pytest.raises(ValueError, match=r"env_state must have shape \(2, 4\)"):
        validate_observation(s, 2, 10, (), env_state_dim=4)


def test_unit_vector_state_dims_pass_through_normalization(tmp_path):
    # An upright object's up axis barely moves in the demonstrations (range ~1e-3). Min-max scaling
    # would turn a 2-degree tilt in closed loop into ~70 normalised units; it must pass through.
    from carp_policy.normalization import Normalizer, passthrough_dims

    names = [*STATE_NAMES, "object_x", "object_up_x", "object_up_y", "object_up_z"]
    lo = np.array([-0.5, -0.3, 0.05, *[-1.0] * 6, 0.0, -0.55, -6e-4, -2e-4, 1.0])
    hi = np.array([-0.3, 0.3, 0.30, *[1.0] * 6, 0.085, -0.38, 2e-4, 3e-4, 1.0])
    stats = {"observation.state": {"min": lo, "max": hi}, "action": {"min": lo[:10], "max": hi[:10]}}
    nz = Normalizer.from_stats({**stats, "state_names": names})
    assert passthrough_dims(names) == [3, 4, 5, 6, 7, 8, 11, 12, 13]
    tilted = (lo + hi) / 2
    tilted[11:14] = [np.sin(np.radians(2.0)), 0.0, np.cos(np.radians(2.0))]
    x = nz.normalize_state(tilted)
    np.testing.assert_allclose(x[11:14], tilted[11:14], rtol=1e-6)
    assert abs(x[10]) < 1e-6 and abs(x[0]) < 1e-6  # positions are still min-max scaled
    nz.save(tmp_path / "n.json")  # the names travel with the stats, so a loaded normalizer agrees
    np.testing.assert_allclose(Normalizer.load(tmp_path / "n.json").normalize_state(tilted), x)
    # without names (older checkpoints) only rot6d passes through, as before
    old = Normalizer.from_stats(stats)
    assert abs(old.normalize_state(tilted)[11]) > 30


def test_relative_frame_round_trip_stats_and_save(tmp_path):
    # In the relative frame a chunk is offsets from the TCP at the decision time and the scene's
    # positions are offsets from the TCP of their own step; rotations, up axes and gripper stay.
    from carp_policy.normalization import Normalizer, env_position_dims

    names = [*STATE_NAMES, "object_x", "object_y", "object_z", "object_up_x", "object_up_y",
             "object_up_z", "target_x", "target_y"]  # fmt: skip
    assert env_position_dims(names) == ([10, 11, 12, 16, 17], [0, 1, 2, 0, 1])
    rng = np.random.default_rng(0)
    state = rng.normal(size=(5, 2, 18))  # (B, O, S)
    actions = rng.normal(size=(5, 16, 10))  # (B, H, D)
    nz = Normalizer(*(np.zeros(0),) * 4, state_names=names, frame="relative")
    rel = nz.state_to_frame(state)
    np.testing.assert_allclose(rel[..., 10:13], state[..., 10:13] - state[..., 0:3])
    np.testing.assert_allclose(rel[..., 16:18], state[..., 16:18] - state[..., 0:2])
    np.testing.assert_array_equal(rel[..., :10], state[..., :10])  # robot state and up axis unchanged
    np.testing.assert_array_equal(rel[..., 13:16], state[..., 13:16])
    chunk = nz.actions_to_frame(actions, state[:, -1])
    np.testing.assert_allclose(chunk[..., :3], actions[..., :3] - state[:, -1, None, :3])
    np.testing.assert_array_equal(chunk[..., 3:], actions[..., 3:])
    np.testing.assert_allclose(nz.actions_from_frame(chunk, state[:, -1]), actions)
    # the same on torch tensors (training runs the frame change on the device)
    t = nz.actions_to_frame(torch.from_numpy(actions), torch.from_numpy(state[:, -1]))
    np.testing.assert_allclose(t.numpy(), chunk)
    # stats are those of the training windows in the frame: rows t..t+H-1 (edge-padded) minus state t
    ep_state, ep_action = rng.normal(size=(30, 18)), rng.normal(size=(30, 10))
    wins = np.stack([ep_action[np.minimum(np.arange(t, t + 16), 29)] - np.r_[ep_state[t, :3], [0] * 7]
                     for t in range(30)])  # fmt: skip
    fitted = Normalizer.fit([(ep_state, ep_action)], 16, names, "relative")
    np.testing.assert_allclose(fitted.action_min, wins.reshape(-1, 10).min(0))
    np.testing.assert_allclose(fitted.action_max, wins.reshape(-1, 10).max(0))
    np.testing.assert_allclose(fitted.state_max, nz.state_to_frame(ep_state).max(0))
    fitted.save(tmp_path / "n.json")
    loaded = Normalizer.load(tmp_path / "n.json")
    assert loaded.frame == "relative"
    np.testing.assert_allclose(loaded.normalize_state(ep_state), fitted.normalize_state(ep_state))
    # in the absolute frame the fit is the plain per-row min / max of the recorded vectors
    plain = Normalizer.fit([(ep_state, ep_action)], 16, names)
    np.testing.assert_array_equal(plain.state_min, ep_state.min(0))
    np.testing.assert_array_equal(plain.action_max, ep_action.max(0))
    # the absolute frame (and every older checkpoint, which has no "frame") changes nothing
    old = Normalizer.from_stats({k: v for k, v in plain.to_dict().items() if k != "frame"})
    assert old.frame == "absolute" and old.actions_to_frame(actions, state[:, -1]) is actions
    with pytest.raises(ValueError, match="frame must be one of"):
        Normalizer(*(np.zeros(0),) * 4, frame="tcp")
    with pytest.raises(ValueError, match="TCP position first"):
        Normalizer(*(np.zeros(0),) * 4, state_names=["gripper", *names[1:]], frame="relative")


def test_relative_xy_frame_keeps_heights_absolute():
    # relative_xy: x, y from the TCP (chunk and scene), z as recorded: the table's height is the same
    # number in every demonstration, the object's place on it is not
    from carp_policy.normalization import Normalizer

    names = [*STATE_NAMES, "object_x", "object_y", "object_z", "object_up_x", "object_up_y",
             "object_up_z", "target_x", "target_y"]  # fmt: skip
    rng = np.random.default_rng(1)
    state, actions = rng.normal(size=(5, 2, 18)), rng.normal(size=(5, 16, 10))
    nz = Normalizer(*(np.zeros(0),) * 4, state_names=names, frame="relative_xy")
    rel = nz.state_to_frame(state)
    xy = [10, 11, 16, 17]  # object_x, object_y, target_x, target_y
    np.testing.assert_allclose(rel[..., xy], state[..., xy] - state[..., [0, 1, 0, 1]])
    keep = [i for i in range(18) if i not in xy]  # robot state, object z, up axis
    np.testing.assert_array_equal(rel[..., keep], state[..., keep])
    chunk = nz.actions_to_frame(actions, state[:, -1])
    np.testing.assert_allclose(chunk[..., :2], actions[..., :2] - state[:, -1, None, :2])
    np.testing.assert_array_equal(chunk[..., 2:], actions[..., 2:])  # z, rotation, gripper unchanged
    np.testing.assert_allclose(nz.actions_from_frame(chunk, state[:, -1]), actions)
    t = nz.actions_from_frame(torch.from_numpy(chunk), torch.from_numpy(state[:, -1]))
    np.testing.assert_allclose(t.numpy(), actions)
    # the fit sees the windows in the frame: the z range is the recorded one
    ep_state, ep_action = rng.normal(size=(30, 18)), rng.normal(size=(30, 10))
    fitted = Normalizer.fit([(ep_state, ep_action)], 16, names, "relative_xy")
    assert fitted.action_min[2] == ep_action[:, 2].min() and fitted.action_max[2] == ep_action[:, 2].max()
    assert Normalizer.from_stats(fitted.to_dict()).frame == "relative_xy"


@pytest.mark.parametrize("frame", ["absolute", "relative", "relative_xy"])
def test_fitted_ranges_cover_the_translation_augmentation(frame):
    """Normalizer.fit(shift=s): any window moved by d in [-s, s]^2 (what the augmentation of
    train.BatchNormalizer does) normalises inside [-1, 1]; without the shift it would not."""
    from carp_policy.normalization import Normalizer

    names = [*STATE_NAMES, "object_x", "object_y", "object_z", "object_up_x", "object_up_y",
             "object_up_z", "target_x", "target_y"]  # fmt: skip
    rng = np.random.default_rng(3)
    eps = [(rng.normal(size=(40, 18)) * 0.1, rng.normal(size=(40, 10)) * 0.1) for _ in range(3)]
    s = 0.03
    nz = Normalizer.fit(eps, 16, names, frame, shift=s)
    plain = Normalizer.fit(eps, 16, names, frame)
    state, action = eps[0]
    idx = np.minimum(np.arange(40)[:, None] + np.arange(16), 39)
    worst, worst_plain = 0.0, 0.0
    for d in rng.uniform(-s, s, size=(200, 2)):
        st = nz.shift_xy(state, np.broadcast_to(d, (40, 2)))
        act = action[idx].copy()
        act[..., :2] += d
        for n in (nz, plain):
            m = max(np.abs(n.normalize_state(st)).max(), np.abs(n.normalize_action(act, st)).max())
            if n is nz:
                worst = max(worst, m)
            else:
                worst_plain = max(worst_plain, m)
    assert worst <= 1.0 + 1e-5, worst
    assert worst_plain > 1.05  # the plain ranges do not cover it (the test can fail)

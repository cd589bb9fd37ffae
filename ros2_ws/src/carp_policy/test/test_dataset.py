"""Dataset layer: round trip through real parquet/MP4 files, windows, splits, validation, key maps, CLI."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import av
import mujoco
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carp_policy.actions import ACTION_NAMES, STATE_NAMES
from carp_policy.dataset import (
    DatasetError,
    DatasetWriter,
    EpisodeDataset,
    KeyMap,
    WindowDataset,
    split_episodes,
    validate_dataset,
)
from carp_policy.dataset.format import psnr, seconds_to_ns, tasks_table

H, W = 48, 64
CAMS = {"wrist": (H, W), "scene": (H, W)}
# Documented codec loss (docs/design.md): H.264 yuv444p CRF 15 on rendered 48x64 frames. Measured mean
# PSNR is ~33 dB (wrist, textured close-up) and ~42 dB (scene); tiny frames are the hard case.
MIN_MEAN_PSNR_DB = 30.0

SCENE_XML = """<mujoco><visual><global offwidth="160" offheight="120"/></visual>
<asset><texture name="grid" type="2d" builtin="checker" rgb1=".2 .3 .4" rgb2=".6 .6 .6"
  width="64" height="64"/>
<material name="grid" texture="grid" texrepeat="6 6"/></asset>
<worldbody><light pos="0 0 2" dir="0 0 -1"/><geom type="plane" size="2 2 .1" material="grid"/>
<geom type="box" size=".5 .4 .02" pos="0 0 .4" rgba=".55 .4 .25 1"/>
<body name="cup" pos=".1 .1 .47"><freejoint/><geom type="cylinder" size=".04 .05" rgba=".9 .2 .2 1"/></body>
<geom type="cylinder" size=".08 .02" pos="-.2 -.1 .44" rgba=".2 .6 .9 1"/>
<camera name="scene" pos="0 -1.2 1.2" xyaxes="1 0 0 0 .7 .7"/>
<body name="wrist" pos="0 0 1" mocap="true"><camera name="wrist" xyaxes="1 0 0 0 1 0"/></body>
</worldbody></mujoco>"""


@functools.cache
def _renderer() -> tuple[mujoco.MjModel, mujoco.Renderer]:
    m = mujoco.MjModel.from_xml_string(SCENE_XML)
    return m, mujoco.Renderer(m, H, W)  # one GL context for the whole module: creating one is slow


def render_episode(T: int, seed: int) -> dict[str, np.ndarray]:
    """Real MuJoCo renders of a small cell with a moving wrist camera and cup: cam -> (T, H, W, 3)."""
    m, r = _renderer()
    d = mujoco.MjData(m)
    ph = np.random.default_rng(seed).uniform(0, 6, 2)
    out: dict[str, list] = {"wrist": [], "scene": []}
    for t in range(T):
        # monotonic motion: every frame differs from its neighbours, so misalignment is detectable
        d.mocap_pos[0] = [-0.3 + 0.04 * t, 0.1 * np.cos(ph[0]), 0.8 - 0.01 * t]
        d.qpos[:3] = [-0.3 + 0.04 * t, 0.1 * np.sin(ph[1]), 0.47]
        mujoco.mj_forward(m, d)
        for cam in out:
            r.update_scene(d, camera=cam)
            out[cam].append(r.render().copy())
    return {c: np.stack(v) for c, v in out.items()}


def make_episode(T: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "t": 50.0 + np.cumsum(rng.uniform(0.09, 0.11, T)),  # real clock, jittered around 10 Hz
        "state": rng.normal(size=(T, 10)),
        "action": rng.normal(size=(T, 10)),
        "images": render_episode(T, seed),
    }


def write(root: Path, episodes: list[dict], tasks: list[str], success: list[bool] | None = None) -> None:
    with DatasetWriter(root, fps=10.0, cameras=CAMS, state_names=STATE_NAMES, action_names=ACTION_NAMES) as w:
        for i, ep in enumerate(episodes):
            w.begin_episode(task=tasks[i])
            for t in range(len(ep["t"])):
                w.add_frame(
                    ep["t"][t], {c: ep["images"][c][t] for c in CAMS}, ep["state"][t], ep["action"][t]
                )
            w.save_episode(
                success=True if success is None else success[i], metadata={"operator": "ann", "seed": i}
            )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ds") / "demo"
    eps = [make_episode(T, seed) for seed, T in enumerate([12, 7, 15])]
    write(root, eps, ["pick up the cup", "put the cup in the bowl", "pick up the cup"], [True, False, True])
    return root, eps


def test_round_trip_within_codec_loss(recorded: tuple[Path, list[dict]]) -> None:
    root, eps = recorded
    ds = EpisodeDataset(root)
    assert len(ds) == 3 and ds.fps == 10.0 and ds.cameras == ["wrist", "scene"]
    assert ds.state_names == STATE_NAMES and ds.action_names == ACTION_NAMES
    for i, src in enumerate(eps):
        ep = ds.episode(i)
        assert ep.index == i
        np.testing.assert_array_equal(ep.state, src["state"].astype(np.float32))
        np.testing.assert_array_equal(ep.action, src["action"].astype(np.float32))
        # capture times are stored as int64 ns: exact to the nanosecond the float gave
        np.testing.assert_array_equal(ep.time_ns, [seconds_to_ns(t) for t in src["t"]])
        np.testing.assert_allclose(ep.timestamps, src["t"], rtol=0, atol=0.51e-9)
        assert set(ep.stamps_ns) == {"state", "wrist", "scene"}  # one stream each, the frame's time here
        np.testing.assert_array_equal(ep.stamps_ns["wrist"], ep.time_ns)
        for cam in CAMS:
            got, want = ep.images[cam], src["images"][cam]
            assert got.shape == want.shape and got.dtype == np.uint8
            per_frame = [psnr(a, b) for a, b in zip(got, want)]
            assert np.mean(per_frame) >= MIN_MEAN_PSNR_DB, (cam, per_frame)
            # frame alignment: each decoded frame is closest to its own original
            errs = np.abs(got[:, None].astype(float) - want[None].astype(float)).mean(axis=(2, 3, 4))
            assert (errs.argmin(1) == np.arange(len(want))).all()
    e1 = ds.episode(1)
    assert e1.task == "put the cup in the bowl" and e1.success is False
    assert (
        e1.metadata["operator"] == "ann" and e1.metadata["seed"] == 1 and e1.metadata["robot_type"] == "ur5e"
    )
    assert ds.episode(0).images is ds.episode(0).images  # decoded once, cached


def test_frames_of_another_size_are_fitted_by_the_one_conversion(recorded: tuple[Path, list[dict]]) -> None:
    """A model reading (60, 80) from frames stored at (120, 160): the reader fits them on decode with
    ``images.fit_image``, the function the recorder and the policy node apply to camera frames."""
    from carp_policy.images import fit_image

    root, _ = recorded
    native = EpisodeDataset(root).episode(0).images
    fitted = EpisodeDataset(root, image_size=(60, 80)).episode(0).images
    for cam in CAMS:
        assert fitted[cam].shape[1:] == (60, 80, 3)
        np.testing.assert_array_equal(fitted[cam], np.stack([fit_image(f, (60, 80)) for f in native[cam]]))


def test_layout_is_lerobot_v3(recorded: tuple[Path, list[dict]]) -> None:
    root, eps = recorded
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["total_episodes"] == 3
    assert info["total_frames"] == sum(len(e["t"]) for e in eps) and info["total_tasks"] == 2
    f = info["features"]
    assert f["observation.state"] == {"dtype": "float32", "shape": [10], "names": STATE_NAMES}
    assert f["observation.images.wrist"]["dtype"] == "video" and f["observation.images.wrist"]["shape"] == [
        H,
        W,
        3,
    ]
    assert f["observation.images.wrist"]["info"]["video.codec"] == "h264"
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert k in f
    epi = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["dataset_from_index"] for r in epi] == [0, 12, 19]
    assert epi[2]["videos/observation.images.scene/to_timestamp"] == pytest.approx(1.5)
    assert (root / "data/chunk-000/file-002.parquet").exists()
    assert (root / "videos/observation.images.scene/chunk-000/file-002.mp4").exists()
    data = pq.read_table(root / "data/chunk-000/file-001.parquet")
    assert data["index"].to_pylist() == list(range(12, 19))
    np.testing.assert_allclose(data["timestamp"].to_numpy(), np.arange(7) / 10, atol=1e-6)
    stats = json.loads((root / "meta/stats.json").read_text())
    allstate = np.concatenate([e["state"] for e in eps]).astype(np.float32)
    np.testing.assert_allclose(stats["observation.state"]["mean"], allstate.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["std"], allstate.std(0), rtol=1e-4, atol=1e-6)
    assert {"min", "max", "count", "q01", "q10", "q50", "q90", "q99"} <= set(stats["action"])
    assert np.asarray(stats["observation.images.wrist"]["mean"]).shape == (3, 1, 1)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks["task"].to_pylist() == ["pick up the cup", "put the cup in the bowl"]
    assert validate_dataset(root).ok


def test_stats_exact(recorded: tuple[Path, list[dict]]) -> None:
    root, eps = recorded
    st = EpisodeDataset(root, cameras=[]).stats(episodes=[0, 2])
    a = np.concatenate([eps[0]["action"], eps[2]["action"]]).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(st["action"]["mean"], a.mean(0))
    np.testing.assert_allclose(st["action"]["q99"], np.quantile(a, 0.99, axis=0))
    assert st["action"]["count"][0] == len(a)


def test_windows_edge_padded(recorded: tuple[Path, list[dict]]) -> None:
    root, eps = recorded
    ds = EpisodeDataset(root)
    wd = WindowDataset(ds, [1, 2], obs_horizon=2, action_horizon=16)
    assert len(wd) == 7 + 15
    first = wd[0]
    assert first["episode"] == 1 and first["frame"] == 0
    assert first["state"].shape == (2, 10) and first["state"].dtype == np.float32
    np.testing.assert_array_equal(first["state"], eps[1]["state"][[0, 0]].astype(np.float32))
    np.testing.assert_array_equal(first["images"]["wrist"], ds.episode(1).images["wrist"][[0, 0]])
    idx = np.minimum(np.arange(16), 6)  # 7 frames: rows 0..6 then the last one repeated
    np.testing.assert_array_equal(first["action"], eps[1]["action"][idx].astype(np.float32))
    mid = wd[7 + 5]  # episode 2, frame 5
    assert (mid["episode"], mid["frame"]) == (2, 5)
    np.testing.assert_array_equal(mid["state"], eps[2]["state"][[4, 5]].astype(np.float32))
    np.testing.assert_array_equal(
        mid["action"], eps[2]["action"][np.minimum(np.arange(5, 21), 14)].astype(np.float32)
    )
    assert mid["images"]["scene"].shape == (2, H, W, 3)
    # a stride spaces the rows as ObservationHistory does at run time, edge-padded at the start
    strided = WindowDataset(ds, [1, 2], obs_horizon=2, action_horizon=16, obs_stride=3)
    np.testing.assert_array_equal(strided[7 + 5]["state"], eps[2]["state"][[2, 5]].astype(np.float32))
    np.testing.assert_array_equal(strided[7 + 2]["images"]["wrist"], ds.episode(2).images["wrist"][[0, 2]])
    state_only = WindowDataset(EpisodeDataset(root, cameras=[]), None, obs_horizon=1, action_horizon=4)
    assert len(state_only) == 34 and state_only[33]["images"] == {}


def test_split_episodes() -> None:
    train, val = split_episodes(50, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45 and not set(train) & set(val)
    assert sorted(train + val) == list(range(50))
    assert split_episodes(50, 0.1, seed=3) == (train, val)
    assert split_episodes(50, 0.1, seed=4) != (train, val)
    assert len(split_episodes(3, 0.1)[1]) == 1  # at least one validation episode
    assert split_episodes(5, 0.0) == ([0, 1, 2, 3, 4], [])


def test_append_and_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write(root, [make_episode(5, 0)], ["a"])
    write(root, [make_episode(6, 1)], ["b"])  # a second writer appends
    ds = EpisodeDataset(root)
    assert len(ds) == 2 and ds.episode(1).task == "b" and ds.num_frames == 11
    with pytest.raises(DatasetError, match=r"observation\.images\.top"):
        DatasetWriter(root, fps=10.0, cameras={"wrist": (H, W), "top": (H, W)})
    with pytest.raises(DatasetError, match="fps"):
        DatasetWriter(root, fps=20.0, cameras=CAMS)
    with (
        DatasetWriter(root, fps=10.0, cameras=CAMS),
        pytest.raises(DatasetError, match="another DatasetWriter"),
    ):
        DatasetWriter(root, fps=10.0, cameras=CAMS)


def test_bad_input_is_named_and_loses_only_that_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    ep = make_episode(4, 0)
    img = {c: ep["images"][c][0] for c in CAMS}
    with DatasetWriter(root, fps=10.0, cameras=CAMS) as w:
        with pytest.raises(RuntimeError, match="begin_episode"):
            w.add_frame(0.0, img, ep["state"][0], ep["action"][0])
        w.begin_episode("a")
        bad_state = ep["state"][0].copy()
        bad_state[9] = np.nan
        with pytest.raises(ValueError, match=r"state has non-finite value.*gripper"):
            w.add_frame(0.0, img, bad_state, ep["action"][0])
        with pytest.raises(ValueError, match="camera 'scene' image must be uint8"):
            w.add_frame(
                0.0, {"wrist": img["wrist"], "scene": img["scene"][:10]}, ep["state"][0], ep["action"][0]
            )
        with pytest.raises(ValueError, match=r"no image from camera\(s\) \['scene'\]"):
            w.add_frame(0.0, {"wrist": img["wrist"]}, ep["state"][0], ep["action"][0])
        with pytest.raises(ValueError, match="action must have shape"):
            w.add_frame(0.0, img, ep["state"][0], ep["action"][0][:7])
        w.add_frame(0.0, img, ep["state"][0], ep["action"][0])  # the episode goes on after rejected frames
        with pytest.raises(ValueError, match="not after the previous"):
            w.add_frame(0.0, img, ep["state"][1], ep["action"][1])
        w.add_frame(0.1, img, ep["state"][1], ep["action"][1])
        assert w.save_episode() == 0

        # disk full while saving: a clear error, the episode is lost, the dataset is untouched
        w.begin_episode("b")
        w.add_frame(0.0, img, ep["state"][0], ep["action"][0])

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pq, "write_table", full)
        with pytest.raises(OSError, match="disk full while saving episode 1"):
            w.save_episode()
        monkeypatch.undo()
        w.begin_episode("c")  # the writer is still usable
        w.add_frame(0.0, img, ep["state"][2], ep["action"][2])
        assert w.save_episode() == 1
        w.begin_episode("d")
        w.discard_episode()
    ds = EpisodeDataset(root)
    assert [ds.episode(i).task for i in range(len(ds))] == ["a", "c"]
    rep = validate_dataset(root)
    assert rep.ok and not rep.warnings, rep


def test_validate_names_truncated_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write(root, [make_episode(6, s) for s in range(3)], ["a", "b", "a"])
    assert validate_dataset(root).ok
    data = root / "data/chunk-000/file-001.parquet"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    video = root / "videos/observation.images.scene/chunk-000/file-002.mp4"
    video.write_bytes(video.read_bytes()[: int(video.stat().st_size * 0.6)])
    rep = validate_dataset(root)
    assert not rep.ok
    assert any(str(data) in e and "parquet" in e for e in rep.errors), rep.errors
    assert any(str(video) in e for e in rep.errors), rep.errors
    assert not any("file-000" in e for e in rep.errors)  # intact files are not blamed
    with pytest.raises(DatasetError, match=r"file-001\.parquet"):
        EpisodeDataset(root)
    out = subprocess.run(
        [sys.executable, "-m", "carp_policy.dataset.cli", "validate", str(root)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and str(video) in out.stdout and str(data) in out.stdout


def _write_foreign_dataset(root: Path, lengths: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A LeRobot v3.0 dataset as another tool would write it, built by hand from the spec: both
    episodes in one data file and one concatenated MP4, a camera called ``top``, the state under
    ``observation.joints``, tasks.parquet in pandas-index form."""
    fps, n = 10, sum(lengths)
    rng = np.random.default_rng(7)
    joints = rng.normal(size=(n, 6)).astype(np.float32)
    frames = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):  # each frame a distinct flat colour, so alignment errors are obvious
        frames[i] = ((37 * i) % 256, (91 * i + 40) % 256, (23 * i + 128) % 256)
    vid = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    vid.parent.mkdir(parents=True)
    with av.open(str(vid), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    ep_idx = np.concatenate([np.full(L, e) for e, L in enumerate(lengths)])
    fidx = np.concatenate([np.arange(L) for L in lengths])
    (root / "data/chunk-000").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "observation.joints": pa.array(joints.tolist(), pa.list_(pa.float32())),  # variable lists
                "action": pa.array(joints[:, :6].tolist(), pa.list_(pa.float32())),
                "timestamp": pa.array(fidx / fps, pa.float32()),
                "frame_index": pa.array(fidx, pa.int64()),
                "episode_index": pa.array(ep_idx, pa.int64()),
                "index": pa.array(np.arange(n), pa.int64()),
                "task_index": pa.array(ep_idx, pa.int64()),
            }
        ),
        root / "data/chunk-000/file-000.parquet",
    )
    starts = np.cumsum([0, *lengths])
    rows = [
        {
            "episode_index": e,
            "tasks": [f"task {e}"],
            "length": L,
            "data/chunk_index": 0,
            "data/file_index": 0,
            "dataset_from_index": int(starts[e]),
            "dataset_to_index": int(starts[e + 1]),
            "videos/observation.images.top/chunk_index": 0,
            "videos/observation.images.top/file_index": 0,
            "videos/observation.images.top/from_timestamp": starts[e] / fps,
            "videos/observation.images.top/to_timestamp": starts[e + 1] / fps,
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
        }
        for e, L in enumerate(lengths)
    ]
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    t = tasks_table([f"task {e}" for e in range(len(lengths))])
    t = t.rename_columns(["__index_level_0__", "task_index"])
    pq.write_table(t, root / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": n,
        "total_tasks": len(lengths),
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            "observation.joints": {
                "dtype": "float32",
                "shape": [6],
                "names": {"motors": [f"j{i}" for i in range(6)]},
            },
            "action": {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]},
            "observation.images.top": {
                "dtype": "video",
                "shape": [H, W, 3],
                "names": ["height", "width", "channels"],
            },
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    return [joints[starts[e] : starts[e + 1]] for e in range(len(lengths))], [
        frames[starts[e] : starts[e + 1]] for e in range(len(lengths))
    ]


def test_reads_foreign_v3_dataset_with_keymap(tmp_path: Path) -> None:
    root = tmp_path / "foreign"
    joints, frames = _write_foreign_dataset(root, [6, 9])
    with pytest.raises(DatasetError, match=r"no state feature 'observation.state'.*observation.joints"):
        EpisodeDataset(root)
    km = tmp_path / "keymap.yaml"
    km.write_text(
        "state_key: observation.joints\naction_key: action\ncameras:\n  wrist: observation.images.top\n"
    )
    ds = EpisodeDataset(root, keymap=km)
    assert ds.cameras == ["wrist"] and ds.state_names == [f"j{i}" for i in range(6)] and len(ds) == 2
    for e in range(2):
        ep = ds.episode(e)
        assert ep.task == f"task {e}"
        np.testing.assert_array_equal(ep.state, joints[e])
        np.testing.assert_allclose(ep.timestamps, np.arange(len(joints[e])) / 10, atol=1e-6)
        err = np.abs(ep.images["wrist"].astype(int) - frames[e].astype(int)).max(axis=(1, 2, 3))
        assert (err <= 6).all(), err  # flat colours survive 4:2:0 H.264 almost exactly
    wd = WindowDataset(ds, [1], obs_horizon=2, action_horizon=16)
    assert wd[0]["images"]["wrist"].shape == (2, H, W, 3) and len(wd) == 9
    assert validate_dataset(root).ok
    with pytest.raises(DatasetError, match=r"'wrist' maps to 'observation\.images\.cam'"):
        EpisodeDataset(
            root, keymap=KeyMap(state_key="observation.joints", cameras={"wrist": "observation.images.cam"})
        )


def test_cli_info_view_export(recorded: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, eps = recorded
    run = [sys.executable, "-m", "carp_policy.dataset.cli"]
    out = subprocess.run([*run, "info", str(root)], capture_output=True, text=True, check=True).stdout
    assert "episodes  3  (2 success, 1 failure)" in out and "frames    34" in out
    assert "2  pick up the cup" in out and "wrist 48x64" in out
    mp4 = tmp_path / "ep1.mp4"
    subprocess.run(
        [*run, "view", str(root), "--episode", "1", "-o", str(mp4)], capture_output=True, check=True
    )
    with av.open(str(mp4)) as c:
        n = sum(1 for _ in c.decode(video=0))
        s = c.streams.video[0]
        assert n == 7 and s.width > W and s.height >= 2 * H  # cameras stacked + the plot beside
    dst = tmp_path / "subset"
    subprocess.run(
        [*run, "export", str(root), str(dst), "--episodes", "0-1", "--success-only"],
        capture_output=True,
        check=True,
    )
    sub = EpisodeDataset(dst)
    assert len(sub) == 1 and sub.episode(0).metadata["exported_from"].endswith("#0")
    np.testing.assert_array_equal(sub.episode(0).action, eps[0]["action"].astype(np.float32))


def test_environment_state_round_trip_keymap_and_export(tmp_path: Path) -> None:
    """observation.environment_state (object poses) is written as its own LeRobot feature, read
    appended to the state when the key map asks for it, and survives carp-dataset export."""
    root, names = tmp_path / "env", ["object_x", "object_y", "target_x"]
    eps = [make_episode(T, seed) for seed, T in enumerate([6, 9])]
    envs = [np.random.default_rng(10 + i).normal(size=(len(ep["t"]), 3)) for i, ep in enumerate(eps)]
    with DatasetWriter(root, fps=10.0, cameras=CAMS, env_state_names=names) as w:
        for ep, env in zip(eps, envs):
            w.begin_episode(task="pick up the cup")
            for t in range(len(ep["t"])):
                imgs = {c: ep["images"][c][t] for c in CAMS}
                w.add_frame(ep["t"][t], imgs, ep["state"][t], ep["action"][t], env_state=env[t])
            w.save_episode()
        w.begin_episode(task="x")
        with pytest.raises(ValueError, match="records an environment state; none was given"):
            w.add_frame(
                1.0, {c: eps[0]["images"][c][0] for c in CAMS}, eps[0]["state"][0], eps[0]["action"][0]
            )
        with pytest.raises(ValueError, match=r"env_state has non-finite value\(s\) in \['object_y'\]"):
            w.add_frame(
                1.0, {c: eps[0]["images"][c][0] for c in CAMS}, eps[0]["state"][0], eps[0]["action"][0],
                env_state=np.array([0.0, np.nan, 0.0]),
            )  # fmt: skip
    info = json.loads((root / "meta/info.json").read_text())
    assert info["features"]["observation.environment_state"]["names"] == names
    assert not validate_dataset(root).errors
    plain = EpisodeDataset(root)  # default key map: robot state only
    assert plain.state_names == STATE_NAMES and plain.vectors(1)["state"].shape == (9, 10)
    ds = EpisodeDataset(root, keymap=KeyMap(env_state_key="observation.environment_state"))
    assert ds.state_names == [*STATE_NAMES, *names]
    np.testing.assert_allclose(ds.vectors(1)["state"], np.c_[eps[1]["state"], envs[1]], atol=1e-6)
    stats = ds.stats()["observation.state"]
    np.testing.assert_allclose(stats["max"][10:], np.max(np.concatenate(envs), 0), atol=1e-6)
    with pytest.raises(DatasetError, match="give the writer the same env_state_names"):
        DatasetWriter(root, fps=10.0, cameras=CAMS)
    with pytest.raises(DatasetError, match=r"no environment state feature 'observation\.other'"):
        EpisodeDataset(root, keymap=KeyMap(env_state_key="observation.other"))
    r = subprocess.run(
        [sys.executable, "-m", "carp_policy.dataset.cli", "export", str(root), str(tmp_path / "copy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    copy = EpisodeDataset(tmp_path / "copy", keymap=KeyMap(env_state_key="observation.environment_state"))
    np.testing.assert_allclose(copy.vectors(0)["state"], ds.vectors(0)["state"], atol=1e-6)

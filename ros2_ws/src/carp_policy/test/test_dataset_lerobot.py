"""Round trips through what LeRobot 0.6 leaves behind, with no LeRobot installed.

The helpers below rebuild on disk, from the v3.0 layout as LeRobot 0.6.1 writes it (read from its
``dataset_writer.py``, ``dataset_metadata.py``, ``dataset_tools.py`` and ``aggregate.py``), what
``LeRobotDataset.resume()`` + ``save_episode`` + ``finalize()``, ``delete_episodes`` / ``split``
and ``merge`` produce from one of our datasets:
- resume(): a new data file after the last one holding all new episodes, one AV1 (libsvtav1,
  yuv420p, g=2) MP4 per camera holding them back to back, a new ``meta/episodes`` file with
  LeRobot's columns only, info.json rewritten without keys LeRobot does not know, our sidecar
  untouched;
- delete/split: a new directory; data files filtered and renumbered (episode_index, index,
  task_index), untouched videos copied, partly kept ones re-encoded with the encoder info.json
  records; one episodes file rebuilt from LeRobot's columns (our sidecar is not copied);
- merge: data and videos of all sources concatenated into shared files, episode rows shifted.
``scripts/check_lerobot.sh`` runs the real LeRobot 0.6.1 on the same paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from carp_policy.actions import ACTION_NAMES, STATE_NAMES
from carp_policy.dataset import DatasetError, DatasetWriter, EpisodeDataset, validate_dataset
from carp_policy.dataset.format import (
    CARP_EPISODES_PATH,
    CHUNKS_SIZE,
    aggregate_stats,
    decode_video,
    feature_stats,
    image_stats,
    ns_to_seconds,
    read_episode_rows,
    read_tasks,
    seconds_to_ns,
    stats_to_json,
    tasks_table,
)

H, W = 32, 48
CAMS = {"wrist": (H, W)}
ENV = ["obj_x", "obj_y"]
FPS = 10
EPOCH_NS = 1_800_000_000_123_456_789  # 2027 in ns; float32 seconds there resolve ~2 minutes
LEROBOT_INFO_KEYS = {  # DatasetInfo's fields: LeRobot drops every other key when it rewrites info.json
    "codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks", "chunks_size",
    "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path", "robot_type", "splits",
}  # fmt: skip
CLI = [sys.executable, "-m", "carp_policy.dataset.cli"]


def frames_of(k: int, T: int) -> np.ndarray:
    """Episode k's frames: flat colours, distinct per frame (survive AV1/H.264 nearly exactly)."""
    f = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        f[t] = ((40 * k + 25 * t) % 230, (90 + 17 * t) % 230, (20 * k + 60) % 230)
    return f


def vectors_of(k: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + k)
    return rng.normal(size=(T, 10)), rng.normal(size=(T, 10)), rng.normal(size=(T, 2))


def write_ours(
    root: Path, outcomes: list[bool | None], lengths: list[int] | None = None, k0: int = 0
) -> None:
    """Our writer, epoch-sized capture times with a per-stream offset (camera 33 ms older)."""
    lengths = lengths or [5 + i for i in range(len(outcomes))]
    with DatasetWriter(
        root, fps=FPS, cameras=CAMS, state_names=STATE_NAMES, action_names=ACTION_NAMES, env_state_names=ENV
    ) as w:
        for i, (ok, T) in enumerate(zip(outcomes, lengths)):
            k = k0 + i
            st, act, env = vectors_of(k, T)
            img = frames_of(k, T)
            w.begin_episode(f"task {k % 2}")
            for t in range(T):
                tn = EPOCH_NS + k * 60 * 10**9 + t * 100_000_001
                w.add_frame(
                    None, {"wrist": img[t]}, st[t], act[t], env_state=env[t], timestamp_ns=tn,
                    stamps_ns={"state": tn - 1_000_003, "wrist": tn - 33_000_007,
                               "env_state": tn - 1_000_003},
                )  # fmt: skip
            w.save_episode(success=ok, metadata={"k": k})


# ----------------------------------------------------------------------------- LeRobot, rebuilt
def _info(root: Path) -> dict:
    return json.loads((root / "meta/info.json").read_text())


def _write_info(root: Path, info: dict) -> None:
    (root / "meta/info.json").write_text(
        json.dumps({k: v for k, v in info.items() if k in LEROBOT_INFO_KEYS})
    )


def _pos(row: dict, prefix: str) -> int:
    return row[f"{prefix}/chunk_index"] * CHUNKS_SIZE + row[f"{prefix}/file_index"]


# LeRobot 0.6 encodes with SVT-AV1; PyAV wheels before ~15 carry libaom's AV1 encoder instead
AV1 = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
if AV1 is None:
    pytest.skip("this PyAV has no AV1 encoder (LeRobot 0.6's default codec)", allow_module_level=True)


def _encode(path: Path, frames: np.ndarray, codec: str = "libsvtav1", pix_fmt: str = "yuv420p") -> None:
    """LeRobot 0.6's default encoder (libsvtav1, yuv420p, g=2, crf 30, preset 12), or the one given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec == "libsvtav1":
        codec = AV1
    opts = {"g": "2", "crf": "30"}
    extra = {"libsvtav1": {"preset": "12"}, "libaom-av1": {"cpu-used": "8"}}
    opts |= extra.get(codec, {"crf": "15", "g": "10"})
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt, s.options = W, H, pix_fmt, opts
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def _episode_stats(cols: dict[str, np.ndarray], frames: dict[str, np.ndarray], info: dict) -> dict:
    out = {}
    for key, ft in info["features"].items():
        if ft["dtype"] == "video":
            st = image_stats(frames[key])
        else:
            st = feature_stats(np.asarray(cols[key]).reshape(len(cols["index"]), -1))
        for name, v in st.items():
            out[f"stats/{key}/{name}"] = np.asarray(v).tolist()
    return out


def _data_table(info: dict, cols: dict[str, np.ndarray]) -> pa.Table:
    """A data parquet as LeRobot writes it: fixed-size lists for vectors, the features' dtypes."""
    arrays, fields = [], []
    for key, ft in info["features"].items():
        if ft["dtype"] == "video":
            continue
        x = np.asarray(cols[key])
        typ = pa.float32() if ft["dtype"] == "float32" else pa.int64()
        if ft["shape"] == [1]:
            arrays.append(pa.array(x.reshape(-1), typ))
            fields.append((key, typ))
        else:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), typ), x.shape[1]))
            fields.append((key, pa.list_(typ, x.shape[1])))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write_stats(root: Path, rows: list[dict]) -> None:
    feats = sorted({k.split("/")[1] for k in rows[0] if k.startswith("stats/")})
    stats = {}
    for f in feats:
        names = [k.rsplit("/", 1)[1] for k in rows[0] if k.startswith(f"stats/{f}/")]
        stats[f] = aggregate_stats([{n: np.asarray(r[f"stats/{f}/{n}"], float) for n in names} for r in rows])
    (root / "meta/stats.json").write_text(json.dumps(stats_to_json(stats)))


def lerobot_resume_append(root: Path, lengths: list[int], task: str = "lerobot task") -> list[dict]:
    """resume() + save_episode() per episode + finalize(), as LeRobot 0.6.1 lays them out."""
    info = _info(root)
    rows = read_episode_rows(root)[0]
    rows.sort(key=lambda r: r["episode_index"])
    last = rows[-1]
    tasks = read_tasks(root)
    if task not in tasks:
        tasks.append(task)
        pq.write_table(tasks_table(tasks), root / "meta/tasks.parquet")
    data_pos, meta_pos = _pos(last, "data") + 1, max(_pos(r, "meta/episodes") for r in rows) + 1
    cams = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    new_rows, tables, videos, start, t0 = [], [], {c: [] for c in cams}, last["dataset_to_index"], 0.0
    for j, T in enumerate(lengths):
        e = info["total_episodes"] + j
        st, act, env = vectors_of(e, T)
        tn = EPOCH_NS + 10**15 + e * 60 * 10**9 + np.arange(T) * 100_000_003
        cols = {
            "observation.state": st.astype(np.float32), "action": act.astype(np.float32),
            "observation.environment_state": env.astype(np.float32), "capture_time_ns": tn,
            **{f"capture_time_ns.{s}": tn - 5 for s in ("state", "wrist", "env_state")},
            "timestamp": (np.arange(T) / FPS).astype(np.float32), "frame_index": np.arange(T),
            "episode_index": np.full(T, e), "index": start + np.arange(T),
            "task_index": np.full(T, tasks.index(task)),
        }  # fmt: skip
        frames = {c: frames_of(e, T) for c in cams}
        for c in cams:
            videos[c].append(frames[c])
        tables.append(_data_table(info, cols))
        row = {"episode_index": e, "tasks": [task], "length": T}
        row |= {"data/chunk_index": data_pos // CHUNKS_SIZE, "data/file_index": data_pos % CHUNKS_SIZE}
        row |= {"dataset_from_index": start, "dataset_to_index": start + T}
        for c in cams:
            vpos = _pos(last, f"videos/{c}") + 1
            row |= {f"videos/{c}/chunk_index": vpos // CHUNKS_SIZE,
                    f"videos/{c}/file_index": vpos % CHUNKS_SIZE,
                    f"videos/{c}/from_timestamp": t0, f"videos/{c}/to_timestamp": t0 + T / FPS}  # fmt: skip
        row |= _episode_stats(cols, frames, info)
        row |= {
            "meta/episodes/chunk_index": meta_pos // CHUNKS_SIZE,
            "meta/episodes/file_index": meta_pos % CHUNKS_SIZE,
        }
        new_rows.append(row)
        start, t0 = start + T, t0 + T / FPS
    dpath = root / info["data_path"].format(
        chunk_index=data_pos // CHUNKS_SIZE, file_index=data_pos % CHUNKS_SIZE
    )
    dpath.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), dpath)
    for c in cams:
        vpos = _pos(last, f"videos/{c}") + 1
        _encode(root / info["video_path"].format(video_key=c, chunk_index=vpos // CHUNKS_SIZE,
                                                 file_index=vpos % CHUNKS_SIZE),
                np.concatenate(videos[c]))  # fmt: skip
    epath = (
        root / f"meta/episodes/chunk-{meta_pos // CHUNKS_SIZE:03d}/file-{meta_pos % CHUNKS_SIZE:03d}.parquet"
    )
    epath.parent.mkdir(parents=True, exist_ok=True)
    combined = {k: [r[k] for r in new_rows] for k in new_rows[0]}  # LeRobot: pa.Table.from_pydict
    pq.write_table(pa.Table.from_pydict(combined), epath)
    info["total_episodes"] += len(lengths)
    info["total_frames"] = start
    info["total_tasks"] = len(tasks)
    info["splits"] = {"train": f"0:{info['total_episodes']}"}
    _write_info(root, info)
    _write_stats(root, rows + new_rows)
    return new_rows


def lerobot_keep(src: Path, dst: Path, keep: list[int]) -> None:
    """delete_episodes(all but ``keep``) / one part of split_dataset, into ``dst``."""
    info = _info(src)
    rows = sorted(read_episode_rows(src)[0], key=lambda r: r["episode_index"])
    mapping = {old: new for new, old in enumerate(keep)}
    old_tasks = read_tasks(src)
    used = {t for e in keep for t in rows[e]["tasks"]}
    new_tasks = sorted(used, reverse=True)  # LeRobot: list(set(...)), any order: task_index is remapped
    (dst / "meta").mkdir(parents=True)
    pq.write_table(tasks_table(new_tasks), dst / "meta/tasks.parquet")
    cams = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    by_file: dict[int, list[int]] = {}
    for e in keep:
        by_file.setdefault(_pos(rows[e], "data"), []).append(e)
    global_index, data_meta = 0, {}
    for pos in sorted(by_file):
        eps = by_file[pos]
        rel = info["data_path"].format(chunk_index=pos // CHUNKS_SIZE, file_index=pos % CHUNKS_SIZE)
        t = pq.read_table(src / rel)
        t = t.filter(pc.is_in(t["episode_index"], pa.array(eps)))
        ep_new = [mapping[e] for e in t["episode_index"].to_pylist()]
        task_new = [new_tasks.index(old_tasks[i]) for i in t["task_index"].to_pylist()]
        t = t.set_column(
            t.schema.get_field_index("episode_index"), "episode_index", pa.array(ep_new, pa.int64())
        )
        t = t.set_column(t.schema.get_field_index("index"), "index",
                         pa.array(range(global_index, global_index + t.num_rows), pa.int64()))  # fmt: skip
        t = t.set_column(t.schema.get_field_index("task_index"), "task_index", pa.array(task_new, pa.int64()))
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, dst / rel)
        for e in eps:
            idx = np.asarray(t["index"])[np.asarray(t["episode_index"]) == mapping[e]]
            data_meta[e] = {"data/chunk_index": pos // CHUNKS_SIZE, "data/file_index": pos % CHUNKS_SIZE,
                            "dataset_from_index": int(idx.min()),
                            "dataset_to_index": int(idx.max() + 1)}  # fmt: skip
        global_index += t.num_rows
    video_meta: dict[int, dict] = {e: {} for e in keep}
    for c in cams:
        in_file: dict[int, list[int]] = {}
        for e, r in enumerate(rows):
            in_file.setdefault(_pos(r, f"videos/{c}"), []).append(e)
        for pos, eps in sorted(in_file.items()):
            kept = [e for e in eps if e in mapping]
            if not kept:
                continue
            rel = info["video_path"].format(
                video_key=c, chunk_index=pos // CHUNKS_SIZE, file_index=pos % CHUNKS_SIZE
            )
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            loc = {"chunk_index": pos // CHUNKS_SIZE, "file_index": pos % CHUNKS_SIZE}
            if kept == eps:
                shutil.copy(src / rel, dst / rel)
                for e in kept:
                    video_meta[e] |= {f"videos/{c}/{k}": v for k, v in loc.items()}
                    video_meta[e] |= {f"videos/{c}/{k}": rows[e][f"videos/{c}/{k}"]
                                      for k in ("from_timestamp", "to_timestamp")}  # fmt: skip
                continue
            # partly kept: re-encoded with the encoder info.json records (ours: H.264 yuv444p)
            frames, _ = decode_video(src / rel)
            segs = [frames[round(rows[e][f"videos/{c}/from_timestamp"] * FPS):
                           round(rows[e][f"videos/{c}/to_timestamp"] * FPS)] for e in kept]  # fmt: skip
            vi = info["features"][c].get("info", {})
            codec = {"h264": "libx264", "av1": "libsvtav1"}[vi["video.codec"]]
            _encode(dst / rel, np.concatenate(segs), codec, vi["video.pix_fmt"])
            t0 = 0.0
            for e, seg in zip(kept, segs):
                video_meta[e] |= {f"videos/{c}/{k}": v for k, v in loc.items()}
                video_meta[e] |= {
                    f"videos/{c}/from_timestamp": t0,
                    f"videos/{c}/to_timestamp": t0 + len(seg) / FPS,
                }
                t0 += len(seg) / FPS
    new_rows = []
    for e in keep:
        r = rows[e]
        row = {"episode_index": mapping[e], "tasks": r["tasks"], "length": r["length"]}
        row |= data_meta[e] | video_meta[e]
        row |= {k: v for k, v in r.items() if k.startswith("stats/")}  # copied as they were
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        new_rows.append(row)
    (dst / "meta/episodes/chunk-000").mkdir(parents=True)
    combined = {k: [r[k] for r in new_rows] for k in new_rows[0]}
    pq.write_table(pa.Table.from_pydict(combined), dst / "meta/episodes/chunk-000/file-000.parquet")
    info |= {"total_episodes": len(keep), "total_frames": global_index, "total_tasks": len(new_tasks),
             "splits": {"train": f"0:{len(keep)}"}}  # fmt: skip
    _write_info(dst, info)
    _write_stats(dst, new_rows)


def lerobot_merge(srcs: list[Path], dst: Path) -> None:
    """merge_datasets(concatenate_data=True, concatenate_videos=True): one data file, one MP4 per
    camera (LeRobot remuxes packets; the sources must share a codec), episode rows shifted."""
    info0 = _info(srcs[0])
    cams = [k for k, f in info0["features"].items() if f["dtype"] == "video"]
    tasks: list[str] = []
    for s in srcs:
        tasks += [t for t in read_tasks(s) if t not in tasks]
    tables, rows_out, frames = [], [], {c: [] for c in cams}
    n_ep = n_fr = 0
    for s in srcs:
        info = _info(s)
        st = read_tasks(s)
        rows = sorted(read_episode_rows(s)[0], key=lambda r: r["episode_index"])
        files = sorted({_pos(r, "data") for r in rows})
        for pos in files:
            t = pq.read_table(
                s / info["data_path"].format(chunk_index=pos // CHUNKS_SIZE, file_index=pos % CHUNKS_SIZE)
            )
            new = {
                "episode_index": [v + n_ep for v in t["episode_index"].to_pylist()],
                "index": [v + n_fr for v in t["index"].to_pylist()],
                "task_index": [tasks.index(st[v]) for v in t["task_index"].to_pylist()],
            }
            for name, vals in new.items():
                t = t.set_column(t.schema.get_field_index(name), name, pa.array(vals, pa.int64()))
            tables.append(t)
        offset: dict[str, dict[int, float]] = {c: {} for c in cams}  # source file -> start in the merged MP4
        for r in rows:
            for c in cams:
                pos = _pos(r, f"videos/{c}")
                if pos not in offset[c]:
                    offset[c][pos] = sum(len(f) for f in frames[c]) / FPS
                    rel = info["video_path"].format(
                        video_key=c, chunk_index=pos // CHUNKS_SIZE, file_index=pos % CHUNKS_SIZE
                    )
                    frames[c].append(decode_video(s / rel)[0])
        for r in rows:
            row = dict(r)
            row["episode_index"] += n_ep
            row["dataset_from_index"] += n_fr
            row["dataset_to_index"] += n_fr
            row |= {"data/chunk_index": 0, "data/file_index": 0, "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0}  # fmt: skip
            for c in cams:
                off = offset[c][_pos(r, f"videos/{c}")]
                row |= {f"videos/{c}/chunk_index": 0, f"videos/{c}/file_index": 0}
                row[f"videos/{c}/from_timestamp"] += off
                row[f"videos/{c}/to_timestamp"] += off
            for name, off in (("episode_index", n_ep), ("index", n_fr)):
                for stat in ("min", "max", "mean", "q01", "q10", "q50", "q90", "q99"):
                    row[f"stats/{name}/{stat}"] = [v + off for v in row[f"stats/{name}/{stat}"]]
            rows_out.append(row)
        n_ep += info["total_episodes"]
        n_fr += info["total_frames"]
    (dst / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.concat_tables(tables), dst / "data/chunk-000/file-000.parquet")
    for c in cams:
        vi = info0["features"][c]["info"]
        codec = {"h264": "libx264", "av1": "libsvtav1"}[vi["video.codec"]]
        _encode(
            dst / f"videos/{c}/chunk-000/file-000.mp4", np.concatenate(frames[c]), codec, vi["video.pix_fmt"]
        )
    (dst / "meta/episodes/chunk-000").mkdir(parents=True)
    combined = {k: [r[k] for r in rows_out] for k in rows_out[0]}
    pq.write_table(pa.Table.from_pydict(combined), dst / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(tasks_table(tasks), dst / "meta/tasks.parquet")
    info0 |= {"total_episodes": n_ep, "total_frames": n_fr, "total_tasks": len(tasks),
              "splits": {"train": f"0:{n_ep}"}}  # fmt: skip
    _write_info(dst, info0)
    _write_stats(dst, rows_out)


# ----------------------------------------------------------------------------- the checks
def successes(root: Path) -> list[bool | None]:
    ds = EpisodeDataset(root, cameras=[])
    return [ds.success(i) for i in range(len(ds))]


def append_one(root: Path, k: int, ok: bool | None) -> int:
    """Our writer continues the dataset with the settings it records."""
    st, act, env = vectors_of(k, 4)
    img = frames_of(k, 4)
    with DatasetWriter.open(root) as w:
        w.begin_episode("appended by carp")
        for t in range(4):
            w.add_frame(2.0e9 + 0.1 * t, {"wrist": img[t]}, st[t], act[t], env_state=env[t])
        return w.save_episode(success=ok, metadata={"k": k})


def assert_same_episode(ds: EpisodeDataset, i: int, k: int, T: int) -> None:
    """Position i of ds is episode k of write_ours: vectors bit-identical, ns exact, frames close."""
    st, act, _ = vectors_of(k, T)
    ep = ds.episode(i)
    np.testing.assert_array_equal(ep.state, st.astype(np.float32))
    np.testing.assert_array_equal(ep.action, act.astype(np.float32))
    tn = EPOCH_NS + k * 60 * 10**9 + np.arange(T) * 100_000_001
    np.testing.assert_array_equal(ep.time_ns, tn)
    np.testing.assert_array_equal(ep.stamps_ns["wrist"], tn - 33_000_007)
    assert np.abs(ep.images["wrist"].astype(int) - frames_of(k, T).astype(int)).max() <= 8


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lr") / "ours"
    write_ours(root, [True, False, None])  # lengths 5, 6, 7
    return root


def test_our_episode_files_have_lerobots_columns(ours: Path) -> None:
    files = read_episode_rows(ours)[1]
    cols = set(files[0][1].names)
    info = _info(ours)
    for key in info["features"]:  # stats of every feature, bookkeeping and capture times included
        assert {f"stats/{key}/{s}" for s in ("min", "max", "mean", "std", "count", "q01", "q99")} <= cols, key
    assert not cols & {"success", "metadata"}
    assert set(info) <= LEROBOT_INFO_KEYS  # nothing LeRobot would warn about and drop
    vi = info["features"]["observation.images.wrist"]["info"]
    assert vi["is_depth_map"] is False and "video.is_depth_map" not in vi
    assert (vi["video.codec"], vi["video.pix_fmt"], vi["video.crf"], vi["video.g"]) == (
        "h264",
        "yuv444p",
        15,
        10,
    )
    types = {f.name: f.type for f in files[0][1]}  # LeRobot's own types (list<double>, count list<int64>)
    assert types["stats/frame_index/min"] == pa.list_(pa.float64()) and types[
        "stats/index/count"
    ] == pa.list_(pa.int64())
    assert successes(ours) == [True, False, None]


def test_capture_times_are_int64_nanoseconds_at_epoch_scale(ours: Path) -> None:
    ds = EpisodeDataset(ours, cameras=[])
    t = pq.read_table(ours / "data/chunk-000/file-001.parquet")
    assert t.schema.field("capture_time_ns").type == pa.int64()
    ns = t["capture_time_ns"].to_numpy()
    np.testing.assert_array_equal(np.diff(ns), 100_000_001)  # every nanosecond kept
    # what a float32 reader (LeRobot's default for floats) would have made of seconds: minutes lost
    as_f32 = ns_to_seconds(ns).astype(np.float32)
    assert np.all(as_f32 == as_f32[0])
    np.testing.assert_array_equal(ds.vectors(1)["time_ns"], ns)
    assert seconds_to_ns(1_800_000_000.123456) == 1_800_000_000_123_456_001  # the float's own digits
    np.testing.assert_array_equal(t["capture_time_ns.wrist"].to_numpy(), ns - 33_000_007)
    np.testing.assert_array_equal(t["capture_time_ns.state"].to_numpy(), ns - 1_000_003)


def test_stream_stamps_are_checked(tmp_path: Path) -> None:
    img = {"wrist": frames_of(0, 1)[0]}
    st, act, env = vectors_of(0, 3)
    with DatasetWriter(tmp_path / "d", fps=FPS, cameras=CAMS, env_state_names=ENV) as w:
        w.begin_episode("a")
        with pytest.raises(ValueError, match=r"stamps must name every stream.*missing \['env_state'\]"):
            w.add_frame(1.0, img, st[0], act[0], env_state=env[0], stamps={"state": 1.0, "wrist": 0.97})
        with pytest.raises(ValueError, match="timestamp_ns must be an int"):
            w.add_frame(None, img, st[0], act[0], env_state=env[0], timestamp_ns=1.5)
        with pytest.raises(ValueError, match="exactly one of timestamp"):
            w.add_frame(1.0, img, st[0], act[0], env_state=env[0], timestamp_ns=10**9)
        w.add_frame(
            1.0, img, st[0], act[0], env_state=env[0], stamps={"state": 1.0, "wrist": 0.97, "env_state": 1.0}
        )
        with pytest.raises(ValueError, match="stream 'wrist' went backwards"):
            w.add_frame(
                1.1,
                img,
                st[1],
                act[1],
                env_state=env[1],
                stamps={"state": 1.1, "wrist": 0.9, "env_state": 1.1},
            )
        with pytest.raises(ValueError, match="success must be True, False or None"):
            w.save_episode(success="yes")
    with pytest.raises(ValueError, match="collide"):
        DatasetWriter(tmp_path / "e", cameras={"state": (H, W)})
    # LeRobot takes any stats key containing "image" for an image's: the column avoids the word
    with DatasetWriter(tmp_path / "f", fps=FPS, cameras={"wrist_image": (H, W)}) as w:
        assert w.streams["wrist_image"] == "capture_time_ns.wrist_img"
        w.begin_episode("a")
        w.add_frame(0.0, {"wrist_image": img["wrist"]}, st[0], act[0])
        w.save_episode()
    ep = EpisodeDataset(tmp_path / "f").episode(0)
    assert set(ep.stamps_ns) == {"state", "wrist_image"} and ep.success is None


def test_after_resume_append_everything_still_reads_validates_and_continues(
    ours: Path, tmp_path: Path
) -> None:
    root = tmp_path / "resumed"
    shutil.copytree(ours, root)
    lerobot_resume_append(root, [4, 6])
    assert len(read_episode_rows(root)[1]) == 2  # a second episodes file, LeRobot's columns only
    rep = validate_dataset(root)
    assert rep.ok and not rep.warnings, (rep.errors, rep.warnings)
    ds = EpisodeDataset(root)
    assert [ds.success(i) for i in range(5)] == [True, False, None, None, None]  # LeRobot's: unknown
    assert ds.metadata(3) == {} and ds.metadata(1)["k"] == 1
    for i, (k, T) in enumerate([(0, 5), (1, 6), (2, 7)]):
        assert_same_episode(ds, i, k, T)
    ep4 = ds.episode(4)  # the second of two episodes in one AV1 file
    assert ep4.time_ns[0] == EPOCH_NS + 10**15 + 4 * 60 * 10**9 and ep4.task == "lerobot task"
    assert np.abs(ep4.images["wrist"].astype(int) - frames_of(4, 6).astype(int)).max() <= 12
    assert decode_video(root / "videos/observation.images.wrist/chunk-000/file-003.mp4")[0].shape[0] == 10

    assert append_one(root, 9, False) == 5
    rows, files = read_episode_rows(root)
    assert len(files) == 2 and files[1][2] == 3  # appended to LeRobot's file, in its schema
    assert rows[-1]["data/file_index"] == 5 and rows[-1]["meta/episodes/file_index"] == 1
    assert validate_dataset(root).ok
    assert successes(root) == [True, False, None, None, None, False]
    lerobot_resume_append(root, [3])  # and LeRobot continues after us
    assert validate_dataset(root).ok and successes(root)[-2:] == [False, None]


def test_a_crash_while_appending_to_lerobots_file_is_rolled_back(ours: Path, tmp_path: Path) -> None:
    """Our save interrupted just before its commit (info.json) while the last episodes file is
    LeRobot's: the next writer removes the uncommitted row, sidecar line and files."""
    root = tmp_path / "crash"
    shutil.copytree(ours, root)
    lerobot_resume_append(root, [4])
    before = (root / "meta/info.json").read_bytes()
    lerobot_file = read_episode_rows(root)[1][-1][0]
    append_one(root, 30, True)
    (root / "meta/info.json").write_bytes(before)  # as if killed before the info.json rename
    rep = validate_dataset(root)
    assert rep.ok and any("uncommitted" in w for w in rep.warnings), rep.warnings
    assert successes(root) == [True, False, None, None]
    with DatasetWriter.open(root):
        pass
    rep = validate_dataset(root)
    assert rep.ok and not rep.warnings, rep.warnings
    assert pq.read_table(lerobot_file).num_rows == 1  # LeRobot's row kept, ours rolled back
    assert len((root / CARP_EPISODES_PATH).read_text().splitlines()) == 3
    assert append_one(root, 31, False) == 4 and successes(root) == [True, False, None, None, False]


def test_old_episode_files_beside_lerobots_are_a_schema_split(ours: Path, tmp_path: Path) -> None:
    """A dataset of the previous version (success/metadata columns, no stats of bookkeeping
    columns) extended by LeRobot: LeRobot cannot load it; we say so, still read it, never guess."""
    root = tmp_path / "old"
    shutil.copytree(ours, root)
    p = root / "meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(p)
    t = t.drop(
        [c for c in t.column_names if c.split("/")[1:2] in (["timestamp"], ["frame_index"], ["index"])]
    )
    t = t.append_column("success", pa.array([True, False, None]))
    t = t.append_column("metadata", pa.array(['{"k": 0}', '{"k": 1}', ""]))
    pq.write_table(t, p)
    (root / CARP_EPISODES_PATH).unlink()
    rep = validate_dataset(root)
    assert rep.ok and any("resume()" in w for w in rep.warnings), rep.warnings  # warned before the split
    lerobot_resume_append(root, [4])
    rep = validate_dataset(root)
    assert not rep.ok and any("columns differ" in e and "LeRobot cannot load" in e for e in rep.errors), (
        rep.errors
    )
    with pytest.raises(DatasetError, match="columns differ"):
        DatasetWriter.open(root)
    assert successes(root) == [True, False, None, None]  # the old column read as it is; empty = unknown
    # export rewrites it in the current form, flags kept (the unknown one stays unknown)
    new = tmp_path / "converted"
    r = subprocess.run([*CLI, "export", str(root), str(new)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = validate_dataset(new)
    assert rep.ok and not rep.warnings and successes(new) == [True, False, None, None], rep.warnings
    assert EpisodeDataset(new, cameras=[]).vectors(3)["time_ns"][0] == EPOCH_NS + 10**15 + 3 * 60 * 10**9


def test_delete_split_merge_keep_data_and_lose_no_outcome(ours: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ours, src)
    lerobot_resume_append(src, [4, 6])  # 5 episodes: ours 0-2 (H.264), LeRobot's 3-4 (one AV1 file)
    truth = successes(src)
    lengths = [5, 6, 7, 4, 6]
    dele, part_a, part_b, merged = tmp_path / "del", tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    lerobot_keep(src, dele, [0, 2, 4])  # LeRobot's AV1 file partly kept: re-encoded (H.264, per info.json)
    lerobot_keep(src, part_a, [0, 1])
    lerobot_keep(src, part_b, [2])
    lerobot_merge([part_a, part_b], merged)
    for root, kept in ((dele, [0, 2, 4]), (part_a, [0, 1]), (part_b, [2]), (merged, [0, 1, 2])):
        rep = validate_dataset(root)
        assert rep.ok, (root.name, rep.errors)
        ds = EpisodeDataset(root)
        for i, k in enumerate(kept):
            if k < 3:
                assert_same_episode(ds, i, k, lengths[k])
        assert successes(root) == [None] * len(kept)  # the sidecar did not come along: unknown, not True
        r = subprocess.run([*CLI, "restore-meta", str(root), str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert successes(root) == [truth[k] for k in kept], root.name
        assert EpisodeDataset(root, cameras=[]).metadata(0)["k"] == kept[0]
        i = append_one(root, 20, True)
        assert i == len(kept) and validate_dataset(root).ok and successes(root)[-1] is True


def test_a_copied_sidecar_follows_the_data_not_the_position(ours: Path, tmp_path: Path) -> None:
    """LeRobot renumbers episodes; a sidecar copied along must not hand episode 1's failure to
    the episode now at position 1, and identical data with different outcomes stays unknown."""
    dele = tmp_path / "del"
    lerobot_keep(ours, dele, [0, 2])  # positions: 0 -> ep 0 (success), 1 -> ep 2 (unknown)
    (dele / CARP_EPISODES_PATH).parent.mkdir(parents=True)
    shutil.copy(ours / CARP_EPISODES_PATH, dele / CARP_EPISODES_PATH)  # a user's cp -r meta/
    assert successes(dele) == [True, None]  # not [True, False]: ep 1's record matches no data here
    twins = tmp_path / "twins"
    with DatasetWriter(twins, fps=FPS, cameras=CAMS, env_state_names=ENV) as w:
        st, act, env = vectors_of(0, 3)
        for ok in (True, False):
            w.begin_episode("same")
            for t in range(3):
                w.add_frame(0.1 * t, {"wrist": frames_of(0, 3)[t]}, st[t], act[t], env_state=env[t])
            w.save_episode(success=ok)
    assert successes(twins) == [None, None]


def test_cli_success_only_clean_and_errors(ours: Path, tmp_path: Path) -> None:
    out = tmp_path / "ok"
    r = subprocess.run(
        [*CLI, "export", str(ours), str(out), "--success-only"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "left out 1 failed and 1 of unknown outcome" in r.stdout, r.stdout + r.stderr
    assert successes(out) == [True] and EpisodeDataset(out, cameras=[]).vectors(0)["time_ns"][0] == EPOCH_NS
    none = tmp_path / "none"
    write_ours(none, [False, None], [3, 3])
    r = subprocess.run(
        [*CLI, "export", str(none), str(tmp_path / "x"), "--success-only"], capture_output=True, text=True
    )
    assert (
        r.returncode == 2
        and r.stderr.startswith("carp-dataset: error:")
        and "1 failed, 1 unknown" in r.stderr
    )
    r = subprocess.run([*CLI, "info", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    # --clean on a dataset with an environment state (the twin's) repairs an interrupted save
    crashed = tmp_path / "crashed"
    shutil.copytree(ours, crashed)
    orphan = crashed / "data/chunk-000/file-007.parquet"
    shutil.copy(crashed / "data/chunk-000/file-000.parquet", orphan)
    r = subprocess.run([*CLI, "validate", "--clean", str(crashed)], capture_output=True, text=True)
    assert r.returncode == 0 and "cleaned" in r.stdout and "OK: 3 episodes" in r.stdout, r.stdout + r.stderr
    assert not orphan.exists() and "1 yes, 1 no, 1 unknown" in r.stdout

"""The on-disk format: LeRobot v3.0 layout, crash-safe file replacement, video codec, statistics.

Layout (LeRobot ``codebase_version`` "v3.0"), written natively by :class:`DatasetWriter` with one
data file and one video file per camera per episode (episode ``e`` lives in chunk ``e // 1000``,
file ``e % 1000``)::

    meta/info.json                      features, fps, totals, path templates   <- the commit record
    meta/stats.json                     per-feature min/max/mean/std/count/q01..q99
    meta/tasks.parquet                  task (pandas index) -> task_index
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode, exactly LeRobot 0.6's columns:
                                        length, tasks, file indices, dataset_from/to_index,
                                        videos/<key>/from/to_timestamp, stats/<feature>/<stat> for
                                        every feature (LeRobot loads all these files as one table,
                                        so they must share one schema: no columns of our own)
    meta/carp/episodes.jsonl            ours, one line per episode: success (true/false/null),
                                        metadata, and a fingerprint of the episode's data
    data/chunk-XXX/file-XXX.parquet     observation.state, action, timestamp, frame_index,
                                        episode_index, index, task_index, capture_time_ns,
                                        capture_time_ns.<stream> per stream
    videos/observation.images.<cam>/chunk-XXX/file-XXX.mp4

``timestamp`` is ``frame_index / fps`` (LeRobot finds video frames by it). Capture times are int64
nanoseconds on the recorder's clock (sim, ROS or wall): ``capture_time_ns`` is the frame's time the
recorder passed in, ``capture_time_ns.state``, ``capture_time_ns.<camera>`` (and
``capture_time_ns.env_state``) each stream's own sample time. int64 survives every reader exactly
(LeRobot returns it as torch.int64); a float32 reader would lose minutes at epoch times, float64
~0.2 us.

Per-episode success and metadata live in the sidecar, not in meta/episodes: LeRobot's resume()
writes episode files without foreign columns (a mixed schema stops LeRobot loading the dataset),
and its delete/split/merge rebuild the rows from their own columns. A sidecar line names its
episode by a fingerprint of the episode's state, action and capture times (data LeRobot copies
verbatim), so after LeRobot renumbers episodes a line still finds its episode or none; an
episode with no matching line has success ``None`` (unknown), never a guess.

This module imports neither torch nor pandas: a recorder machine needs only numpy, pyarrow and PyAV.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory (LeRobot's default)
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CARP_EPISODES_PATH = "meta/carp/episodes.jsonl"  # success, metadata, fingerprint per episode
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STAGING_DIR = ".staging"  # per-episode files are written here, then renamed into place
LOCK_FILE = ".carp-writer.lock"
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"  # LeRobot's name for object/scene state
ACTION_KEY = "action"
IMAGE_PREFIX = "observation.images."
CAPTURE_KEY = "capture_time_ns"  # int64 ns: the frame's time as the recorder passed it
LEGACY_CAPTURE_KEY = "capture_time"  # float64 s, datasets of older versions (read, not continued)
BOOKKEEPING_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's DEFAULT_QUANTILES -> q01, q10, q50, q90, q99
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)


class DatasetError(RuntimeError):
    """A dataset on disk is missing, corrupt or inconsistent (the message names the file)."""


def image_key(camera: str) -> str:
    """Camera name -> LeRobot feature key (``wrist`` -> ``observation.images.wrist``)."""
    return IMAGE_PREFIX + camera


def chunk_file(position: int) -> tuple[int, int]:
    """File position (``chunk * CHUNKS_SIZE + file``) -> (chunk_index, file_index)."""
    return position // CHUNKS_SIZE, position % CHUNKS_SIZE


def stream_key(stream: str) -> str:
    """The capture-time column of one stream (``state``, a camera name, ``env_state``):
    ``capture_time_ns.<stream>``. Not named after the feature key: LeRobot 0.6 takes any stats key
    containing "image" for an image's and rejects its (1,)-shaped stats; so a camera called
    ``wrist_image`` gets ``capture_time_ns.wrist_img``."""
    return f"{CAPTURE_KEY}.{stream.replace('image', 'img')}"


def seconds_to_ns(t: float) -> int:
    """Seconds (float) -> int nanoseconds, exact to the float's own resolution.

    ``round(t * 1e9)`` would round to 256 ns at epoch times; splitting off the whole seconds first
    keeps every digit the float holds."""
    t = float(t)
    whole = np.floor(t)
    return int(whole) * 1_000_000_000 + round((t - whole) * 1e9)


def ns_to_seconds(ns: np.ndarray) -> np.ndarray:
    """int64 nanoseconds -> float64 seconds (exact to ~0.2 us at epoch times, 1e-15 s near 0)."""
    ns = np.asarray(ns, np.int64)
    return (ns // 1_000_000_000).astype(np.float64) + (ns % 1_000_000_000).astype(np.float64) * 1e-9


def episode_fingerprint(state: np.ndarray, action: np.ndarray, time_ns: np.ndarray | None) -> str:
    """What names an episode across LeRobot's edits: a hash of the data LeRobot copies verbatim.

    state, action: (T, D) float32 as stored; time_ns: (T,) int64 ``capture_time_ns`` or None."""
    h = hashlib.sha256(b"carp-episode-v1")
    h.update(np.int64(len(state)).tobytes())
    h.update(np.ascontiguousarray(state, np.float32).tobytes())
    h.update(np.ascontiguousarray(action, np.float32).tobytes())
    if time_ns is not None:
        h.update(np.ascontiguousarray(time_ns, np.int64).tobytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- crash-safe IO
def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry table) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, dst: Path) -> None:
    """fsync ``tmp``, atomically rename it over ``dst``, fsync the directory.

    After a crash at any point, ``dst`` is either its old content or the complete new one.
    """
    fsync_path(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


def write_json_atomic(path: Path, data: dict, staging: Path) -> None:
    """Write JSON to ``path`` via a staged temporary file (see :func:`replace_durably`)."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / (path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    replace_durably(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table, staging: Path) -> None:
    """Write a parquet table to ``path`` via a staged temporary file."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / (path.name + f".{path.parent.name}.tmp")
    pq.write_table(table, tmp, compression="snappy")
    replace_durably(tmp, path)


def read_json(path: Path) -> dict:
    """Read a JSON file, naming the file in any error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file, naming the file in any error (truncated files fail here)."""
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: unreadable parquet ({e})") from None


# ----------------------------------------------------------------------------- episodes files
def episode_files(root: Path) -> list[Path]:
    """Every ``meta/episodes/chunk-*/file-*.parquet``, in (chunk, file) order (LeRobot's order)."""
    return sorted(Path(root).glob(f"{EPISODES_DIR}/chunk-*/file-*.parquet"))


def read_episode_rows(root: Path) -> tuple[list[dict], list[tuple[Path, pa.Schema, int]]]:
    """All episode rows of all episodes files, in file order, and (path, schema, rows) per file."""
    files = episode_files(root)
    if not files:
        raise DatasetError(f"{Path(root) / EPISODES_DIR}: no episodes parquet files")
    rows: list[dict] = []
    out = []
    for path in files:
        table = read_parquet(path)
        rows.extend(table.to_pylist())
        out.append((path, table.schema, table.num_rows))
    return rows, out


def schema_split(files: list[tuple[Path, pa.Schema, int]]) -> list[str]:
    """How the episodes files disagree on their columns (LeRobot cannot load them then)."""
    if not files:
        return []
    path0, s0, _ = files[0]
    problems = []
    for path, s, _ in files[1:]:
        missing = sorted(set(s0.names) - set(s.names))
        extra = sorted(set(s.names) - set(s0.names))
        if missing or extra:
            problems.append(
                f"{path}: columns differ from {path0} (missing {_short(missing)}, extra {_short(extra)}); "
                "LeRobot cannot load episode files with different columns"
            )
    return problems


def _short(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_carp_episodes(root: Path) -> list[dict]:
    """The sidecar's lines (success, metadata, fingerprint per episode); [] when there is none.

    A torn last line (a crash while it was replaced cannot leave one, but a copy can) is skipped."""
    path = Path(root) / CARP_EPISODES_PATH
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DatasetError(f"{path}: line {i + 1} is not valid JSON") from None
        if not isinstance(rec, dict) or "fingerprint" not in rec:
            raise DatasetError(f"{path}: line {i + 1} has no fingerprint")
        out.append(rec)
    return out


def write_carp_episodes(root: Path, records: list[dict], staging: Path) -> None:
    """Replace the sidecar atomically."""
    path = Path(root) / CARP_EPISODES_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / "carp-episodes.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    replace_durably(tmp, path)


def match_carp_episodes(records: list[dict], fingerprints: list[str]) -> list[dict | None]:
    """For each episode (by fingerprint), its sidecar record, or None when none or several
    disagreeing ones match (identical data recorded twice with different outcomes: unknown)."""
    by_fp: dict[str, list[dict]] = {}
    for r in records:
        by_fp.setdefault(r["fingerprint"], []).append(r)
    out: list[dict | None] = []
    for fp in fingerprints:
        cands = by_fp.get(fp, [])
        same = len({json.dumps([c.get("success"), c.get("metadata")], sort_keys=True) for c in cands}) == 1
        out.append(cands[0] if cands and same else None)
    return out


# ----------------------------------------------------------------------------- tasks table
def tasks_table(tasks: list[str]) -> pa.Table:
    """tasks.parquet as LeRobot reads it: ``pd.read_parquet`` must give a frame indexed by task.

    We write the pandas index metadata by hand so the writer needs no pandas.
    """
    table = pa.table(
        {"task": pa.array(tasks, pa.string()), "task_index": pa.array(range(len(tasks)), pa.int64())}
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {
                "name": "task",
                "field_name": "task",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
        ],
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def read_tasks(root: Path) -> list[str]:
    """tasks.parquet -> task strings ordered by task_index (accepts the pandas-index form too)."""
    table = read_parquet(root / TASKS_PATH)
    names = table.column_names
    col = "task" if "task" in names else ("__index_level_0__" if "__index_level_0__" in names else None)
    if col is None or "task_index" not in names:
        raise DatasetError(f"{root / TASKS_PATH}: expected columns task and task_index, got {names}")
    out: dict[int, str] = dict(zip(table["task_index"].to_pylist(), table[col].to_pylist()))
    return [out[i] for i in sorted(out)]


# ----------------------------------------------------------------------------- video
@dataclass
class VideoConfig:
    """How camera frames are encoded (PyAV / FFmpeg).

    codec: FFmpeg encoder. libx264 (H.264, the default) is decoded by PyAV, torchcodec and every
        FFmpeg; libsvtav1 (AV1) is LeRobot 0.6's default. PyAV's wheels from 12.0 on decode both
        (libdav1d for AV1; checked with PyAV 12.0.0, 15.1.0 and 18.1.0).
    crf: constant rate factor, lower = better (measured PSNR per setting in docs/results.md).
    preset: encoder speed/size trade-off (x264 names such as "medium"; SVT-AV1 numbers 0-13).
    gop: frames between keyframes; small keeps LeRobot's random frame access cheap.
    pix_fmt: yuv444p keeps full-resolution colour. At 120x160, yuv420p's half-resolution chroma
        caps PSNR near 35 dB even losslessly (small red cups lose their edges); yuv444p at the
        same file size gives 4-6 dB more. Web browsers (the Hugging Face Hub's dataset viewer) do
        not play H.264 4:4:4; PyAV, torchcodec, lerobot-dataset-viz (which decodes through
        LeRobot) and ``carp-dataset view`` (which writes yuv420p) do. Use yuv420p for datasets
        people will watch in a browser.
    """

    codec: str = "libx264"
    crf: int = 15
    preset: str | int = "medium"
    gop: int = 10
    pix_fmt: str = "yuv444p"

    def options(self) -> dict[str, str]:
        """Encoder options as FFmpeg expects them."""
        opts = {"crf": str(self.crf), "g": str(self.gop)}
        if self.codec in ("libx264", "libsvtav1"):
            opts["preset"] = str(self.preset)
        return opts

    def info(self) -> dict[str, Any]:
        """The encoder settings as LeRobot 0.6 records them in ``features[<camera>]["info"]``
        (where they survive LeRobot's edits, and from where LeRobot re-encodes when it must)."""
        return {
            "video.g": self.gop,
            "video.crf": self.crf,
            "video.preset": self.preset,
            "video.fast_decode": 0,
            "video.video_backend": "pyav",
            "video.extra_options": {},
        }

    @classmethod
    def from_info(cls, info: dict | None) -> VideoConfig:
        """The settings a dataset records (LeRobot's keys), our defaults for what it does not."""
        info, d = info or {}, cls()
        codec = {"h264": "libx264", "av1": "libsvtav1", "hevc": "libx265"}.get(
            str(info.get("video.codec")), info.get("video.codec") or d.codec
        )
        preset = info.get("video.preset")
        if preset is None:
            preset = d.preset if codec == d.codec else 12 if codec == "libsvtav1" else "medium"
        return cls(
            codec=codec,
            crf=info.get("video.crf") if info.get("video.crf") is not None else d.crf,
            preset=preset,
            gop=info.get("video.g") or d.gop,
            pix_fmt=info.get("video.pix_fmt") or d.pix_fmt,
        )


class VideoEncoder:
    """Streams RGB frames of one camera into an MP4 file (frame ``i`` at pts ``i / fps``)."""

    def __init__(self, path: Path, fps: float, height: int, width: int, config: VideoConfig) -> None:
        self.path = Path(path)
        self.height, self.width = height, width
        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream(config.codec, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = config.pix_fmt
        self._stream.options = config.options()
        self._time_base = Fraction(1) / self._stream.codec_context.rate
        self.count = 0

    def encode(self, rgb: np.ndarray) -> None:
        """Encode one (H, W, 3) uint8 frame."""
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = self.count, self._time_base
        self._container.mux(self._stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        self._container.mux(self._stream.encode(None))
        self._container.close()

    def abort(self) -> None:
        """Close without caring about the result (the file is discarded)."""
        try:
            self._container.close()
        except Exception:  # the file is deleted next; nothing useful to report
            pass


def decode_video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame of an MP4 -> (frames (N, H, W, 3) uint8, pts seconds (N,))."""
    frames, times = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else np.nan)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable video ({e})") from None
    if not frames:
        raise DatasetError(f"{path}: video has no decodable frames")
    return np.stack(frames), np.asarray(times)


def probe_video(path: Path) -> dict[str, Any]:
    """LeRobot's ``features[key]["info"]`` block for a video file (stream-derived keys)."""
    with av.open(str(path)) as container:
        s = container.streams.video[0]
        return {
            "video.height": s.height,
            "video.width": s.width,
            "video.codec": s.codec_context.codec.canonical_name
            if hasattr(s.codec_context.codec, "canonical_name")
            else s.codec_context.name,
            "video.pix_fmt": s.pix_fmt,
            "video.fps": round(float(s.base_rate or s.average_rate)),
            "video.channels": 3,
            "has_audio": False,
            "is_depth_map": False,  # LeRobot 0.6's key (it migrates the old ``video.is_depth_map``)
        }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image arrays of equal shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------- statistics
def feature_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """(N, D) samples -> per-dimension min, max, mean, std, count and the quantiles q01..q99."""
    x = np.asarray(x, dtype=np.float64)
    out = {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "count": np.array([len(x)]),
    }
    for key, q in zip(QUANTILE_KEYS, np.quantile(x, QUANTILES, axis=0)):
        out[key] = q
    return out


def image_stats(frames: np.ndarray, max_frames: int = 50) -> dict[str, np.ndarray]:
    """(T, H, W, 3) uint8 -> per-channel stats in [0, 1], shaped (3, 1, 1) as LeRobot stores them."""
    idx = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
    px = frames[idx].reshape(-1, 3)[::7].astype(np.float64) / 255.0  # subsampled: stats, not exact
    st = feature_stats(px)
    return {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in st.items()} | {
        "count": np.array([len(frames)])
    }


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-episode stats: exact min/max/mean/std/count; quantiles as count-weighted means.

    The quantile combination is LeRobot's own approximation; :meth:`EpisodeDataset.stats`
    computes exact ones from the data.
    """
    n = np.array([float(np.asarray(s["count"]).reshape(-1)[0]) for s in per_episode])
    w = (n / n.sum()).reshape(-1, *([1] * np.asarray(per_episode[0]["mean"]).ndim))
    means = np.stack([s["mean"] for s in per_episode])
    stds = np.stack([s["std"] for s in per_episode])
    mean = (w * means).sum(0)
    var = (w * (stds**2 + means**2)).sum(0) - mean**2
    out = {
        "min": np.min(np.stack([s["min"] for s in per_episode]), 0),
        "max": np.max(np.stack([s["max"] for s in per_episode]), 0),
        "mean": mean,
        "std": np.sqrt(np.maximum(var, 0.0)),
        "count": np.array([int(n.sum())]),
    }
    for key in QUANTILE_KEYS:
        if all(key in s for s in per_episode):
            out[key] = (w * np.stack([s[key] for s in per_episode])).sum(0)
    return out


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    """Nested numpy stats -> JSON-serialisable lists."""
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def stats_from_json(data: dict) -> dict[str, dict[str, np.ndarray]]:
    """JSON stats -> numpy arrays."""
    return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in data.items()}


# ----------------------------------------------------------------------------- info.json
def make_info(
    fps: float,
    cameras: dict[str, tuple[int, int]],
    state_names: list[str],
    action_names: list[str],
    robot_type: str | None,
    video_info: dict[str, dict] | None = None,
    video_config: VideoConfig | None = None,
    env_state_names: list[str] | None = None,
) -> dict:
    """A fresh info.json for an empty dataset with our features (in LeRobot 0.6's field order)."""
    features: dict[str, dict] = {
        STATE_KEY: {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
        ACTION_KEY: {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)},
    }
    if env_state_names:
        features[ENV_STATE_KEY] = {
            "dtype": "float32",
            "shape": [len(env_state_names)],
            "names": list(env_state_names),
        }
    for cam, (h, w) in cameras.items():
        ft = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
        ft["info"] = {**(video_info or {}).get(cam, {}), **(video_config or VideoConfig()).info()}
        features[image_key(cam)] = ft
    scalar_ns = {"dtype": "int64", "shape": [1], "names": None}
    features[CAPTURE_KEY] = dict(scalar_ns)
    for stream in stream_names(list(cameras), bool(env_state_names)):
        features[stream_key(stream)] = dict(scalar_ns)
    features |= {
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    fps_out: float | int = round(fps) if abs(fps - round(fps)) < 1e-9 else float(fps)
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": 0,
        "total_frames": 0,
        "total_tasks": 0,
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps_out,
        "splits": {},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if cameras else None,
        "features": features,
    }  # nothing of our own here: LeRobot warns about unknown keys and drops them on every rewrite


def stream_names(cameras: list[str], env_state: bool) -> list[str]:
    """The streams with a capture time of their own: ``state``, each camera, ``env_state``."""
    return ["state", *cameras, *(["env_state"] if env_state else [])]


def data_schema(
    state_dim: int, action_dim: int, env_state_dim: int = 0, cameras: list[str] | None = None
) -> pa.Schema:
    """Arrow schema of one data parquet (fixed-size lists = LeRobot's ``Sequence(length=D)``), in
    the order of the features in info.json."""
    env = [(ENV_STATE_KEY, pa.list_(pa.float32(), env_state_dim))] if env_state_dim else []
    names = stream_names(list(cameras or []), bool(env_state_dim))
    streams = [(stream_key(k), pa.int64()) for k in names]
    return pa.schema(
        [
            (STATE_KEY, pa.list_(pa.float32(), state_dim)),
            *env,
            (ACTION_KEY, pa.list_(pa.float32(), action_dim)),
            (CAPTURE_KEY, pa.int64()),
            *streams,
            ("timestamp", pa.float32()),
            ("frame_index", pa.int64()),
            ("episode_index", pa.int64()),
            ("index", pa.int64()),
            ("task_index", pa.int64()),
        ]
    )


def column_matrix(table: pa.Table, key: str, path: Path) -> np.ndarray:
    """A list-valued parquet column -> (N, D) float32, with a clear error for ragged rows."""
    col = table[key].combine_chunks()
    if isinstance(col.type, pa.FixedSizeListType):
        return (
            col.flatten()
            .to_numpy(zero_copy_only=False)
            .reshape(len(col), col.type.list_size)
            .astype(np.float32)
        )
    rows = col.to_pylist()
    try:
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    except ValueError:
        raise DatasetError(f"{path}: column {key} has rows of different lengths") from None

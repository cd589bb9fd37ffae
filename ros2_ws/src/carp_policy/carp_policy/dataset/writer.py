"""Crash-safe episode recording into a LeRobot v3.0 dataset.

How an episode becomes visible (the order is what makes ``kill -9`` at any moment safe):

1. ``add_frame`` streams each camera's frames into ``.staging/<cam>.mp4`` and keeps state/action
   in memory; nothing under ``data/``, ``videos/`` or ``meta/`` is touched.
2. ``save_episode`` writes the data parquet into ``.staging``, fsyncs and renames the episode's
   own data and video files into place. Until step 4 no metadata references them: they are
   orphans that every reader ignores (LeRobot only indexes ``total_frames`` rows).
3. ``meta/tasks.parquet``, ``meta/episodes/...parquet`` and ``meta/stats.json`` are replaced
   atomically (temp file, fsync, rename); the episodes table may now hold one uncommitted row.
4. ``meta/info.json`` is replaced atomically with the new totals: this rename is the commit.

Readers trust ``info.json``'s ``total_episodes`` and ignore episode rows beyond it. Opening a writer
on an existing dataset repairs what a crash can leave behind (staging files, orphans, an
uncommitted row, stats that counted it), so a crash loses at most the episode in progress.
"""

from __future__ import annotations

import errno
import fcntl
import json
import shutil
import time
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa

from ..actions import ACTION_NAMES, STATE_NAMES
from .format import (
    ACTION_KEY,
    DATA_PATH,
    ENV_STATE_KEY,
    EPISODES_PATH,
    INFO_PATH,
    LOCK_FILE,
    STAGING_DIR,
    STATE_KEY,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    DatasetError,
    VideoConfig,
    VideoEncoder,
    aggregate_stats,
    chunk_file,
    data_schema,
    feature_stats,
    image_key,
    image_stats,
    make_info,
    probe_video,
    read_json,
    read_parquet,
    read_tasks,
    replace_durably,
    stats_to_json,
    tasks_table,
    write_json_atomic,
    write_parquet_atomic,
)

_LOST = "that episode was discarded, earlier ones are intact"


class DatasetWriter:
    """Records episodes (frames of camera images, state and action) into a dataset directory.

    Opening an existing dataset appends episodes (fps, cameras and names must match).
    Use as a context manager or call :meth:`close`; an unsaved episode is discarded on close.
    """

    def __init__(
        self,
        root: str | Path,
        fps: float = 10.0,
        cameras: dict[str, tuple[int, int]] | None = None,
        state_names: list[str] | None = None,
        action_names: list[str] | None = None,
        robot_type: str | None = "ur5e",
        video: VideoConfig | None = None,
        env_state_names: list[str] | None = None,
    ) -> None:
        """env_state_names: names of an ``observation.environment_state`` vector (object poses
        and the like, e.g. from the twin); None = the dataset has none."""
        self.root = Path(root)
        self.fps = float(fps)
        self.cameras = dict(cameras if cameras is not None else {"wrist": (120, 160), "scene": (120, 160)})
        self.state_names = list(state_names if state_names is not None else STATE_NAMES)
        self.action_names = list(action_names if action_names is not None else ACTION_NAMES)
        self.env_state_names = list(env_state_names or [])
        self.video = video or VideoConfig()
        if not (self.fps > 0 and np.isfinite(self.fps)):
            raise ValueError(f"fps must be positive, got {fps}")
        for cam, (h, w) in self.cameras.items():
            if (h % 2 or w % 2) and self.video.pix_fmt == "yuv420p":  # 4:2:0 halves chroma resolution
                raise ValueError(
                    f"camera {cam!r}: height and width must be even for {self.video.pix_fmt}, got {h}x{w}"
                )

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DatasetError(f"{self.root}: another DatasetWriter has this dataset open") from None
        self._staging = self.root / STAGING_DIR
        shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crashed episode
        self._staging.mkdir()

        if (self.root / INFO_PATH).exists():
            self._open_existing(robot_type)
        else:
            self.info = make_info(
                self.fps,
                self.cameras,
                self.state_names,
                self.action_names,
                robot_type,
                video_config=self.video,
                env_state_names=self.env_state_names,
            )
            self.tasks: list[str] = []
            self._rows: list[dict] = []
            write_json_atomic(self.root / INFO_PATH, self.info, self._staging)
        self._episode: dict | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API
    @property
    def num_episodes(self) -> int:
        """Episodes saved so far (including those that were already on disk)."""
        return len(self._rows)

    def begin_episode(self, task: str) -> None:
        """Start recording an episode of ``task`` (a natural-language instruction)."""
        self._check_open()
        if self._episode is not None:
            raise RuntimeError(
                "begin_episode called while an episode is in progress: save or discard it first"
            )
        if not isinstance(task, str) or not task.strip():
            raise ValueError("task must be a non-empty string")
        encoders = {}
        try:
            for cam, (h, w) in self.cameras.items():
                encoders[cam] = VideoEncoder(self._staging / f"{cam}.mp4", self.fps, h, w, self.video)
        except Exception:
            for enc in encoders.values():
                enc.abort()
            raise
        self._episode = {
            "task": task,
            "t": [],
            "state": [],
            "env_state": [],
            "action": [],
            "encoders": encoders,
            "img_sample": {c: [] for c in self.cameras},
        }

    def add_frame(
        self,
        timestamp: float,
        images: dict[str, np.ndarray],
        state: np.ndarray,
        action: np.ndarray,
        env_state: np.ndarray | None = None,
    ) -> None:
        """Append one control step. Everything is checked before anything is written.

        timestamp: capture time in seconds (sim or ROS clock), strictly increasing.
        images: camera name -> (H, W, 3) uint8 RGB, one per configured camera.
        state, action: (Ds,), (Da,) finite vectors (``[x, y, z, r6d(6), gripper]``).
        env_state: (De,) finite vector, required exactly when the writer has ``env_state_names``.
        """
        ep = self._require_episode("add_frame")
        n = len(ep["t"])
        t = float(timestamp)
        if not np.isfinite(t):
            raise ValueError(f"frame {n}: timestamp is not finite ({timestamp})")
        if ep["t"] and t <= ep["t"][-1]:
            raise ValueError(f"frame {n}: timestamp {t} is not after the previous one ({ep['t'][-1]})")
        state = self._vector(state, self.state_names, "state", n)
        action = self._vector(action, self.action_names, "action", n)
        if self.env_state_names:
            if env_state is None:
                raise ValueError(f"frame {n}: this dataset records an environment state; none was given")
            env_state = self._vector(env_state, self.env_state_names, "env_state", n)
        elif env_state is not None:
            raise ValueError(
                f"frame {n}: an environment state was given but the writer has no env_state_names"
            )
        missing = set(self.cameras) - set(images)
        if missing:
            raise ValueError(f"frame {n}: no image from camera(s) {sorted(missing)} (got {sorted(images)})")
        extra = set(images) - set(self.cameras)
        if extra:
            raise ValueError(
                f"frame {n}: unknown camera(s) {sorted(extra)}; this dataset has {sorted(self.cameras)}"
            )
        for cam, (h, w) in self.cameras.items():
            img = images[cam]
            if not isinstance(img, np.ndarray) or img.shape != (h, w, 3) or img.dtype != np.uint8:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ValueError(f"frame {n}: camera {cam!r} image must be uint8 ({h}, {w}, 3), got {got}")
        try:
            for cam, enc in ep["encoders"].items():
                enc.encode(np.ascontiguousarray(images[cam]))
        except Exception as e:  # encoder state is unknown now: this episode cannot be saved
            self.discard_episode()
            raise self._io_error(e, "encoding video") from e
        for cam in self.cameras:
            if n % 5 == 0:  # a frame subsample is enough for image normalisation stats
                ep["img_sample"][cam].append(images[cam].copy())
        ep["t"].append(t)
        ep["state"].append(state)
        ep["action"].append(action)
        if env_state is not None:
            ep["env_state"].append(env_state)

    def save_episode(self, success: bool = True, metadata: dict | None = None) -> int:
        """Make the episode in progress durable and visible; return its index.

        metadata: JSON-serialisable facts about the episode (operator, calibration id, seed, ...).
        On any failure (disk full, ...) the episode is discarded, the dataset stays as it was and
        the error names the cause.
        """
        ep = self._require_episode("save_episode")
        if not ep["t"]:
            self.discard_episode()
            raise ValueError("cannot save an empty episode (no frames were added); it was discarded")
        meta = dict(metadata or {})
        meta.setdefault("task", ep["task"])
        meta.setdefault("robot_type", self.info.get("robot_type"))
        meta.setdefault("cameras", {c: list(hw) for c, hw in self.cameras.items()})
        meta.setdefault("recorded_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            meta_json = json.dumps(meta, default=_json_default)
        except (TypeError, ValueError) as e:
            self.discard_episode()
            raise ValueError(
                f"episode metadata is not JSON-serialisable: {e}; the episode was discarded"
            ) from None
        try:
            index = self._commit(ep, bool(success), meta_json)
        except Exception as e:
            self.discard_episode()
            raise self._io_error(e, f"saving episode {len(self._rows)}") from e
        self._episode = None
        return index

    def discard_episode(self) -> None:
        """Drop the episode in progress (nothing of it reaches the dataset)."""
        ep, self._episode = self._episode, None
        if ep is None:
            return
        for enc in ep["encoders"].values():
            enc.abort()
        for cam in self.cameras:
            (self._staging / f"{cam}.mp4").unlink(missing_ok=True)

    def close(self) -> None:
        """Discard an unsaved episode and release the dataset."""
        if self._closed:
            return
        self.discard_episode()
        shutil.rmtree(self._staging, ignore_errors=True)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        self._closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # ------------------------------------------------------------------ internals
    def _commit(self, ep: dict, success: bool, meta_json: str) -> int:
        index = len(self._rows)
        chunk, file = chunk_file(index)
        n = len(ep["t"])
        start = self._rows[-1]["dataset_to_index"] if self._rows else 0
        if ep["task"] not in self.tasks:
            self.tasks.append(ep["task"])
        task_index = self.tasks.index(ep["task"])
        for enc in ep["encoders"].values():
            enc.close()
        ep["encoders"] = {}

        state = np.stack(ep["state"]).astype(np.float32)  # (T, Ds)
        action = np.stack(ep["action"]).astype(np.float32)  # (T, Da)
        env = np.stack(ep["env_state"]).astype(np.float32) if self.env_state_names else None  # (T, De)
        frame_index = np.arange(n)

        def vec(x: np.ndarray) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])

        table = pa.Table.from_arrays(
            [
                vec(state),
                *([vec(env)] if env is not None else []),
                vec(action),
                pa.array((frame_index / self.fps).astype(np.float32)),
                pa.array(frame_index, pa.int64()),
                pa.array(np.full(n, index), pa.int64()),
                pa.array(start + frame_index, pa.int64()),
                pa.array(np.full(n, task_index), pa.int64()),
                pa.array(np.asarray(ep["t"], np.float64)),
            ],
            schema=data_schema(state.shape[1], action.shape[1], len(self.env_state_names)),
        )
        write_parquet_atomic(
            self.root / DATA_PATH.format(chunk_index=chunk, file_index=file), table, self._staging
        )

        stats = {STATE_KEY: feature_stats(state), ACTION_KEY: feature_stats(action)}
        if env is not None:
            stats[ENV_STATE_KEY] = feature_stats(env)
        row: dict = {
            "episode_index": index,
            "tasks": [ep["task"]],
            "length": n,
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": start,
            "dataset_to_index": start + n,
        }
        for cam in self.cameras:
            key = image_key(cam)
            tmp = self._staging / f"{cam}.mp4"
            if not self.info["features"][key].get("info"):
                self.info["features"][key]["info"] = probe_video(tmp)
            replace_durably(
                tmp, self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            )
            row |= {
                f"videos/{key}/chunk_index": chunk,
                f"videos/{key}/file_index": file,
                f"videos/{key}/from_timestamp": 0.0,
                f"videos/{key}/to_timestamp": n / self.fps,
            }
            stats[key] = image_stats(np.stack(ep["img_sample"][cam]))
            stats[key]["count"] = np.array([n])
        row |= {
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
            "success": success,
            "metadata": meta_json,
        }
        for key, st in stats.items():
            for name, v in st.items():
                row[f"stats/{key}/{name}"] = np.asarray(v).tolist()

        rows = [*self._rows, row]
        write_parquet_atomic(self.root / TASKS_PATH, tasks_table(self.tasks), self._staging)
        write_parquet_atomic(self.root / EPISODES_PATH, pa.Table.from_pylist(rows), self._staging)
        self._write_stats(rows)
        info = json.loads(json.dumps(self.info))
        info["total_episodes"] = len(rows)
        info["total_frames"] = start + n
        info["total_tasks"] = len(self.tasks)
        info["splits"] = {"train": f"0:{len(rows)}"}
        write_json_atomic(self.root / INFO_PATH, info, self._staging)  # the commit
        self.info, self._rows = info, rows
        return index

    def _write_stats(self, rows: list[dict]) -> None:
        keys = sorted({k.split("/")[1] for k in rows[0] if k.startswith("stats/")})
        stats = {}
        for key in keys:
            names = [k.split("/", 2)[2] for k in rows[0] if k.startswith(f"stats/{key}/")]
            per_ep = [{nm: np.asarray(r[f"stats/{key}/{nm}"]) for nm in names} for r in rows]
            stats[key] = aggregate_stats(per_ep)
        write_json_atomic(self.root / STATS_PATH, stats_to_json(stats), self._staging)

    def _open_existing(self, robot_type: str | None) -> None:
        info = read_json(self.root / INFO_PATH)
        feats = info.get("features", {})
        want = make_info(
            self.fps,
            self.cameras,
            self.state_names,
            self.action_names,
            robot_type,
            env_state_names=self.env_state_names,
        )
        if info.get("fps") != want["fps"]:
            raise DatasetError(
                f"{self.root}: dataset fps is {info.get('fps')}, writer asked for {want['fps']}"
            )
        for key, ft in want["features"].items():
            have = feats.get(key)
            if have is None or have.get("dtype") != ft["dtype"] or list(have.get("shape", [])) != ft["shape"]:
                raise DatasetError(f"{self.root}: feature {key} is {have}, the writer needs {ft}")
            if ft["names"] is not None and have.get("names") != ft["names"]:
                raise DatasetError(
                    f"{self.root}: {key} names are {have.get('names')}, the writer has {ft['names']}"
                )
        extra = [
            k
            for k, ft in feats.items()
            if ft.get("dtype") in ("video", "image") and k not in want["features"]
        ]
        if extra:
            raise DatasetError(f"{self.root}: dataset has camera feature(s) {extra} the writer was not given")
        if ENV_STATE_KEY in feats and ENV_STATE_KEY not in want["features"]:
            raise DatasetError(
                f"{self.root}: dataset records {ENV_STATE_KEY} {feats[ENV_STATE_KEY].get('names')}; "
                "give the writer the same env_state_names"
            )
        committed = int(info.get("total_episodes", 0))
        rows = read_parquet(self.root / EPISODES_PATH).to_pylist() if committed else []
        if len(rows) < committed:
            raise DatasetError(
                f"{self.root / EPISODES_PATH}: {len(rows)} rows but info.json commits {committed} episodes"
            )
        self.info, self._rows = info, rows[:committed]
        self.tasks = read_tasks(self.root) if committed else []
        if len(rows) > committed:  # a crash between the episodes table and info.json: roll back
            write_parquet_atomic(self.root / EPISODES_PATH, pa.Table.from_pylist(self._rows), self._staging)
        if committed:
            self._write_stats(self._rows)
        remove_orphans(self.root, self._rows)

    def _require_episode(self, what: str) -> dict:
        self._check_open()
        if self._episode is None:
            raise RuntimeError(f"{what} called with no episode in progress: call begin_episode(task) first")
        return self._episode

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the DatasetWriter is closed")

    @staticmethod
    def _vector(x: np.ndarray, names: list[str], what: str, n: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (len(names),):
            raise ValueError(f"frame {n}: {what} must have shape ({len(names)},), got {x.shape}")
        bad = ~np.isfinite(x)
        if bad.any():
            raise ValueError(
                f"frame {n}: {what} has non-finite value(s) in {[names[i] for i in np.flatnonzero(bad)]}"
            )
        return x

    def _io_error(self, e: Exception, doing: str) -> Exception:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return OSError(
                errno.ENOSPC,
                f"disk full while {doing} in {self.root}; {_LOST}",
            )
        if isinstance(e, (ValueError, DatasetError)):
            return e
        return DatasetError(f"{type(e).__name__} while {doing} in {self.root}: {e}; {_LOST}")


def referenced_files(root: Path, rows: list[dict]) -> set[Path]:
    """Every data and video file the committed episode rows point to."""
    out = set()
    for r in rows:
        out.add(root / DATA_PATH.format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]))
        for k in r:
            if k.startswith("videos/") and k.endswith("/chunk_index"):
                key = k.split("/")[1]
                out.add(
                    root
                    / VIDEO_PATH.format(
                        video_key=key, chunk_index=r[k], file_index=r[f"videos/{key}/file_index"]
                    )
                )
    return out


def orphan_files(root: Path, rows: list[dict]) -> list[Path]:
    """Data/video files no committed episode references (left by a crash during a save)."""
    keep = referenced_files(root, rows)
    found = list((root / "data").glob("chunk-*/file-*.parquet")) + list(
        (root / "videos").glob("*/chunk-*/file-*.mp4")
    )
    return sorted(p for p in found if p not in keep)


def remove_orphans(root: Path, rows: list[dict]) -> list[Path]:
    """Delete orphaned data/video files; return what was removed."""
    orphans = orphan_files(root, rows)
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


def _json_default(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")

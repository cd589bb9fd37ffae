"""Crash-safe episode recording into a LeRobot v3.0 dataset.

How an episode becomes visible (the order is what makes ``kill -9`` at any moment safe):

1. ``add_frame`` streams each camera's frames into ``.staging/<cam>.mp4`` and keeps state/action
   in memory; nothing under ``data/``, ``videos/`` or ``meta/`` is touched.
2. ``save_episode`` writes the data parquet into ``.staging``, fsyncs and renames the episode's
   own data and video files into place. Until step 4 no metadata references them: they are
   orphans that every reader ignores (LeRobot only indexes ``total_frames`` rows).
3. ``meta/tasks.parquet``, the last ``meta/episodes/...parquet``, the ``meta/carp/episodes.jsonl``
   sidecar and ``meta/stats.json`` are replaced atomically (temp file, fsync, rename); the episodes
   table and the sidecar may now hold one uncommitted row.
4. ``meta/info.json`` is replaced atomically with the new totals: this rename is the commit.

Readers trust ``info.json``'s ``total_episodes`` and ignore episode rows beyond it. Opening a writer
on an existing dataset repairs what a crash can leave behind (staging files, orphans, an
uncommitted row, stats that counted it), so a crash loses at most the episode in progress.

A dataset LeRobot has extended (``resume()`` + ``save_episode``) has more than one episodes file
and data/video files holding several episodes; the writer reads them all, appends its rows to the
last episodes file in that file's own schema, and puts new data/video files after every file in
use, so LeRobot and this writer can take turns on one dataset.
"""

from __future__ import annotations

import errno
import fcntl
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa

from ..actions import ACTION_NAMES, STATE_NAMES
from .format import (
    ACTION_KEY,
    CAPTURE_KEY,
    CHUNKS_SIZE,
    DATA_PATH,
    ENV_STATE_KEY,
    EPISODES_PATH,
    IMAGE_PREFIX,
    INFO_PATH,
    LEGACY_CAPTURE_KEY,
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
    episode_fingerprint,
    feature_stats,
    image_key,
    image_stats,
    make_info,
    probe_video,
    read_carp_episodes,
    read_episode_rows,
    read_json,
    read_tasks,
    replace_durably,
    schema_split,
    seconds_to_ns,
    stats_to_json,
    stream_key,
    stream_names,
    tasks_table,
    write_carp_episodes,
    write_json_atomic,
    write_parquet_atomic,
)

_LOST = "that episode was discarded, earlier ones are intact"


class DatasetWriter:
    """Records episodes (frames of camera images, state and action) into a dataset directory.

    Opening an existing dataset appends episodes (fps, cameras and names must match; see
    :meth:`open` to take them from the dataset). Use as a context manager or call :meth:`close`;
    an unsaved episode is discarded on close.

    Capture-time streams: ``state``, each camera name and (with ``env_state_names``) ``env_state``;
    each is stored as ``capture_time_ns.<stream>``.
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
        # stream name (what add_frame's ``stamps`` uses) -> its capture-time column
        self.streams: dict[str, str] = {
            n: stream_key(n) for n in stream_names(list(self.cameras), bool(self.env_state_names))
        }
        if len(set(self.streams.values())) < len(self.streams) or len(self.streams) < len(
            stream_names(list(self.cameras), bool(self.env_state_names))
        ):
            raise ValueError(
                f"camera names {sorted(self.cameras)} collide with each other or with the streams "
                "'state'/'env_state' in their capture-time columns"
            )

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DatasetError(f"{self.root}: another DatasetWriter has this dataset open") from None
        self._closed = False
        self._episode: dict | None = None
        self._staging = self.root / STAGING_DIR
        try:
            shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crashed episode
            self._staging.mkdir()
            self._records: list[dict] = []  # the sidecar's lines
            self._last_file: Path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
            self._last_rows: list[dict] = []  # committed rows of _last_file
            self._last_schema = None
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
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, root: str | Path, video: VideoConfig | None = None) -> DatasetWriter:
        """A writer that continues an existing dataset with the fps, cameras, names and robot type
        it records (video: how new episodes are encoded; default what the dataset records)."""
        info = read_json(Path(root) / INFO_PATH)
        feats = info.get("features", {})
        cams = {
            k[len(IMAGE_PREFIX) :]: (int(f["shape"][0]), int(f["shape"][1]))
            for k, f in feats.items()
            if k.startswith(IMAGE_PREFIX) and f.get("dtype") == "video"
        }
        if not cams and any(f.get("dtype") == "image" for f in feats.values()):
            raise DatasetError(f"{root}: images stored in parquet; this writer records video only")
        for key in (STATE_KEY, ACTION_KEY):
            if key not in feats:
                raise DatasetError(
                    f"{Path(root) / INFO_PATH}: no {key} feature; not a dataset this writer continues"
                )
        first_cam = next(iter(cams), None)
        return cls(
            root,
            fps=float(info["fps"]),
            cameras=cams,
            state_names=list(feats[STATE_KEY]["names"]),
            action_names=list(feats[ACTION_KEY]["names"]),
            robot_type=info.get("robot_type"),
            video=video
            or VideoConfig.from_info(feats[image_key(first_cam)].get("info") if first_cam else None),
            env_state_names=list(feats[ENV_STATE_KEY]["names"]) if ENV_STATE_KEY in feats else None,
        )

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
            "stamps": {s: [] for s in self.streams},
            "state": [],
            "env_state": [],
            "action": [],
            "encoders": encoders,
            "img_sample": {c: [] for c in self.cameras},
        }

    def add_frame(
        self,
        timestamp: float | None,
        images: dict[str, np.ndarray],
        state: np.ndarray,
        action: np.ndarray,
        env_state: np.ndarray | None = None,
        *,
        timestamp_ns: int | None = None,
        stamps: Mapping[str, float] | None = None,
        stamps_ns: Mapping[str, int] | None = None,
    ) -> None:
        """Append one control step. Everything is checked before anything is written.

        timestamp: the frame's time in seconds on the recorder's clock (sim, ROS or wall),
            strictly increasing; or ``None`` with ``timestamp_ns`` (int nanoseconds, exact).
        images: camera name -> (H, W, 3) uint8 RGB, one per configured camera.
        state, action: (Ds,), (Da,) finite vectors (``[x, y, z, r6d(6), gripper]``).
        env_state: (De,) finite vector, required exactly when the writer has ``env_state_names``.
        stamps / stamps_ns: each stream's own capture time (s / int ns), one per stream in
            ``self.streams`` (``state``, the cameras, ``env_state``); default: the frame's time
            for every stream (a synchronous source such as the twin). Never decreasing per stream.
        """
        ep = self._require_episode("add_frame")
        n = len(ep["t"])
        t = self._time_ns(timestamp, timestamp_ns, n, "timestamp")
        if ep["t"] and t <= ep["t"][-1]:
            raise ValueError(
                f"frame {n}: timestamp {t * 1e-9:.9f} s is not after the previous one "
                f"({ep['t'][-1] * 1e-9:.9f} s)"
            )
        per_stream = self._stream_times(t, stamps, stamps_ns, n)
        for name, ts in per_stream.items():
            if ep["stamps"][name] and ts < ep["stamps"][name][-1]:
                raise ValueError(f"frame {n}: capture time of stream {name!r} went backwards")
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
        for name, ts in per_stream.items():
            ep["stamps"][name].append(ts)
        ep["state"].append(state)
        ep["action"].append(action)
        if env_state is not None:
            ep["env_state"].append(env_state)

    def save_episode(self, success: bool | None = None, metadata: dict | None = None) -> int:
        """Make the episode in progress durable and visible; return its index.

        success: whether the demonstration achieved its task; None (the default) = not judged,
            kept as unknown (``Episode.success is None``), never counted as a success.
        metadata: JSON-serialisable facts about the episode (operator, calibration id, seed, ...).
        On any failure (disk full, ...) the episode is discarded, the dataset stays as it was and
        the error names the cause.
        """
        ep = self._require_episode("save_episode")
        if not ep["t"]:
            self.discard_episode()
            raise ValueError("cannot save an empty episode (no frames were added); it was discarded")
        if success is not None and not isinstance(success, (bool, np.bool_)):
            self.discard_episode()
            raise ValueError(
                f"success must be True, False or None (unknown), got {success!r}; the episode was discarded"
            )
        meta = dict(metadata or {})
        meta.setdefault("task", ep["task"])
        meta.setdefault("robot_type", self.info.get("robot_type"))
        meta.setdefault("cameras", {c: list(hw) for c, hw in self.cameras.items()})
        meta.setdefault("recorded_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            meta = json.loads(json.dumps(meta, default=_json_default))
        except (TypeError, ValueError) as e:
            self.discard_episode()
            raise ValueError(
                f"episode metadata is not JSON-serialisable: {e}; the episode was discarded"
            ) from None
        try:
            index = self._commit(ep, None if success is None else bool(success), meta)
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
    def _next_position(self, prefix: str, at_least: int) -> int:
        """A data/video file position after every one in use (LeRobot packs several episodes per
        file and numbers files on its own, so episode index and file position can differ)."""
        used = [
            r[f"{prefix}/chunk_index"] * CHUNKS_SIZE + r[f"{prefix}/file_index"]
            for r in self._rows
            if r.get(f"{prefix}/chunk_index") is not None
        ]
        return max([at_least, *(u + 1 for u in used)])

    def _commit(self, ep: dict, success: bool | None, meta: dict) -> int:
        index = len(self._rows)
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
        t_ns = np.asarray(ep["t"], np.int64)
        columns: dict[str, np.ndarray] = {STATE_KEY: state}
        if env is not None:
            columns[ENV_STATE_KEY] = env
        columns[ACTION_KEY] = action
        columns[CAPTURE_KEY] = t_ns
        for name, col in self.streams.items():
            columns[col] = np.asarray(ep["stamps"][name], np.int64)
        columns |= {
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index.astype(np.int64),
            "episode_index": np.full(n, index, np.int64),
            "index": (start + frame_index).astype(np.int64),
            "task_index": np.full(n, task_index, np.int64),
        }
        schema = data_schema(state.shape[1], action.shape[1], len(self.env_state_names), list(self.cameras))

        def arrow(key: str, x: np.ndarray) -> pa.Array:
            if x.ndim == 2:
                return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            return pa.array(x, schema.field(key).type)

        table = pa.Table.from_arrays([arrow(f.name, columns[f.name]) for f in schema], schema=schema)
        chunk, file = chunk_file(self._next_position("data", index))
        write_parquet_atomic(
            self.root / DATA_PATH.format(chunk_index=chunk, file_index=file), table, self._staging
        )

        row: dict = {
            "episode_index": index,
            "tasks": [ep["task"]],
            "length": n,
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": start,
            "dataset_to_index": start + n,
        }
        stats: dict[str, dict] = {}
        for cam in self.cameras:
            key = image_key(cam)
            vchunk, vfile = chunk_file(self._next_position(f"videos/{key}", index))
            tmp = self._staging / f"{cam}.mp4"
            info = self.info["features"][key].setdefault("info", {})
            if "video.codec" not in info:  # LeRobot records the first file's stream as the feature's
                info.update(probe_video(tmp))
            replace_durably(
                tmp, self.root / VIDEO_PATH.format(video_key=key, chunk_index=vchunk, file_index=vfile)
            )
            row |= {
                f"videos/{key}/chunk_index": vchunk,
                f"videos/{key}/file_index": vfile,
                f"videos/{key}/from_timestamp": 0.0,
                f"videos/{key}/to_timestamp": n / self.fps,
            }
            stats[key] = image_stats(np.stack(ep["img_sample"][cam]))
            stats[key]["count"] = np.array([n])
        # LeRobot 0.6 keeps per-episode stats of every feature, bookkeeping columns included; its
        # loader needs every episodes file to have the same columns
        for key in self.info["features"]:
            if key in columns:
                stats[key] = feature_stats(columns[key].reshape(n, -1))
        for key in self.info["features"]:
            for name, v in stats.get(key, {}).items():
                row[f"stats/{key}/{name}"] = np.asarray(v).tolist()
        last_file = self._last_file
        chunk_m, file_m = int(last_file.parent.name.split("-")[1]), int(last_file.stem.split("-")[1])
        row |= {"meta/episodes/chunk_index": chunk_m, "meta/episodes/file_index": file_m}
        if self._last_schema is not None:
            names = self._last_schema.names
            if set(names) != set(row):
                raise DatasetError(
                    f"{last_file}: its columns differ from the episode row this writer makes "
                    f"(missing there {sorted(set(row) - set(names))[:4]}, "
                    f"extra there {sorted(set(names) - set(row))[:4]})"
                )
            episodes_table = pa.Table.from_pylist([*self._last_rows, row], schema=self._last_schema)
        else:
            episodes_table = pa.Table.from_pylist([*self._last_rows, row])
        record = {
            "episode_index": index,
            "fingerprint": episode_fingerprint(state, action, t_ns),
            "success": success,
            "metadata": meta,
        }
        rows = [*self._rows, row]
        write_parquet_atomic(self.root / TASKS_PATH, tasks_table(self.tasks), self._staging)
        write_parquet_atomic(last_file, episodes_table, self._staging)
        write_carp_episodes(self.root, [*self._records, record], self._staging)
        self._write_stats(rows)
        info = json.loads(json.dumps(self.info))
        info["total_episodes"] = len(rows)
        info["total_frames"] = start + n
        info["total_tasks"] = len(self.tasks)
        info["splits"] = {"train": f"0:{len(rows)}"}
        write_json_atomic(self.root / INFO_PATH, info, self._staging)  # the commit
        self.info, self._rows = info, rows
        self._last_rows.append(row)
        self._last_schema = episodes_table.schema
        self._records.append(record)
        return index

    def _write_stats(self, rows: list[dict]) -> None:
        keys: dict[str, list[str]] = {}  # feature -> stat names, in row order
        for k in rows[0]:
            if k.startswith("stats/"):
                feat, name = k[len("stats/") :].rsplit("/", 1)
                if feat in self.info["features"]:  # as LeRobot: stats.json holds features only
                    keys.setdefault(feat, []).append(name)
        stats = {}
        for feat, names in keys.items():
            per_ep = [
                {nm: np.asarray(r[f"stats/{feat}/{nm}"], np.float64) for nm in names}
                for r in rows
                if all(r.get(f"stats/{feat}/{nm}") is not None for nm in names)
            ]
            if per_ep:
                stats[feat] = aggregate_stats(per_ep)
        write_json_atomic(self.root / STATS_PATH, stats_to_json(stats), self._staging)

    def _open_existing(self, robot_type: str | None) -> None:
        info = read_json(self.root / INFO_PATH)
        feats = info.get("features", {})
        if LEGACY_CAPTURE_KEY in feats and CAPTURE_KEY not in feats:
            raise DatasetError(
                f"{self.root}: written by an older carp_policy.dataset (float capture_time, success in "
                "meta/episodes); convert it first: carp-dataset export OLD NEW"
            )
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
        if ENV_STATE_KEY in feats and ENV_STATE_KEY not in want["features"]:
            raise DatasetError(
                f"{self.root}: dataset records {ENV_STATE_KEY} {feats[ENV_STATE_KEY].get('names')}; "
                "give the writer the same env_state_names"
            )
        extra = [
            k
            for k, ft in feats.items()
            if ft.get("dtype") in ("video", "image") and k not in want["features"]
        ]
        if extra:
            raise DatasetError(f"{self.root}: dataset has camera feature(s) {extra} the writer was not given")
        unknown = [k for k in feats if k not in want["features"]]
        if unknown:  # our data files would lack their columns: LeRobot could not load the dataset
            raise DatasetError(f"{self.root}: dataset has feature(s) {unknown} this writer does not record")
        committed = int(info.get("total_episodes", 0))
        self.info, self._rows, self.tasks = info, [], []
        if not committed and not list((self.root / "meta/episodes").glob("chunk-*/file-*.parquet")):
            remove_orphans(self.root, [])
            return
        rows, files = read_episode_rows(self.root)
        split = schema_split(files)
        if split:
            raise DatasetError(split[0])
        if len(rows) < committed:
            raise DatasetError(
                f"{self.root / 'meta/episodes'}: {len(rows)} rows but info.json commits {committed} episodes "
                "(a LeRobot recording that was not finalized?)"
            )
        self._rows = rows[:committed]
        self.tasks = read_tasks(self.root) if committed else []
        self._records = read_carp_episodes(self.root)
        # a crash between the episodes table and info.json leaves rows past `committed`, all in the
        # last file (saves only append there): roll them back
        uncommitted = len(rows) - committed
        last, last_schema, last_n = files[-1]
        if uncommitted:
            if uncommitted > last_n:
                raise DatasetError(f"{last}: {uncommitted} uncommitted episode rows span several files")
            if uncommitted < last_n:
                kept = rows[len(rows) - last_n : committed]
                write_parquet_atomic(last, pa.Table.from_pylist(kept, schema=last_schema), self._staging)
            else:
                last.unlink()
                files = files[:-1]
            if self._records and self._records[-1].get("episode_index") == committed:
                self._records.pop()
                write_carp_episodes(self.root, self._records, self._staging)
        if files:
            last, last_schema, last_n = files[-1]
            n_before = sum(f[2] for f in files[:-1])
            self._last_file, self._last_schema = last, last_schema
            self._last_rows = rows[n_before : n_before + last_n][: committed - n_before]
        if committed:
            self._write_stats(self._rows)
        remove_orphans(self.root, self._rows)

    def _time_ns(self, seconds: float | None, ns: int | None, n: int, what: str) -> int:
        if (seconds is None) == (ns is None):
            raise ValueError(f"frame {n}: give exactly one of {what} (s) and {what}_ns")
        if ns is not None:
            if not isinstance(ns, (int, np.integer)) or isinstance(ns, bool):
                raise ValueError(f"frame {n}: {what}_ns must be an int (nanoseconds), got {ns!r}")
            return int(ns)
        if not np.isfinite(float(seconds)):
            raise ValueError(f"frame {n}: {what} is not finite ({seconds})")
        return seconds_to_ns(seconds)

    def _stream_times(
        self, t: int, stamps: Mapping[str, float] | None, stamps_ns: Mapping[str, int] | None, n: int
    ) -> dict[str, int]:
        if stamps is not None and stamps_ns is not None:
            raise ValueError(f"frame {n}: give stamps (s) or stamps_ns, not both")
        given = stamps if stamps is not None else stamps_ns
        if given is None:
            return {name: t for name in self.streams}
        missing, unknown = set(self.streams) - set(given), set(given) - set(self.streams)
        if missing or unknown:
            raise ValueError(
                f"frame {n}: stamps must name every stream {list(self.streams)} "
                f"(missing {sorted(missing)}, unknown {sorted(unknown)})"
            )
        if stamps is not None:
            return {k: self._time_ns(stamps[k], None, n, f"stamps[{k!r}]") for k in self.streams}
        return {k: self._time_ns(None, stamps_ns[k], n, f"stamps[{k!r}]") for k in self.streams}

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

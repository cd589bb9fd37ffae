"""Reading datasets for training: episodes, windows with edge padding, splits, normalisation stats.

Reads any LeRobot v3.0 dataset: ours (one episode per file) and those other tools wrote (many
episodes per data file, many per concatenated MP4, images stored as PNG in parquet), with a
:class:`KeyMap` naming which of their keys are our state, action and cameras. Returns numpy only
(no torch import), so ``torch.utils.data.DataLoader`` collates the window dicts as they are.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from .format import (
    ACTION_KEY,
    CAPTURE_KEY,
    IMAGE_PREFIX,
    INFO_PATH,
    LEGACY_CAPTURE_KEY,
    QUANTILE_KEYS,
    STATE_KEY,
    DatasetError,
    column_matrix,
    decode_video,
    episode_fingerprint,
    feature_stats,
    match_carp_episodes,
    ns_to_seconds,
    read_carp_episodes,
    read_episode_rows,
    read_json,
    read_parquet,
    read_tasks,
    seconds_to_ns,
    stream_key,
)


@dataclass
class KeyMap:
    """Which keys of a LeRobot dataset are our state, action and cameras.

    state_key, action_key: the (T, D) vector features (``observation.state``, ``action``).
    env_state_key: a (T, E) feature appended to the state (e.g. ``observation.environment_state``,
        object poses); None = state only.
    cameras: our camera name -> the dataset's image/video key. Empty = every
        ``observation.images.<name>`` key, named ``<name>``.
    """

    state_key: str = STATE_KEY
    action_key: str = ACTION_KEY
    env_state_key: str | None = None
    cameras: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> KeyMap:
        """Load from a YAML file with the fields above (unknown fields are an error)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a key map must be a YAML mapping, got {type(data).__name__}")
        unknown = set(data) - {"state_key", "action_key", "env_state_key", "cameras"}
        if unknown:
            raise ValueError(f"{path}: unknown key map field(s) {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def coerce(cls, keymap: KeyMap | str | Path | dict | None) -> KeyMap:
        """Accept a KeyMap, a YAML path, a dict or None (the identity map)."""
        if keymap is None:
            return cls()
        if isinstance(keymap, KeyMap):
            return keymap
        if isinstance(keymap, dict):
            return cls(**keymap)
        return cls.from_yaml(keymap)


@dataclass
class Episode:
    """One demonstration, fully in memory.

    success: True / False as recorded, None where unknown (never judged, or the record of it was
        lost, e.g. by a LeRobot edit; see docs/datasets.md).
    metadata: what the recorder stored ({} where unknown).
    timestamps: (T,) the frames' times in seconds, float64 (``frame_index / fps`` when the dataset
        has none); exact nanoseconds in ``time_ns``.
    state: (T, Ds) float32; action: (T, Da) float32 (row t = target commanded for the next step).
    images: camera -> (T, H, W, 3) uint8 RGB.
    time_ns: (T,) int64 the frames' times in nanoseconds.
    stamps_ns: stream (``state``, camera names, ``env_state``) -> (T,) int64 capture times of its
        samples, for the streams the dataset records.
    """

    index: int
    task: str
    success: bool | None
    metadata: dict
    timestamps: np.ndarray
    state: np.ndarray
    action: np.ndarray
    images: dict[str, np.ndarray]
    time_ns: np.ndarray | None = None
    stamps_ns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.state)


class EpisodeDataset:
    """All episodes of a LeRobot v3.0 dataset; vectors load at once, images on first use (cached).

    keymap: a :class:`KeyMap`, a YAML path or None (our own keys).
    cameras: which cameras to decode (default: all the key map names).
    image_size: (H, W) a model reads: frames stored at another size (a LeRobot dataset at 480x640)
    are fitted to it on decode by ``images.fit_image``, the conversion the recorder and the policy
    node use (None: as stored).
    """

    def __init__(
        self,
        root: str | Path,
        keymap: KeyMap | str | Path | None = None,
        cameras: list[str] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.keymap = KeyMap.coerce(keymap)
        self.info = read_json(self.root / INFO_PATH)
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetError(
                f"{self.root / INFO_PATH}: codebase_version {version!r}; only LeRobot v3.x datasets are read"
            )
        feats = self.info.get("features", {})
        self.fps = float(self.info["fps"])
        wanted = [("state", self.keymap.state_key), ("action", self.keymap.action_key)]
        if self.keymap.env_state_key:
            wanted.append(("environment state", self.keymap.env_state_key))
        for what, key in wanted:
            if key not in feats:
                vec = [k for k, f in feats.items() if f.get("dtype") not in ("video", "image", "string")]
                raise DatasetError(
                    f"{self.root}: no {what} feature {key!r}; vector features are {vec} (set a key map)"
                )
        camera_keys = self.keymap.cameras or {
            k[len(IMAGE_PREFIX) :]: k
            for k, f in feats.items()
            if k.startswith(IMAGE_PREFIX) and f.get("dtype") in ("video", "image")
        }
        for cam, key in camera_keys.items():
            if key not in feats or feats[key].get("dtype") not in ("video", "image"):
                imgs = [k for k, f in feats.items() if f.get("dtype") in ("video", "image")]
                raise DatasetError(
                    f"{self.root}: camera {cam!r} maps to {key!r}, which is not an image feature; "
                    f"image features are {imgs}"
                )
        if cameras is not None:
            missing = [c for c in cameras if c not in camera_keys]
            if missing:
                raise DatasetError(
                    f"{self.root}: camera(s) {missing} not in the dataset; it has {sorted(camera_keys)}"
                )
            camera_keys = {c: camera_keys[c] for c in cameras}
        self.camera_keys = camera_keys
        self.cameras = list(camera_keys)
        self.state_names = _names(feats[self.keymap.state_key])
        if self.keymap.env_state_key:  # the policy's state = robot state + environment state
            self.state_names += _names(feats[self.keymap.env_state_key])
        self.action_names = _names(feats[self.keymap.action_key])

        total = int(self.info.get("total_episodes", 0))
        # every meta/episodes file (LeRobot's resume() adds more); rows past total_episodes are
        # uncommitted (a crash before info.json was replaced): ignore them
        rows = sorted(read_episode_rows(self.root)[0], key=lambda r: r["episode_index"]) if total else []
        self._rows = [r for r in rows if r["episode_index"] < total]
        if len(self._rows) != total or [r["episode_index"] for r in self._rows] != list(range(total)):
            raise DatasetError(
                f"{self.root / 'meta/episodes'}: {len(self._rows)} episode rows for indices "
                f"0..{total - 1}, info.json says {total}"
            )
        self.tasks = read_tasks(self.root) if total else []
        self._vectors = self._load_vectors()
        self._outcomes = self._match_outcomes()
        self._images: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_frames(self) -> int:
        """Total frames over all episodes."""
        return sum(len(v["state"]) for v in self._vectors)

    def metadata(self, i: int) -> dict:
        """Episode ``i``'s metadata (operator, seed, ...) without loading its frames ({} if unknown)."""
        return dict(self._outcomes[i][1])

    def success(self, i: int) -> bool | None:
        """Episode ``i``'s recorded success: True, False, or None where unknown."""
        return self._outcomes[i][0]

    def fingerprint(self, i: int) -> str | None:
        """What names episode ``i`` in a ``meta/carp/episodes.jsonl`` (None without our columns)."""
        return self._vectors[i]["fingerprint"]

    def episode(self, i: int) -> Episode:
        """Episode ``i`` (0-based position in the dataset) with its images decoded (once)."""
        if not 0 <= i < len(self):
            raise IndexError(f"episode {i} out of range (dataset has {len(self)})")
        if i not in self._images:
            self._images[i] = self._load_images(i)
        v, row = self._vectors[i], self._rows[i]
        return Episode(
            index=int(row["episode_index"]),
            task=v["task"],
            success=self.success(i),
            metadata=self.metadata(i),
            timestamps=v["timestamps"],
            state=v["state"],
            action=v["action"],
            images=self._images[i],
            time_ns=v["time_ns"],
            stamps_ns=dict(v["stamps_ns"]),
        )

    def vectors(self, i: int) -> dict[str, np.ndarray]:
        """Episode ``i``'s state (T, Ds), action (T, Da) and timestamps (T,) without decoding images."""
        return self._vectors[i]

    def preload(self, episodes: list[int] | None = None, progress: bool = True) -> None:
        """Decode the images of the given episodes (default: all) into the memory cache."""
        todo = [i for i in (range(len(self)) if episodes is None else episodes) if i not in self._images]
        if not self.cameras:
            return
        for i in tqdm(todo, desc="decoding episodes", unit="ep", disable=not progress or not todo):
            self._images[i] = self._load_images(i)

    def stats(self, episodes: list[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Exact per-dimension normalisation stats of state and action over the given episodes.

        Returns ``{"observation.state": {...}, "action": {...}}`` with min, max, mean, std, count and
        the quantiles q01, q10, q50, q90, q99, each (D,) float64 (count is (1,)).
        """
        idx = range(len(self)) if episodes is None else episodes
        if not len(idx):
            raise ValueError("stats of zero episodes")
        return {
            STATE_KEY: feature_stats(np.concatenate([self._vectors[i]["state"] for i in idx])),
            ACTION_KEY: feature_stats(np.concatenate([self._vectors[i]["action"] for i in idx])),
        }

    def summary(self) -> dict:
        """Episodes, frames, duration, per-task and success counts (what ``carp-dataset info`` prints)."""
        tasks: dict[str, int] = {}
        for v in self._vectors:
            tasks[v["task"]] = tasks.get(v["task"], 0) + 1
        outcomes = [o[0] for o in self._outcomes]
        successes, failures = outcomes.count(True), outcomes.count(False)
        return {
            "episodes": len(self),
            "frames": self.num_frames,
            "duration_s": self.num_frames / self.fps,
            "fps": self.fps,
            "cameras": {c: tuple(self.info["features"][k]["shape"][:2]) for c, k in self.camera_keys.items()},
            "tasks": tasks,
            "successes": successes,
            "failures": failures,
            "unknown": len(self) - successes - failures,
            "robot_type": self.info.get("robot_type"),
        }

    # ------------------------------------------------------------------ loading
    def _load_vectors(self) -> list[dict[str, np.ndarray]]:
        tables: dict[Path, object] = {}  # data file -> table, read once even when shared by episodes
        env_key = self.keymap.env_state_key
        cols = [
            self.keymap.state_key,
            *([env_key] if env_key else []),
            self.keymap.action_key,
            "episode_index",
            "frame_index",
            "timestamp",
            "task_index",
        ]
        feats = self.info.get("features", {})
        streams = {"state": stream_key("state")}  # stream name -> column
        streams |= {c: stream_key(k[len(IMAGE_PREFIX) :]) for c, k in self.camera_keys.items()}
        streams["env_state"] = stream_key("env_state")
        streams = {n: c for n, c in streams.items() if c in feats}
        out = []
        for row in self._rows:
            path = self.root / self.info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
            )
            if path not in tables:
                names = _schema_names(path)
                times = [k for k in names if k in (CAPTURE_KEY, LEGACY_CAPTURE_KEY) or k in streams.values()]
                raw = [k for k in (STATE_KEY, ACTION_KEY) if k in names and k not in cols]
                tables[path] = read_parquet(path, columns=cols + times + raw)
            table = tables[path]
            ep = table.filter(pc.equal(table["episode_index"], row["episode_index"]))
            if ep.num_rows != row["length"]:
                raise DatasetError(
                    f"{path}: episode {row['episode_index']} has {ep.num_rows} rows, "
                    f"metadata says {row['length']}"
                )
            ep = ep.sort_by("frame_index")
            state = column_matrix(ep, self.keymap.state_key, path)
            if env_key:
                state = np.concatenate([state, column_matrix(ep, env_key, path)], axis=1)
            action = column_matrix(ep, self.keymap.action_key, path)
            for what, x in (("state", state), ("action", action)):
                if not np.all(np.isfinite(x)):
                    bad = np.argwhere(~np.isfinite(x))[0]
                    raise DatasetError(
                        f"{path}: episode {row['episode_index']} {what} is not finite "
                        f"at frame {bad[0]}, dim {bad[1]}"
                    )
            ts = ep["timestamp"].to_numpy().astype(np.float64)
            names = ep.column_names
            if CAPTURE_KEY in names:
                time_ns = ep[CAPTURE_KEY].to_numpy().astype(np.int64)
            elif LEGACY_CAPTURE_KEY in names:  # float64 seconds, older versions
                time_ns = np.array([seconds_to_ns(x) for x in ep[LEGACY_CAPTURE_KEY].to_numpy()], np.int64)
            else:
                time_ns = np.array([seconds_to_ns(x) for x in ts], np.int64)
            stamps_ns = {
                name: ep[col].to_numpy().astype(np.int64) for name, col in streams.items() if col in names
            }
            fingerprint = None
            if STATE_KEY in names and ACTION_KEY in names:  # what names the episode in the sidecar
                fingerprint = episode_fingerprint(
                    column_matrix(ep, STATE_KEY, path),
                    column_matrix(ep, ACTION_KEY, path),
                    time_ns if CAPTURE_KEY in names else None,
                )
            task_idx = ep["task_index"][0].as_py()
            task = self.tasks[task_idx] if 0 <= task_idx < len(self.tasks) else (row.get("tasks") or [""])[0]
            out.append(
                {
                    "state": state,
                    "action": action,
                    "timestamps": ns_to_seconds(time_ns),
                    "time_ns": time_ns,
                    "stamps_ns": stamps_ns,
                    "fingerprint": fingerprint,
                    "video_ts": ts,
                    "task": task,
                }
            )
        return out

    def _match_outcomes(self) -> list[tuple[bool | None, dict]]:
        """(success, metadata) per episode: from the sidecar line whose fingerprint is the
        episode's; else from the columns older versions kept in meta/episodes; else unknown."""
        records = read_carp_episodes(self.root)
        matched = match_carp_episodes(records, [v["fingerprint"] or "" for v in self._vectors])
        out: list[tuple[bool | None, dict]] = []
        for row, rec in zip(self._rows, matched):
            if rec is not None:
                out.append((_known_bool(rec.get("success")), dict(rec.get("metadata") or {})))
                continue
            meta = row.get("metadata")
            try:
                meta = json.loads(meta) if isinstance(meta, str) and meta else {}
            except json.JSONDecodeError:
                meta = {}
            out.append((_known_bool(row.get("success")), meta if isinstance(meta, dict) else {}))
        return out

    def _load_images(self, i: int) -> dict[str, np.ndarray]:
        row, v = self._rows[i], self._vectors[i]
        out = {}
        for cam, key in self.camera_keys.items():
            if self.info["features"][key]["dtype"] == "image":
                out[cam] = self._load_png_column(row, key)
                continue
            path = self.root / self.info["video_path"].format(
                video_key=key,
                chunk_index=row[f"videos/{key}/chunk_index"],
                file_index=row[f"videos/{key}/file_index"],
            )
            frames, pts = decode_video(path)
            # LeRobot's rule: the frame of data row t is the one at from_timestamp + timestamp[t]
            want = float(row.get(f"videos/{key}/from_timestamp", 0.0)) + v["video_ts"]
            j = np.clip(np.searchsorted(pts, want), 1, len(pts) - 1)
            j = np.where(np.abs(pts[j - 1] - want) <= np.abs(pts[j] - want), j - 1, j)
            err = np.abs(pts[j] - want)
            if len(pts) == 1:
                j, err = np.zeros(len(want), int), np.abs(pts[0] - want)
            if np.any(err > 0.5 / self.fps):
                t = int(np.argmax(err))
                raise DatasetError(
                    f"{path}: no frame near {want[t]:.3f} s for episode {row['episode_index']} frame {t} "
                    f"(video has {len(pts)} frames up to {pts[-1]:.3f} s): truncated or out of sync"
                )
            out[cam] = frames[j]
        if self.image_size is not None:
            from carp_policy.images import fit_image

            for cam, frames in out.items():
                if frames.shape[1:3] != self.image_size:
                    out[cam] = np.stack([fit_image(f, self.image_size) for f in frames])
        return out

    def _load_png_column(self, row: dict, key: str) -> np.ndarray:
        from PIL import Image  # only for datasets that store images as PNG in parquet

        path = self.root / self.info["data_path"].format(
            chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
        )
        table = read_parquet(path, columns=[key, "episode_index", "frame_index"])
        table = table.filter(pc.equal(table["episode_index"], row["episode_index"])).sort_by("frame_index")
        return np.stack(
            [np.asarray(Image.open(io.BytesIO(c["bytes"])).convert("RGB")) for c in table[key].to_pylist()]
        )


def _known_bool(x: object) -> bool | None:
    """A recorded flag, or None where it is missing or empty (a NaN from a pandas merge included):
    unknown is never read as True or as False."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)) and x in (0, 1):
        return bool(x)
    if isinstance(x, float) and x in (0.0, 1.0):
        return bool(x)
    return None


def _schema_names(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: unreadable parquet ({e})") from None


def _names(feature: dict) -> list[str]:
    names = feature.get("names")
    if isinstance(names, dict):  # older LeRobot datasets: {"motors": [...]}
        names = next(iter(names.values()), None)
    if not names:
        names = [f"{i}" for i in range(int(np.prod(feature.get("shape", [0]))))]
    return list(names)


def split_episodes(
    num_episodes: int, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split episode positions into (train, val) lists, sorted, by a seeded permutation.

    At least one validation episode whenever ``val_fraction > 0`` and there are >= 2 episodes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(num_episodes)
    n_val = round(num_episodes * val_fraction)
    if val_fraction > 0 and num_episodes >= 2:
        n_val = max(1, n_val)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class MultiTaskEpisodes:
    """Several tasks' datasets as one, each episode labelled with its task's index (a multi-task
    model's training data). The same episode interface ``WindowDataset`` reads, positions running
    through the datasets in order; ``task_ids[i]`` is episode i's task index."""

    def __init__(self, datasets: list[EpisodeDataset], tasks: list[str]) -> None:
        if len(datasets) != len(tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"one dataset per task, tasks distinct: got {len(datasets)} datasets, {tasks}")
        names = [tuple(d.state_names) for d in datasets]
        if len(set(names)) != 1:
            raise ValueError(f"the tasks' datasets record different state vectors: {dict(zip(tasks, names))}")
        self.datasets, self.tasks = list(datasets), list(tasks)
        self.state_names = list(names[0])
        self.cameras = [c for c in datasets[0].cameras if all(c in d.cameras for d in datasets)]
        self._index = [(k, i) for k, d in enumerate(datasets) for i in range(len(d))]  # position -> (k, i)
        self.task_ids = np.asarray([k for k, _ in self._index], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def positions(self, task: int) -> list[int]:
        """The positions of task ``task``'s episodes."""
        return [p for p, (k, _) in enumerate(self._index) if k == task]

    def vectors(self, i: int) -> dict[str, np.ndarray]:
        k, j = self._index[i]
        return self.datasets[k].vectors(j)

    def episode(self, i: int) -> Episode:
        k, j = self._index[i]
        return self.datasets[k].episode(j)

    def preload(self, episodes: list[int] | None = None, progress: bool = True) -> None:
        for k, d in enumerate(self.datasets):
            wanted = range(len(self)) if episodes is None else episodes
            mine = [self._index[p][1] for p in wanted if self._index[p][0] == k]
            d.preload(mine, progress=progress)


class WindowDataset:
    """Training windows: one per frame t of each selected episode.

    Item: state (O, Ds) float32 and images {cam: (O, H, W, 3) uint8} for frames t-O+1..t (frame 0
    repeated before the start), action (H, Da) float32 for rows t..t+H-1 (the last row repeated
    past the end), episode (position in the dataset) and frame t; over a ``MultiTaskEpisodes``
    also task (the episode's task index).
    """

    def __init__(
        self,
        dataset: EpisodeDataset,
        episode_indices: list[int] | None,
        obs_horizon: int,
        action_horizon: int = 16,
        cameras: list[str] | None = None,
        obs_stride: int = 1,
    ) -> None:
        if obs_horizon < 1 or action_horizon < 1 or obs_stride < 1:
            raise ValueError(
                f"horizons and stride must be >= 1, got obs {obs_horizon}, action {action_horizon}, "
                f"stride {obs_stride}"
            )
        self.obs_stride = obs_stride
        self.dataset = dataset
        self.episodes = list(range(len(dataset)) if episode_indices is None else episode_indices)
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.cameras = list(dataset.cameras if cameras is None else cameras)
        missing = [c for c in self.cameras if c not in dataset.cameras]
        if missing:
            raise ValueError(f"camera(s) {missing} not loaded by the dataset (it has {dataset.cameras})")
        if self.cameras:
            dataset.preload(self.episodes)  # decode once, before any DataLoader workers fork
        lengths = [len(dataset.vectors(e)["state"]) for e in self.episodes]
        # (episode, frame) for every window, as two flat arrays for O(1) lookup
        self._ep = np.repeat(np.asarray(self.episodes, dtype=np.int64), lengths)
        self._t = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, np.int64)
        self._task_ids = getattr(dataset, "task_ids", None)  # a multi-task dataset's labels

    def __len__(self) -> int:
        return len(self._t)

    def __getitem__(self, i: int) -> dict:
        e, t = int(self._ep[i]), int(self._t[i])
        v = self.dataset.vectors(e)
        n = len(v["state"])
        # (O,) frames t - (O - 1 - i) * stride, edge-padded at the start (as ObservationHistory does)
        obs = np.clip(t - self.obs_stride * np.arange(self.obs_horizon - 1, -1, -1), 0, None)
        act = np.clip(np.arange(t, t + self.action_horizon), None, n - 1)  # (H,) edge-padded at the end
        images = {}
        if self.cameras:
            ep_images = self.dataset.episode(e).images
            images = {c: ep_images[c][obs] for c in self.cameras}
        item = {
            "state": v["state"][obs],
            "images": images,
            "action": v["action"][act],
            "episode": e,
            "frame": t,
        }
        if self._task_ids is not None:
            item["task"] = int(self._task_ids[e])
        return item


__all__ = [
    "QUANTILE_KEYS",
    "Episode",
    "EpisodeDataset",
    "KeyMap",
    "MultiTaskEpisodes",
    "WindowDataset",
    "split_episodes",
]

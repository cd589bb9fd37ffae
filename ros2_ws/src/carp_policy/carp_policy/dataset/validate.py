"""Check every file of a dataset and name what is wrong (``carp-dataset validate``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from .format import (
    CAPTURE_KEY,
    CARP_EPISODES_PATH,
    INFO_PATH,
    STAGING_DIR,
    STATS_PATH,
    DatasetError,
    column_matrix,
    decode_video,
    read_carp_episodes,
    read_episode_rows,
    read_json,
    read_parquet,
    read_tasks,
    schema_split,
)
from .writer import orphan_files


@dataclass
class ValidationReport:
    """Errors make the dataset unusable (or lose episodes); warnings are leftovers a writer repairs."""

    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    episodes: int = 0
    frames: int = 0
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_dataset(root: str | Path, decode_videos: bool = True) -> ValidationReport:
    """Read every metadata, data and video file of a LeRobot v3.0 dataset and cross-check them.

    decode_videos: decode every frame of every video (catches truncated or corrupt MP4s).
    """
    root = Path(root)
    rep = ValidationReport(root)
    try:
        info = read_json(root / INFO_PATH)
    except DatasetError as e:
        rep.errors.append(str(e))
        return rep
    rep.files_checked += 1
    for k in ("codebase_version", "fps", "features", "total_episodes", "data_path"):
        if k not in info:
            rep.errors.append(f"{root / INFO_PATH}: missing field {k!r}")
    if rep.errors:
        return rep
    if not str(info["codebase_version"]).startswith("v3"):
        rep.errors.append(f"{root / INFO_PATH}: codebase_version {info['codebase_version']!r} is not v3.x")
    feats, fps, total = info["features"], float(info["fps"]), int(info["total_episodes"])
    rep.episodes = total
    if total == 0:
        return rep

    try:
        tasks = read_tasks(root)
        rep.files_checked += 1
    except DatasetError as e:
        rep.errors.append(str(e))
        tasks = []
    if (root / STATS_PATH).exists():
        try:
            read_json(root / STATS_PATH)
            rep.files_checked += 1
        except DatasetError as e:
            rep.errors.append(str(e))
    else:
        rep.warnings.append(f"{root / STATS_PATH}: missing (LeRobot policies need it for normalisation)")
    try:
        rows, ep_files = read_episode_rows(root)
        rep.files_checked += len(ep_files)
    except DatasetError as e:
        rep.errors.append(str(e))
        return rep
    rep.errors.extend(schema_split(ep_files))
    _check_episode_columns(root, feats, ep_files, rep)
    rows.sort(key=lambda r: r["episode_index"])
    if len(rows) < total:
        rep.errors.append(f"{root / 'meta/episodes'}: {len(rows)} episode rows but info.json commits {total}")
    if len(rows) > total:
        rep.warnings.append(
            f"{root / 'meta/episodes'}: {len(rows) - total} uncommitted episode row(s) from an "
            "interrupted save (ignored; a writer removes them)"
        )
    rows = rows[:total]
    if sum(r["length"] for r in rows) != info.get("total_frames", sum(r["length"] for r in rows)):
        rep.errors.append(
            f"{root / INFO_PATH}: total_frames {info.get('total_frames')} != sum of episode lengths"
        )

    vec_keys = [
        k
        for k, f in feats.items()
        if f.get("dtype") in ("float32", "float64") and len(f.get("shape", [])) == 1 and f["shape"][0] > 1
    ]
    tables: dict[Path, object] = {}
    checked_columns: set[Path] = set()
    for r in rows:
        ep = r["episode_index"]
        path = root / info["data_path"].format(
            chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]
        )
        if path not in tables:
            try:
                tables[path] = read_parquet(path)
                rep.files_checked += 1
            except DatasetError as e:
                tables[path] = None
                rep.errors.append(str(e))
        table = tables[path]
        if table is None:
            continue
        if path not in checked_columns:
            checked_columns.add(path)
            want = {k for k, f in feats.items() if f.get("dtype") != "video"}
            have = set(table.column_names)
            if want != have:  # LeRobot reads data files cast to exactly these features
                rep.errors.append(
                    f"{path}: columns do not match info.json's features (missing {sorted(want - have)[:4]}, "
                    f"extra {sorted(have - want)[:4]}); LeRobot cannot load it"
                )
        t = table.filter(pc.equal(table["episode_index"], ep)).sort_by("frame_index")
        if t.num_rows != r["length"]:
            rep.errors.append(f"{path}: episode {ep} has {t.num_rows} rows, metadata says {r['length']}")
            continue
        if t["frame_index"].to_pylist() != list(range(t.num_rows)):
            rep.errors.append(f"{path}: episode {ep} frame_index is not 0..{t.num_rows - 1}")
        if "index" in t.column_names and t["index"].to_pylist() != list(
            range(r["dataset_from_index"], r["dataset_to_index"])
        ):
            rep.errors.append(f"{path}: episode {ep} index column does not match dataset_from/to_index")
        if (
            "task_index" in t.column_names
            and tasks
            and not all(0 <= x < len(tasks) for x in t["task_index"].to_pylist())
        ):
            rep.errors.append(f"{path}: episode {ep} has a task_index not in meta/tasks.parquet")
        for key in vec_keys:
            if key not in t.column_names:
                rep.errors.append(f"{path}: column {key} missing")
                continue
            try:
                x = column_matrix(t, key, path)
            except DatasetError as e:
                rep.errors.append(str(e))
                continue
            if x.shape[1] != feats[key]["shape"][0]:
                rep.errors.append(
                    f"{path}: episode {ep} {key} has {x.shape[1]} dims, "
                    f"info.json says {feats[key]['shape'][0]}"
                )
            elif not np.all(np.isfinite(x)):
                bad = np.argwhere(~np.isfinite(x))[0]
                rep.errors.append(f"{path}: episode {ep} {key} is not finite at frame {bad[0]}, dim {bad[1]}")
        if CAPTURE_KEY in t.column_names and not np.all(np.diff(t[CAPTURE_KEY].to_numpy()) > 0):
            rep.warnings.append(f"{path}: episode {ep} {CAPTURE_KEY} does not increase frame to frame")
        rep.frames += t.num_rows

    try:
        records = read_carp_episodes(root)
        if records:
            rep.files_checked += 1
        if len(records) > total + 1:
            rep.warnings.append(
                f"{root / CARP_EPISODES_PATH}: {len(records)} lines for {total} episodes "
                "(lines of episodes no longer in the dataset are ignored)"
            )
    except DatasetError as e:
        rep.errors.append(str(e))

    if decode_videos:
        _check_videos(root, info, rows, fps, rep)
    for p in orphan_files(root, rows):
        rep.warnings.append(
            f"{p}: orphaned file no episode references (an interrupted save); "
            "`carp-dataset validate --clean` removes it"
        )
    if (root / STAGING_DIR).exists() and any((root / STAGING_DIR).iterdir()):
        rep.warnings.append(f"{root / STAGING_DIR}: staging files (a writer is recording, or one crashed)")
    return rep


def _check_episode_columns(
    root: Path, feats: dict, files: list[tuple[Path, object, int]], rep: ValidationReport
) -> None:
    """Columns that break LeRobot's resume(): it writes a new episodes file with stats/<feature>/*
    for every feature and nothing else, and cannot load the dataset when the old files differ."""
    if not files:
        return
    path, schema, _ = files[0]
    names = set(schema.names)
    no_stats = [k for k, f in feats.items() if not any(n.startswith(f"stats/{k}/") for n in names)]
    ours = sorted(names & {"success", "metadata"})
    if no_stats or ours:
        what = []
        if no_stats:
            what.append(f"no stats/<feature>/* columns for {no_stats[:6]}")
        if ours:
            what.append(f"extra columns {ours}")
        rep.warnings.append(
            f"{path}: {'; '.join(what)} (an older version of this writer, or another tool): LeRobot "
            "loads it, but not after its resume() appends an episode; `carp-dataset export` "
            "rewrites the dataset in the current form"
        )


def _check_videos(root: Path, info: dict, rows: list[dict], fps: float, rep: ValidationReport) -> None:
    video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    decoded: dict[Path, tuple[np.ndarray, np.ndarray] | None] = {}
    for r in rows:
        for key in video_keys:
            if f"videos/{key}/chunk_index" not in r:
                rep.errors.append(
                    f"{root / 'meta/episodes'}: episode {r['episode_index']} has no video entry for {key}"
                )
                continue
            path = root / info["video_path"].format(
                video_key=key,
                chunk_index=r[f"videos/{key}/chunk_index"],
                file_index=r[f"videos/{key}/file_index"],
            )
            if path not in decoded:
                try:
                    frames, pts = decode_video(path)
                    decoded[path] = (np.asarray(frames.shape[1:3]), pts)
                    rep.files_checked += 1
                except DatasetError as e:
                    decoded[path] = None
                    rep.errors.append(str(e))
            if decoded[path] is None:
                continue
            hw, pts = decoded[path]
            want_hw = list(info["features"][key]["shape"][:2])
            if list(hw) != want_hw:
                rep.errors.append(f"{path}: frames are {list(hw)}, info.json says {want_hw}")
            t0 = float(r[f"videos/{key}/from_timestamp"])
            want = t0 + np.arange(r["length"]) / fps
            have = (
                np.abs(pts[None, :] - want[:, None]).min(1) <= 0.5 / fps
            )  # (T,) a frame near each timestamp
            if not have.all():
                rep.errors.append(
                    f"{path}: episode {r['episode_index']} needs {r['length']} frames from {t0:.2f} s, "
                    f"{int(have.sum())} found (video truncated or out of sync)"
                )

"""``carp-dataset``: inspect, validate, view and export demonstration datasets.

carp-dataset info DIR                       episodes, frames, duration, tasks, successes
carp-dataset validate DIR [--clean]         read every file; name what is corrupt; exit 1 on errors
carp-dataset view DIR --episode N [-o MP4]  both cameras with the trajectory plotted beside
carp-dataset export SRC DST [--episodes 0-9,12] [--success-only] [--keymap YAML]
                                            copy a subset (or a key-mapped foreign LeRobot
                                            dataset) into a fresh dataset of ours
carp-dataset restore-meta DST SRC [SRC ...] give DST's episodes the success flags and metadata
                                            their originals have in SRC (after LeRobot's
                                            delete/split/merge, which drop them), matched by
                                            the episodes' data, never by position

A user's mistake (a missing dataset, a bad option) is one line ``carp-dataset: error: ...`` and
exit code 2; ``validate`` exits 1 when it finds errors in the dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..cli import UserError, run_main
from .format import (
    CARP_EPISODES_PATH,
    ENV_STATE_KEY,
    INFO_PATH,
    LOCK_FILE,
    STAGING_DIR,
    DatasetError,
    VideoConfig,
    VideoEncoder,
    read_carp_episodes,
    read_json,
    write_carp_episodes,
)
from .reader import EpisodeDataset, KeyMap
from .validate import validate_dataset
from .writer import DatasetWriter


def parse_episode_list(spec: str, n: int) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; every index must be < n."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
        out.extend(range(lo, hi + 1))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"episode(s) {bad} out of range (dataset has {n})")
    return sorted(set(out))


def cmd_info(args: argparse.Namespace) -> int:
    ds = EpisodeDataset(args.dir, keymap=args.keymap)
    s = ds.summary()
    size = sum(p.stat().st_size for p in Path(args.dir).rglob("*") if p.is_file())
    print(
        f"dataset   {Path(args.dir).resolve()}  "
        f"(LeRobot {ds.info['codebase_version']}, robot {s['robot_type']})"
    )
    unknown = f", {s['unknown']} unknown" if s["unknown"] else ""
    print(f"episodes  {s['episodes']}  ({s['successes']} success, {s['failures']} failure{unknown})")
    print(
        f"frames    {s['frames']}  at {s['fps']:g} Hz = "
        f"{s['duration_s']:.1f} s ({s['duration_s'] / 60:.1f} min)"
    )
    cams = ", ".join(f"{c} {h}x{w}" for c, (h, w) in s["cameras"].items())
    print(f"cameras   {cams or '-'}")
    print(f"state     {len(ds.state_names)} dims {ds.state_names}")
    env = ds.info["features"].get(ENV_STATE_KEY)
    if env is not None and ds.keymap.env_state_key is None:
        print(f"env state {env['shape'][0]} dims {env.get('names')}")
    print(f"action    {len(ds.action_names)} dims {ds.action_names}")
    print(f"size      {size / 1e6:.1f} MB")
    print("tasks")
    for task, count in s["tasks"].items():
        print(f"  {count:4d}  {task}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not (root / INFO_PATH).exists():
        raise UserError(f"{root}: not a dataset (no {INFO_PATH})")
    if args.clean:
        # opening a writer repairs a crashed save: drops uncommitted rows, orphans, staging files;
        # it takes cameras, names, env state and fps from the dataset itself
        with DatasetWriter.open(root):
            pass
        print(f"cleaned {root}")
    rep = validate_dataset(root, decode_videos=not args.quick)
    for w in rep.warnings:
        print(f"WARNING {w}")
    for e in rep.errors:
        print(f"ERROR   {e}")
    status = "OK" if rep.ok else f"{len(rep.errors)} ERROR(S)"
    if rep.ok and not args.quick:
        with contextlib.suppress(DatasetError):
            s = EpisodeDataset(root, cameras=[]).summary()
            print(f"success   {s['successes']} yes, {s['failures']} no, {s['unknown']} unknown")
    print(
        f"{status}: {rep.episodes} episodes, {rep.frames} frames, {rep.files_checked} files checked, "
        f"{len(rep.warnings)} warning(s)"
    )
    return 0 if rep.ok else 1


def cmd_view(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = EpisodeDataset(args.dir, keymap=args.keymap)
    ep = ds.episode(args.episode)
    out = Path(args.output or f"episode_{ep.index:06d}.mp4")
    t = np.arange(len(ep)) / ds.fps
    frames = [ep.images[c] for c in ds.cameras]
    h = max((f.shape[1] for f in frames), default=240)
    panel_h = max(2 * h, 240)
    # trajectory panel: drawn once; per frame only a cursor column is painted (fast, no redraw)
    fig, axes = plt.subplots(3, 1, figsize=(4, panel_h / 100), dpi=100, sharex=True)
    names = ds.action_names
    for j, name in enumerate(names[:3]):
        axes[0].plot(t, ep.action[:, j], label=f"{name} act")
        axes[0].plot(t, ep.state[:, j], "--", lw=0.8)
    axes[0].set_ylabel("pos (m)")
    axes[0].legend(fontsize=6, loc="upper right")
    axes[1].plot(t, ep.action[:, 3:-1], lw=0.8)
    axes[1].set_ylabel("rot6d")
    axes[2].plot(t, ep.action[:, -1], label="action")
    axes[2].plot(t, ep.state[:, -1], "--", label="state")
    axes[2].set_ylabel(names[-1] if names else "")
    axes[2].set_xlabel("t (s)")
    axes[2].legend(fontsize=6)
    outcome = {True: "success", False: "failure", None: "outcome unknown"}[ep.success]
    axes[0].set_title(f"ep {ep.index} {outcome}: {ep.task[:40]}", fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    plot = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    xs = [round(axes[0].transData.transform((ti, 0))[0]) for ti in t]
    plt.close(fig)
    scale = max(1, panel_h // (2 * h)) if frames else 1
    cams = [np.repeat(np.repeat(f, scale, 1), scale, 2) for f in frames]
    cam_col_w = max((c.shape[2] for c in cams), default=0)
    height = max(plot.shape[0], sum(c.shape[1] for c in cams))
    width = cam_col_w + plot.shape[1]
    height, width = height + height % 2, width + width % 2
    enc = VideoEncoder(
        out, ds.fps, height, width, VideoConfig(crf=20, pix_fmt="yuv420p")
    )  # for people: plays everywhere
    for i in tqdm(range(len(ep)), desc=f"rendering {out.name}", unit="frame"):
        canvas = np.full((height, width, 3), 255, np.uint8)
        y = 0
        for c in cams:
            canvas[y : y + c.shape[1], : c.shape[2]] = c[i]
            y += c.shape[1]
        p = plot.copy()
        p[:, max(0, xs[i] - 1) : xs[i] + 1] = (220, 30, 30)
        canvas[: p.shape[0], cam_col_w : cam_col_w + p.shape[1]] = p
        enc.encode(canvas)
    enc.close()
    print(f"wrote {out} ({len(ep)} frames, {len(ep) / ds.fps:.1f} s, cameras {ds.cameras})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    keymap, env_names = args.keymap, []
    feats = read_json(Path(args.src) / INFO_PATH).get("features", {})
    if keymap is None and ENV_STATE_KEY in feats:  # carry the environment state over
        keymap, env_names = KeyMap(env_state_key=ENV_STATE_KEY), list(feats[ENV_STATE_KEY]["names"])
    src = EpisodeDataset(args.src, keymap=keymap)
    S = len(src.state_names) - len(env_names)
    idx = parse_episode_list(args.episodes, len(src)) if args.episodes else list(range(len(src)))
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        if not args.overwrite:
            raise UserError(f"{dst} exists and is not empty (use --overwrite)")
        shutil.rmtree(dst)
    skipped = {False: 0, None: 0}
    if args.success_only:  # only known successes: a failure or an unknown outcome is not one
        kept_idx = [i for i in idx if src.success(i) is True]
        for i in idx:
            if src.success(i) is not True:
                skipped[src.success(i)] += 1
        idx = kept_idx
        if not idx:
            raise UserError(
                f"--success-only: none of the selected episodes of {args.src} is a known success "
                f"({skipped[False]} failed, {skipped[None]} unknown)"
            )
    cams = {c: tuple(src.info["features"][k]["shape"][:2]) for c, k in src.camera_keys.items()}
    kept = 0
    with DatasetWriter(
        dst,
        fps=src.fps,
        cameras=cams,
        state_names=src.state_names[:S],
        action_names=src.action_names,
        robot_type=src.info.get("robot_type"),
        env_state_names=env_names,
    ) as w:
        for i in tqdm(idx, desc="exporting", unit="ep"):
            ep = src.episode(i)
            w.begin_episode(ep.task)
            for t in range(len(ep)):
                imgs = {c: ep.images[c][t] for c in cams}
                env = ep.state[t, S:] if env_names else None
                stamps = {n: int(v[t]) for n, v in ep.stamps_ns.items() if n in w.streams}
                w.add_frame(
                    None, imgs, ep.state[t, :S], ep.action[t], env_state=env,
                    timestamp_ns=int(ep.time_ns[t]),
                    stamps_ns=stamps if set(stamps) == set(w.streams) else None,
                )  # fmt: skip
            w.save_episode(
                success=ep.success, metadata={**ep.metadata, "exported_from": f"{args.src}#{ep.index}"}
            )
            kept += 1
            src._images.pop(i, None)  # keep memory flat on large exports
    dropped = ""
    if args.success_only:
        dropped = f"; left out {skipped[False]} failed and {skipped[None]} of unknown outcome"
    print(f"exported {kept} episodes from {args.src} to {dst} (videos re-encoded){dropped}")
    return 0


def cmd_restore_meta(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    for root in [dst, *map(Path, args.src)]:
        if not (root / INFO_PATH).exists():
            raise UserError(f"{root}: not a dataset (no {INFO_PATH})")
    lock = open(dst / LOCK_FILE, "w")  # the writer's lock: never rewrite the sidecar under a recording
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{dst}: a DatasetWriter has it open; try again when it is closed") from None
    try:
        return _restore_meta(dst, args.src)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _restore_meta(dst: Path, sources: list[str]) -> int:
    ds = EpisodeDataset(dst, cameras=[])
    by_fp: dict[str, list[dict]] = {}
    for src in sources:
        for rec in read_carp_episodes(Path(src)):
            by_fp.setdefault(rec["fingerprint"], []).append(rec)
    have = read_carp_episodes(dst)
    known = {r["fingerprint"] for r in have}
    records, found, ambiguous = list(have), 0, 0
    for i in range(len(ds)):
        fp = ds.fingerprint(i)
        cands = by_fp.get(fp or "", [])
        if not cands or fp in known:
            continue
        outcomes = {(c.get("success"), json.dumps(c.get("metadata"), sort_keys=True)) for c in cands}
        if len(outcomes) > 1:
            ambiguous += 1  # identical data recorded twice with different outcomes: stays unknown
            continue
        records.append({**cands[0], "episode_index": i})
        known.add(fp)
        found += 1
    staging = dst / STAGING_DIR / "restore-meta"
    write_carp_episodes(dst, records, staging)
    shutil.rmtree(staging, ignore_errors=True)
    after = EpisodeDataset(dst, cameras=[]).summary()
    print(
        f"restored success/metadata of {found} of {len(ds)} episodes into {dst / CARP_EPISODES_PATH} "
        f"({ambiguous} ambiguous); now {after['successes']} success, {after['failures']} failure, "
        f"{after['unknown']} unknown"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="carp-dataset",
        description="Inspect, validate, view and export LeRobot v3.0 demonstration datasets.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="episodes, frames, duration, tasks, success counts")
    s.add_argument("dir")
    s.add_argument("--keymap", help="YAML key map for datasets other tools wrote")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("validate", help="read every file and name what is corrupt (exit 1 on errors)")
    s.add_argument("dir")
    s.add_argument(
        "--clean", action="store_true", help="first repair an interrupted save (orphans, uncommitted rows)"
    )
    s.add_argument("--quick", action="store_true", help="skip decoding the videos")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("view", help="write an MP4 of the cameras with the trajectory plotted beside")
    s.add_argument("dir")
    s.add_argument("--episode", type=int, required=True)
    s.add_argument("-o", "--output", help="output .mp4 (default episode_NNNNNN.mp4)")
    s.add_argument("--keymap")
    s.set_defaults(func=cmd_view)
    s = sub.add_parser(
        "restore-meta", help="bring back success flags and metadata a LeRobot edit dropped (by data match)"
    )
    s.add_argument("dst", help="the edited dataset (LeRobot's delete/split/merge output)")
    s.add_argument("src", nargs="+", help="the dataset(s) it was made from")
    s.set_defaults(func=cmd_restore_meta)
    s = sub.add_parser("export", help="copy a subset, or a key-mapped foreign dataset, into a new dataset")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--episodes", help="e.g. 0-9,12 (default: all)")
    s.add_argument(
        "--success-only",
        action="store_true",
        help="keep only episodes recorded as successes (failed and unknown ones are left out, counted)",
    )
    s.add_argument("--keymap", help="YAML key map for the source dataset")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``carp-dataset``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            return args.func(args)
        except (DatasetError, IndexError) as e:  # a dataset that is not what the user said it is
            raise UserError(str(e)) from e

    return run_main("carp-dataset", body)


if __name__ == "__main__":
    sys.exit(main())

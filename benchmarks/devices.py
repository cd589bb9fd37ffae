"""Devices and the recorder in the twin: camera-to-observation latency and camera skew with two
cameras at 30 fps, the recorder's CPU per frame, and whether the writer keeps up at 10 Hz.

    python benchmarks/devices.py --episodes 2 --out benchmarks/results/devices

It runs ``carp-record --sim --input scripted`` in this process (threaded twin cameras, the twin's
state stream at 125 Hz, the scripted SpaceMouse through pyspacemouse's decoding) and reads back
what the recorder stored per frame: each camera's capture time against the tick's time (latency:
how old the frame was when it entered the observation), and the skew between the streams. The
stream limits are loosened (``--max-age``, ``--max-skew``) so a loaded machine still records; the
measured distributions say how the defaults (100 ms, 50 ms) would fare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/devices"))
    ap.add_argument("--max-age", type=float, default=0.4)
    ap.add_argument("--max-skew", type=float, default=0.4)
    a = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from carp_policy.dataset import EpisodeDataset
    from carp_teleop import record, recorder

    # time the recorder's own work per frame: policy-image resize + dataset writer (calling thread)
    add_cpu: list[float] = []
    orig_add = recorder.EpisodeSink.add

    def timed_add(self, *args, **kw):
        c = time.thread_time()
        orig_add(self, *args, **kw)
        add_cpu.append(time.thread_time() - c)

    recorder.EpisodeSink.add = timed_add
    summaries = []
    orig_run = recorder.Recorder.run

    def run_and_keep(self, *args, **kw):
        s = orig_run(self, *args, **kw)
        summaries.append({**s, "tick_cpu_ms": (np.asarray(self.tick_cpu_s) * 1e3).tolist()})
        return s

    recorder.Recorder.run = run_and_keep
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench"
        w0, c0 = time.perf_counter(), time.process_time()
        rc = record.main(
            [
                "--task",
                "cup",
                "--out",
                str(data),
                "--operator",
                "bench",
                "--sim",
                "--input",
                "scripted",
                "--episodes",
                str(a.episodes),
                "--duration",
                "120",
                "--set",
                f"max_frame_age={a.max_age}",
                "--set",
                f"max_skew={a.max_skew}",
            ]
        )
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if rc != 0:
            return rc
        ds = EpisodeDataset(data)
        lat = {"wrist": [], "scene": [], "tcp_pose": []}
        skew, frames = [], 0
        for i in range(len(ds)):
            m, v = ds.metadata(i), ds.vectors(i)
            t = np.asarray(v["timestamps"], np.float64)  # the tick time each frame was recorded at
            for k in lat:
                lat[k] += (t - np.asarray(m["capture_times"][k])).tolist()
            skew += m["camera_skew_s"]
            frames += len(t)
    s = summaries[-1]
    ms = {k: np.asarray(v) * 1e3 for k, v in lat.items()}
    sk = np.asarray(skew) * 1e3

    def pct(x) -> dict:
        return {
            "p50": float(np.percentile(x, 50)),
            "p99": float(np.percentile(x, 99)),
            "max": float(np.max(x)),
        }

    tick = np.asarray(s["tick_cpu_ms"])
    res = {
        "benchmark": "devices",
        "machine": machine_info(),
        "episodes": len(ds),
        "frames": frames,
        "cameras": "wrist + scene, twin renders 120x160 at 30 fps (render on change), state stream 125 Hz",
        "latency_ms": {k: pct(v) for k, v in ms.items()},
        "skew_ms": pct(sk),
        "fraction_within_defaults": {
            "age_100ms": float(np.mean(np.maximum(ms["wrist"], ms["scene"]) <= 100)),
            "skew_50ms": float(np.mean(sk <= 50)),
        },
        "recorder_frame_cpu_ms": pct(np.asarray(add_cpu) * 1e3),
        "tick_process_cpu_ms_incl_twin_physics": pct(tick),
        "overruns": s["overruns"],
        "discarded_episodes": s["discarded"],
        "process_cpu_s": cpu,
        "wall_s": wall,
        "cpu_cores_used": cpu / wall,
        "limits_used": {"max_frame_age": a.max_age, "max_skew": a.max_skew},
        "load_average": os.getloadavg()[0],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "devices.json").write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for k, v in ms.items():
        ax[0].hist(
            v, bins=40, alpha=0.6, label=f"{k} p50 {np.median(v):.0f} / p99 {np.percentile(v, 99):.0f} ms"
        )
    ax[0].axvline(100, color="k", ls="--", lw=1)
    ax[0].set(title="age of each stream at the tick (ms)", xlabel="ms")
    ax[0].legend(fontsize=7)
    ax[1].hist(sk, bins=40, color="C3")
    ax[1].axvline(50, color="k", ls="--", lw=1)
    ax[1].set(
        title=f"skew between streams: p50 {np.median(sk):.0f}, p99 {np.percentile(sk, 99):.0f} ms",
        xlabel="ms",
    )
    ax[2].hist(np.asarray(add_cpu) * 1e3, bins=40, color="C2", alpha=0.7, label="recorder (resize + writer)")
    ax[2].hist(tick, bins=40, color="C4", alpha=0.5, label="whole tick incl. twin physics")
    ax[2].axvline(100, color="k", ls="--", lw=1)
    ax[2].set(title="CPU per 10 Hz frame (ms)", xlabel="ms")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"carp-record --sim, {frames} frames, load average {res['load_average']:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out / "devices.png", dpi=110)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

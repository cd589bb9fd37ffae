#!/usr/bin/env bash
# Runs the real LeRobot 0.6.1 on a dataset carp_policy.dataset wrote, and our code on what LeRobot
# leaves behind. Not run by CI: LeRobot needs Python 3.12 and its own torch (a ~5.5 GB side venv).
#   scripts/check_lerobot.sh        # build the side venv if needed, then run every check
# Env: LEROBOT_VENV (default /work/lerobot06-venv), PYTHON312 (a Python 3.12 to build it with,
#      default pyenv's), CARP_PYTHON (the project's Python, default .venv/bin/python),
#      DATA_DIR (scratch, default /tmp/carp-lerobot06; wiped first).
# What it checks, in order (docs/datasets.md lists the results):
#   1. we write 4 episodes (2 cameras, environment state, epoch-sized capture times, success
#      True/False/True/unknown); LeRobot loads them: rows bit-identical, int64 capture times exact,
#      frames as our reader decodes them, delta_timestamps windows padded as expected
#   2. LeRobot resume() appends 2 episodes (AV1, its default), finalize(), loads again;
#      lerobot-dataset-viz --save writes a recording of one of each (if rerun-sdk is installed)
#   3. our reader, validator and writer on the result: LeRobot's episodes are "unknown", ours keep
#      their flags; our writer appends an episode; validate --clean; LeRobot loads it again and
#      trains ACT two steps on it (if lerobot[training] is installed)
#   4. lerobot-edit-dataset delete_episodes / split / merge / recompute_stats; LeRobot loads each
#   5. our reader and validator on each edit (flags unknown: LeRobot drops our sidecar),
#      carp-dataset restore-meta brings them back by data match, our writer appends, LeRobot loads
#   6. resume() with the encoder info.json records (H.264 4:4:4) keeps the dataset one codec, and
#      the default merge (concatenated videos) then works
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LV=${LEROBOT_VENV:-/work/lerobot06-venv}
CARP_PY=${CARP_PYTHON:-$ROOT/.venv/bin/python}
DATA=${DATA_DIR:-/tmp/carp-lerobot06}
REPO=local/carp-check

if [ ! -x "$LV/bin/lerobot-edit-dataset" ]; then
  PY312=${PYTHON312:-$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python 2>/dev/null | tail -1)}
  [ -x "$PY312" ] || { echo "check_lerobot: need a Python 3.12 (set PYTHON312)"; exit 2; }
  echo "[check_lerobot] building $LV with $PY312 (lerobot[dataset]==0.6.1, ~5.5 GB, a few minutes)"
  "$PY312" -m venv "$LV"
  "$LV/bin/python" -m pip install -q --upgrade pip
  "$LV/bin/python" -m pip install -q 'lerobot[dataset]==0.6.1'
fi
# torchcodec needs FFmpeg's shared libraries under their plain sonames (libavutil.so.59, ...);
# PyAV's wheel carries them as av.libs/libavutil-<hash>.so.59.x.y, so link the plain names to those.
AVLIBS=$("$LV/bin/python" -c "import av, os; print(os.path.realpath(os.path.join(os.path.dirname(av.__file__), '..', 'av.libs')))")
FF="$LV/ffmpeg-libs"
mkdir -p "$FF"
for f in "$AVLIBS"/lib*.so*; do
  b=$(basename "$f")
  plain=$(echo "$b" | sed -E 's/^(lib[A-Za-z0-9_+]+)-[0-9a-f]{8}\.so\.([0-9]+).*/\1.so.\2/')
  [ "$plain" != "$b" ] && ln -sf "$f" "$FF/$plain"
done
lerobot() { LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}" HF_HUB_OFFLINE=1 HF_LEROBOT_HOME="$DATA/hf" \
  OMP_NUM_THREADS=1 "$LV/bin/python" "$@"; }
edit() { LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}" HF_HUB_OFFLINE=1 HF_LEROBOT_HOME="$DATA/hf" \
  OMP_NUM_THREADS=1 "$LV/bin/lerobot-edit-dataset" "$@" > "$DATA/edit.log" 2>&1 || { tail -30 "$DATA/edit.log"; exit 1; }; }
carp() { OMP_NUM_THREADS=1 "$CARP_PY" "$@"; }
"$LV/bin/python" -c "import lerobot, av, torch; print('[check_lerobot] lerobot', lerobot.__version__, 'PyAV', av.__version__, 'torch', torch.__version__)"
rm -rf "$DATA" && mkdir -p "$DATA"
D="$DATA/ours"

echo "[check_lerobot] 1. carp_policy.dataset writes $D"
carp - "$D" <<'PYEOF'
import sys
import numpy as np
from carp_policy.actions import ACTION_NAMES, STATE_NAMES
from carp_policy.dataset import DatasetWriter, EpisodeDataset
from carp_policy.dataset.format import ENV_STATE_KEY
from carp_policy.dataset.reader import KeyMap

root = sys.argv[1]
rng = np.random.default_rng(0)
T0 = 1_800_000_000_123_456_789  # an epoch-sized clock (2027), in ns: float32 would keep ~2 minutes
with DatasetWriter(root, fps=10.0, cameras={"wrist": (48, 64), "scene": (48, 64)}, state_names=STATE_NAMES,
                   action_names=ACTION_NAMES, env_state_names=["obj_x", "obj_y"]) as w:
    for ep, (task, ok) in enumerate(zip(["pick up the cup", "put the cup in the bowl", "pick up the cup",
                                         "pick up the cup"], [True, False, True, None])):
        w.begin_episode(task=task)
        for t in range(12 + 3 * ep):
            img = np.zeros((48, 64, 3), np.uint8)
            img[..., 0] = 10 * t % 255
            img[5 + t : 20 + t, 10:30] = (200, 50, 30)
            tn = T0 + ep * 10**10 + t * 100_000_001  # odd nanoseconds on purpose
            w.add_frame(None, {"wrist": img, "scene": img[:, ::-1].copy()}, rng.normal(size=10), rng.normal(size=10),
                        env_state=rng.normal(size=2), timestamp_ns=tn,
                        stamps_ns={"state": tn - 1_000_003, "wrist": tn - 33_000_007, "scene": tn - 30_000_011,
                                   "env_state": tn - 1_000_003})
        w.save_episode(success=ok, metadata={"operator": "check", "ep": ep})
ds = EpisodeDataset(root, keymap=KeyMap(env_state_key=ENV_STATE_KEY))
eps = [ds.episode(i) for i in range(len(ds))]
np.savez(root + "/../expected.npz", state=np.concatenate([e.state[:, :10] for e in eps]),
         action=np.concatenate([e.action for e in eps]), time_ns=np.concatenate([e.time_ns for e in eps]),
         wrist_ns=np.concatenate([e.stamps_ns["wrist"] for e in eps]),
         wrist=np.concatenate([e.images["wrist"] for e in eps]), scene=np.concatenate([e.images["scene"] for e in eps]))
print("written", len(ds), "episodes,", ds.num_frames, "frames; success", [e.success for e in eps])
PYEOF

echo "[check_lerobot] 1. LeRobot loads it; 2. resume() appends 2 episodes"
lerobot - "$D" "$REPO" <<'PYEOF'
import sys
import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, repo = sys.argv[1:]
exp = np.load(root + "/../expected.npz")
ds = LeRobotDataset(repo, root=root)
print("  loaded: episodes", ds.num_episodes, "frames", ds.num_frames, "fps", ds.fps)
items = [ds[i] for i in range(len(ds))]
st = np.stack([it["observation.state"].numpy() for it in items])
assert np.array_equal(st, exp["state"]), "state differs"
assert np.array_equal(np.stack([it["action"].numpy() for it in items]), exp["action"]), "action differs"
tn = np.array([int(it["capture_time_ns"]) for it in items])
assert items[0]["capture_time_ns"].dtype == torch.int64 and np.array_equal(tn, exp["time_ns"]), "capture_time_ns"
wn = np.array([int(it["capture_time_ns.wrist"]) for it in items])
assert np.array_equal(wn, exp["wrist_ns"]), "per-stream capture time differs"
diffs = {}
for cam in ("wrist", "scene"):
    imgs = np.stack([(it[f"observation.images.{cam}"].permute(1, 2, 0).numpy() * 255).round() for it in items])
    diffs[cam] = float(np.abs(imgs - exp[cam].astype(np.float64)).max())
print(f"  {len(items)} rows: state/action bit-identical, capture_time_ns int64 exact (e.g. {tn[0]}); "
      f"max |frame - our reader's frame| (0-255): {diffs}")
assert max(diffs.values()) <= 2.0, diffs
dt = {"action": [i / 10 for i in range(16)], "observation.images.wrist": [-0.1, 0.0], "observation.state": [-0.1, 0.0]}
ds2 = LeRobotDataset(repo, root=root, delta_timestamps=dt)
item = ds2[11]  # last frame of episode 0 (12 frames)
assert np.allclose(item["action"][0].numpy(), exp["action"][11]) and item["action_is_pad"][1:].all()
assert not item["observation.state_is_pad"].any() and item["observation.images.wrist"].shape == (2, 3, 48, 64)
print("  delta_timestamps: action (16, 10) padded after the episode end:", item["action_is_pad"].int().tolist())

r = LeRobotDataset.resume(repo, root=root)
rng = np.random.default_rng(1)
for e in range(2):
    for t in range(6):
        tn = 1_900_000_000_000_000_000 + e * 10**10 + t * 100_000_003
        img = np.full((48, 64, 3), 40 * t, np.uint8)
        r.add_frame({"observation.state": rng.normal(size=10).astype(np.float32),
                     "action": rng.normal(size=10).astype(np.float32),
                     "observation.environment_state": rng.normal(size=2).astype(np.float32),
                     "observation.images.wrist": img, "observation.images.scene": img,
                     "capture_time_ns": np.array([tn]),
                     **{f"capture_time_ns.{k}": np.array([tn - 5]) for k in ("state", "wrist", "scene", "env_state")},
                     "task": "appended by lerobot"})
    r.save_episode()
r.finalize()
d3 = LeRobotDataset(repo, root=root)
last = d3[len(d3) - 1]
assert d3.num_episodes == 6 and int(last["capture_time_ns"]) == 1_900_000_000_000_000_000 + 10**10 + 5 * 100_000_003
print("  after resume() + 2 episodes + finalize(): LeRobot loads", d3.num_episodes, "episodes,", d3.num_frames, "frames")
PYEOF
ls "$D/meta/episodes/chunk-000" | sed 's/^/    meta\/episodes\/chunk-000\//'

if "$LV/bin/python" -c "import rerun" 2>/dev/null; then  # optional: pip install 'rerun-sdk<0.34' into $LV
  LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}" HF_HUB_OFFLINE=1 HF_LEROBOT_HOME="$DATA/hf" \
    "$LV/bin/lerobot-dataset-viz" --repo-id "$REPO" --root "$D" --episode-index 4 --save 1 \
    --output-dir "$DATA/viz" --num-workers 0 > "$DATA/viz.log" 2>&1 || { tail -20 "$DATA/viz.log"; exit 1; }
  echo "  lerobot-dataset-viz wrote $(ls "$DATA/viz") ($(du -k "$DATA/viz"/*.rrd | cut -f1) KiB) for an AV1 episode"
  LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}" HF_HUB_OFFLINE=1 HF_LEROBOT_HOME="$DATA/hf" \
    "$LV/bin/lerobot-dataset-viz" --repo-id "$REPO" --root "$D" --episode-index 0 --save 1 \
    --output-dir "$DATA/viz0" --num-workers 0 > "$DATA/viz.log" 2>&1 || { tail -20 "$DATA/viz.log"; exit 1; }
  echo "  lerobot-dataset-viz wrote $(ls "$DATA/viz0") ($(du -k "$DATA/viz0"/*.rrd | cut -f1) KiB) for one of ours (H.264 4:4:4)"
else
  echo "  (lerobot-dataset-viz skipped: rerun-sdk is not installed in $LV)"
fi

echo "[check_lerobot] 3. our reader, validator and writer on LeRobot's append"
carp - "$D" <<'PYEOF'
import sys
import numpy as np
from carp_policy.dataset import DatasetWriter, EpisodeDataset, validate_dataset

root = sys.argv[1]
ds = EpisodeDataset(root)
succ = [ds.success(i) for i in range(len(ds))]
assert succ == [True, False, True, None, None, None], succ
ep = ds.episode(5)
assert ep.time_ns[-1] == 1_900_000_000_000_000_000 + 10**10 + 5 * 100_000_003 and ep.images["wrist"].shape == (6, 48, 64, 3)
rep = validate_dataset(root)
assert rep.ok, rep.errors
print(f"  reader: {len(ds)} episodes, success {succ}; validate: OK, {rep.files_checked} files, warnings {rep.warnings}")
with DatasetWriter.open(root) as w:
    w.begin_episode("appended by carp after lerobot")
    for t in range(7):
        img = np.full((48, 64, 3), 30 * t, np.uint8)
        w.add_frame(2_000_000_000.0 + 0.1 * t, {"wrist": img, "scene": img}, np.zeros(10), np.ones(10),
                    env_state=np.zeros(2))
    i = w.save_episode(success=False, metadata={"operator": "check"})
rep = validate_dataset(root)
assert rep.ok and i == 6, rep.errors
print(f"  our writer appended episode {i}; validate: OK")
PYEOF
carp -m carp_policy.dataset.cli validate --clean "$D" | sed 's/^/  /'

lerobot - "$D" "$REPO" <<'PYEOF'
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
root, repo = sys.argv[1:]
ds = LeRobotDataset(repo, root=root)
assert ds.num_episodes == 7
it = ds[len(ds) - 1]
assert it["task"] == "appended by carp after lerobot" and abs(float(it["observation.images.wrist"].mean()) - 180 / 255) < 0.02
print("  LeRobot loads it after our append:", ds.num_episodes, "episodes,", ds.num_frames, "frames")
PYEOF

if "$LV/bin/python" -c "import accelerate" 2>/dev/null; then  # optional: lerobot[training]==0.6.1 in $LV
  LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}" HF_HUB_OFFLINE=1 HF_LEROBOT_HOME="$DATA/hf" OMP_NUM_THREADS=1 \
    "$LV/bin/lerobot-train" --dataset.repo_id "$REPO" --dataset.root "$D" --policy.type act \
    --policy.device cpu --policy.pretrained_backbone_weights null --policy.push_to_hub false --steps 2 \
    --batch_size 2 --num_workers 0 --save_checkpoint false --log_freq 1 --output_dir "$DATA/act" \
    --wandb.enable false > "$DATA/act.log" 2>&1 || { tail -20 "$DATA/act.log"; exit 1; }
  echo "  lerobot-train ACT on it (H.264 + AV1 episodes):" \
    "$(grep -o 'step:2 .* l1_loss:[0-9.]*' "$DATA/act.log" | sed -E 's/ (grdn|lr|updt_s|data_s|smp\/s):[^ ]*//g')"
else
  echo "  (lerobot-train skipped: lerobot[training] is not installed in $LV)"
fi

echo "[check_lerobot] 4. lerobot-edit-dataset on it"
edit --repo_id "$REPO" --root "$D" --new_repo_id local/del --new_root "$DATA/del" \
  --operation.type delete_episodes --operation.episode_indices "[1, 4]"
edit --repo_id "$REPO" --root "$D" --new_root "$DATA/split" \
  --operation.type split --operation.splits '{"a": [0, 1], "b": [2, 3], "c": [4, 5, 6]}'
# a and b hold only our H.264 files: the default merge concatenates them into shared MP4s
edit --new_repo_id local/merged --new_root "$DATA/merged" --operation.type merge \
  --operation.repo_ids "['local/a', 'local/b']" --operation.roots "['$DATA/split/a', '$DATA/split/b']"
# c holds resume()'s AV1 files beside ours: LeRobot cannot concatenate different codecs, so keep files
edit --new_repo_id local/mixed --new_root "$DATA/mixed" --operation.type merge \
  --operation.repo_ids "['local/a', 'local/c']" --operation.roots "['$DATA/split/a', '$DATA/split/c']" \
  --operation.concatenate_videos false
edit --repo_id "$REPO" --root "$D" --new_repo_id local/restat --new_root "$DATA/restat" \
  --operation.type recompute_stats --operation.skip_image_video false
lerobot - "$DATA" <<'PYEOF'
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
base = sys.argv[1]
for name in ("del", "split/a", "split/b", "split/c", "merged", "mixed", "restat"):
    ds = LeRobotDataset(f"local/{name.replace('/', '_')}", root=f"{base}/{name}")
    it = ds[len(ds) - 1]
    print(f"  LeRobot loads {name}: {ds.num_episodes} episodes, {ds.num_frames} frames, last task {it['task']!r}")
PYEOF

echo "[check_lerobot] 5. our reader, validator, restore-meta and writer on each edit"
carp - "$DATA" <<'PYEOF'
import subprocess, sys
import numpy as np
from carp_policy.dataset import DatasetWriter, EpisodeDataset, validate_dataset

base = sys.argv[1]
orig = EpisodeDataset(f"{base}/ours", cameras=[])
truth = [orig.success(i) for i in range(len(orig))]  # [T, F, T, None, None, None, F]
kept = {"del": [0, 2, 3, 5, 6], "split/a": [0, 1], "split/b": [2, 3], "split/c": [4, 5, 6],
        "merged": [0, 1, 2, 3], "mixed": [0, 1, 4, 5, 6], "restat": list(range(7))}
for name, src_idx in kept.items():
    root = f"{base}/{name}"
    ds = EpisodeDataset(root)
    for i, j in enumerate(src_idx):  # the same episodes, renumbered
        np.testing.assert_array_equal(ds.vectors(i)["state"], orig.vectors(j)["state"])
        np.testing.assert_array_equal(ds.vectors(i)["time_ns"], orig.vectors(j)["time_ns"])
    before = [ds.success(i) for i in range(len(ds))]
    rep = validate_dataset(root)
    assert rep.ok, (name, rep.errors)
    subprocess.run([sys.executable, "-m", "carp_policy.dataset.cli", "restore-meta", root, f"{base}/ours"],
                   capture_output=True, text=True, check=True)
    ds = EpisodeDataset(root, cameras=[])
    after = [ds.success(i) for i in range(len(ds))]
    assert after == [truth[j] for j in src_idx], (name, after)
    assert all(ds.metadata(i).get("operator") == "check" for i in range(len(ds)) if after[i] is not None)
    with DatasetWriter.open(root) as w:
        w.begin_episode("appended by carp after an edit")
        for t in range(5):
            img = np.full((48, 64, 3), 50 * t, np.uint8)
            w.add_frame(2_100_000_000.0 + 0.1 * t, {"wrist": img, "scene": img}, np.zeros(10), np.ones(10),
                        env_state=np.zeros(2))
        w.save_episode(success=True)
    rep = validate_dataset(root)
    assert rep.ok, (name, rep.errors)
    print(f"  {name}: reader OK ({len(src_idx)} episodes, data identical to the originals), validate OK; "
          f"success before restore-meta {before}, after {after}; our writer appended one, validate OK")
PYEOF
lerobot - "$DATA" <<'PYEOF'
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
base = sys.argv[1]
for name, n in (("del", 6), ("split/a", 3), ("split/b", 3), ("split/c", 4), ("merged", 5), ("mixed", 6),
                ("restat", 8)):
    ds = LeRobotDataset(f"local/{name.replace('/', '_')}", root=f"{base}/{name}")
    it = ds[len(ds) - 1]
    assert ds.num_episodes == n and it["task"] == "appended by carp after an edit", (name, ds.num_episodes)
    print(f"  LeRobot loads {name} after our append: {ds.num_episodes} episodes")
PYEOF
echo "[check_lerobot] 6. resume() with the encoder info.json records keeps one codec: the default merge works"
lerobot - "$DATA" <<'PYEOF'
import glob, sys
import av
import numpy as np
from lerobot.configs.video import encoder_config_from_video_info
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

root = sys.argv[1] + "/split/a"
meta = LeRobotDatasetMetadata("local/a", root=root)
enc = encoder_config_from_video_info(meta.features["observation.images.wrist"]["info"])
r = LeRobotDataset.resume("local/a", root=root, rgb_encoder=enc)
for t in range(6):
    tn, img = 1_950_000_000_000_000_000 + t, np.full((48, 64, 3), 40 * t, np.uint8)
    r.add_frame({"observation.state": np.zeros(10, np.float32), "action": np.zeros(10, np.float32),
                 "observation.environment_state": np.zeros(2, np.float32),
                 "observation.images.wrist": img, "observation.images.scene": img, "capture_time_ns": np.array([tn]),
                 **{f"capture_time_ns.{k}": np.array([tn]) for k in ("state", "wrist", "scene", "env_state")},
                 "task": "appended by lerobot with our encoder"})
r.save_episode()
r.finalize()
codecs = set()
for f in glob.glob(root + "/videos/*/*/*.mp4"):
    with av.open(f) as c:
        codecs.add((c.streams.video[0].codec_context.name, c.streams.video[0].pix_fmt))
assert codecs == {("h264", "yuv444p")}, codecs
print(f"  resume(rgb_encoder=encoder_config_from_video_info(...)) wrote {enc.vcodec} {enc.pix_fmt}: every file {codecs}")
PYEOF
edit --new_repo_id local/merged2 --new_root "$DATA/merged2" --operation.type merge \
  --operation.repo_ids "['local/a', 'local/b']" --operation.roots "['$DATA/split/a', '$DATA/split/b']"
lerobot - "$DATA/merged2" <<'PYEOF'
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
ds = LeRobotDataset("local/merged2", root=sys.argv[1])
assert ds.num_episodes == 7, ds.num_episodes
print("  default merge of it with b (videos concatenated): LeRobot loads", ds.num_episodes, "episodes,", ds.num_frames, "frames")
PYEOF
carp -m carp_policy.dataset.cli validate "$DATA/merged2" | sed 's/^/  /'
echo "LEROBOT_OK"

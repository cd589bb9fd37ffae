#!/usr/bin/env bash
# Checks that a dataset written by carp_policy.dataset loads in LeRobot's own LeRobotDataset.
# Not run by CI: it builds a side venv (~2.3 GB, a few minutes) because lerobot pins its own torch.
#   scripts/check_lerobot.sh            # build the side venv if needed, write a dataset, load it
# Env: LEROBOT_VENV (default /tmp/lerobot-venv), TORCH_WHEEL (local torch 2.13.0 CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LV=${LEROBOT_VENV:-/tmp/lerobot-venv}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
PY=${PYTHON:-python3.11}
DATA=${DATA_DIR:-/tmp/carp-lerobot-check}

if [ ! -f "$LV/.ready" ]; then
  echo "[check_lerobot] building side venv in $LV"
  "$PY" -m venv "$LV"
  pip() { "$LV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
  pip install "$TORCH_WHEEL"
  pip install --no-deps "lerobot==0.4.4"
  # lerobot's own requirements, minus the torch stack it would pull from the index.
  "$LV/bin/python" - > /tmp/lerobot-reqs.txt <<'PYEOF'
from importlib.metadata import requires
skip = ("torch", "torchvision", "torchcodec")
for r in requires("lerobot") or []:
    if "extra ==" in r:
        continue
    name = r.split(";")[0].strip()
    base = name.replace(">", " ").replace("<", " ").replace("=", " ").replace("!", " ").replace("~", " ").replace("[", " ").split()[0]
    if base.lower() not in skip:
        print(name)
PYEOF
  pip install -r /tmp/lerobot-reqs.txt
  pip install --no-deps "torchvision==0.28.0" "torchcodec==0.13.0"
  touch "$LV/.ready"
fi

echo "[check_lerobot] writing a small dataset with carp_policy.dataset into $DATA"
rm -rf "$DATA"
"$ROOT/.venv/bin/python" - "$DATA" <<'PYEOF'
import sys
import numpy as np
from carp_policy.actions import ACTION_NAMES, STATE_NAMES
from carp_policy.dataset import DatasetWriter

root = sys.argv[1]
rng = np.random.default_rng(0)
with DatasetWriter(root, fps=10.0, cameras={"wrist": (96, 128), "scene": (96, 128)},
                   state_names=STATE_NAMES, action_names=ACTION_NAMES, robot_type="ur5e") as w:
    for ep, task in enumerate(["pick up the cup", "put the cup in the bowl", "pick up the cup"]):
        w.begin_episode(task=task)
        for t in range(20 + 5 * ep):
            img = np.zeros((96, 128, 3), np.uint8)
            img[..., 0] = 10 * t % 255
            img[10 + t : 30 + t, 20:60] = (200, 50, 30)
            w.add_frame(0.1 * t, {"wrist": img, "scene": img[:, ::-1].copy()},
                        rng.normal(size=10).astype(np.float32), rng.normal(size=10).astype(np.float32))
        w.save_episode(success=True, metadata={"operator": "check"})
print("written", root)
# what our own reader sees, for the comparison on the LeRobot side
from carp_policy.dataset import EpisodeDataset
ds = EpisodeDataset(root)
eps = [ds.episode(i) for i in range(len(ds))]
np.savez(root + "/../carp-expected.npz", state=np.concatenate([e.state for e in eps]),
         action=np.concatenate([e.action for e in eps]),
         wrist=np.concatenate([e.images["wrist"] for e in eps]), scene=np.concatenate([e.images["scene"] for e in eps]))
PYEOF

echo "[check_lerobot] loading it with lerobot's LeRobotDataset"
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
export LD_LIBRARY_PATH="$FF:$AVLIBS:${LD_LIBRARY_PATH:-}"
HF_HUB_OFFLINE=1 "$LV/bin/python" - "$DATA" <<'PYEOF'
import sys, types
# torchvision 0.28 with this torch build: registering its meta kernels fails ("torchvision::nms does
# not exist"); an empty module in its place is harmless for data loading.
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root = sys.argv[1]
ds = LeRobotDataset("local/carp-check", root=root, video_backend="torchcodec")
print("episodes", ds.num_episodes, "frames", ds.num_frames, "fps", ds.fps)
print("features", sorted(ds.features))
for i in (0, len(ds) - 1):
    item = ds[i]
    shapes = {k: tuple(v.shape) for k, v in item.items() if hasattr(v, "shape")}
    print("item", i, "task", repr(item["task"]), shapes)
    img = item["observation.images.wrist"]
    print("  wrist dtype", img.dtype, "range", float(img.min()), float(img.max()))
print("meta.stats keys", sorted(ds.meta.stats))
import numpy as np
exp = np.load(root + "/../carp-expected.npz")
st = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
assert np.array_equal(st, exp["state"]), "state differs"
diffs = {}
for cam in ("wrist", "scene"):
    imgs = np.stack([(ds[i][f"observation.images.{cam}"].permute(1, 2, 0).numpy() * 255).round() for i in range(len(ds))])
    diffs[cam] = float(np.abs(imgs - exp[cam].astype(np.float64)).max())
print("every frame: state identical to carp reader; max image difference (0-255):", diffs)
assert max(diffs.values()) <= 2.0, diffs
# how LeRobot policies read it: an action chunk of 16 and two observation steps, padded at the ends
ds2 = LeRobotDataset("local/carp-check", root=root, video_backend="torchcodec",
                     delta_timestamps={"action": [i / 10 for i in range(16)],
                                       "observation.images.wrist": [-0.1, 0.0], "observation.state": [-0.1, 0.0]})
item = ds2[19]  # last frame of episode 0 (20 frames)
print("delta_timestamps item:", {k: tuple(v.shape) for k, v in item.items() if hasattr(v, "shape") and v.ndim > 0})
print("action_is_pad:", item["action_is_pad"].int().tolist())
assert np.allclose(item["action"][0].numpy(), exp["action"][19]) and item["action_is_pad"][1:].all()
print("LEROBOT_OK")
PYEOF

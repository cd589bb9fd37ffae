#!/usr/bin/env bash
# The main job: the cup task in the MuJoCo twin with the released model, 20 trials.
# Prints the success rate (Wilson 95% interval) and the policy latency; writes results.json,
# summary.png and rollout MP4s to $OUT. Override with MODEL=..., TRIALS=..., SEED=..., OUT=...
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL=${MUJOCO_GL:-egl}
MODEL=${MODEL:-models/cup}
TRIALS=${TRIALS:-20}
SEED=${SEED:-10000}
OUT=${OUT:-out/demo}
if [ -f "$MODEL/manifest.json" ]; then
  exec .venv/bin/carp-eval --task cup --policy "$MODEL" --trials "$TRIALS" --seed "$SEED" --out "$OUT"
fi
echo "[demo] no released model at $MODEL: evaluating the scripted expert through the same protocol instead"
exec .venv/bin/carp-eval --task cup --policy expert --trials "$TRIALS" --seed "$SEED" --out "$OUT"

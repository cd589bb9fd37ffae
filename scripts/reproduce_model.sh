#!/usr/bin/env bash
# Reproduce a released twin model end to end: collect -> train -> export -> 3 x 20-trial evaluations.
#
#   scripts/reproduce_model.sh TASK CONFIG NAME [carp-train arguments...]
#   scripts/reproduce_model.sh cup state_env cup_state_env --device cpu --policy-steps 3000
#
# Each step is skipped when its result is already there (the dataset, a finished runs/NAME), so the
# script can be re-run after an interruption. VARIETY=wide records the varied expert demonstrations
# (carp-sim collect --expert-variety wide) into data/TASK_wide instead of data/TASK; DATA=DIR names
# another dataset; EPISODES=N collects N demonstrations (default 50, seeds 0..N-1). It writes DEST (default models/NAME: ONNX + manifest),
# copies the training record to DEST/training/ and the evaluations (seeds 10000, 20000, 30000: never
# data seeds) to DEST/eval/; EVAL_ARGS adds carp-eval arguments (e.g. "--sim-latency-ms 34"). The model
# card (MODEL_CARD.md) is written by hand from those.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
TASK=$1 CONFIG=$2 NAME=$3
shift 3
DEST=${DEST:-models/$NAME}
VARIETY=${VARIETY:-task}
if [ "$VARIETY" = task ]; then DATA=${DATA:-data/$TASK}; else DATA=${DATA:-data/${TASK}_$VARIETY}; fi
BIN=.venv/bin
export MUJOCO_GL=${MUJOCO_GL:-egl}
[ -x "$BIN/carp-train" ] || bash scripts/bootstrap.sh

if [ ! -f "$DATA/meta/info.json" ]; then
  "$BIN/carp-sim" collect --task "$TASK" --episodes "${EPISODES:-50}" --out "$DATA" --seed 0 --expert-variety "$VARIETY"
fi
if [ ! -f "runs/$NAME/policy_report.json" ]; then
  # the task goes into the run config and the manifest: carp-eval refuses a model made for another
  "$BIN/carp-train" --config "$CONFIG" --dataset "$DATA" --out "runs/$NAME" --set "task=$TASK" "$@"
fi
"$BIN/carp-export" --run "runs/$NAME" --out "$DEST"

mkdir -p "$DEST/training" "$DEST/eval"
for f in config.yaml normalization.json tokenizer_report.json policy_report.json loss_tokenizer.csv \
  loss_policy.csv loss_curves.png; do
  if [ -f "runs/$NAME/$f" ]; then cp "runs/$NAME/$f" "$DEST/training/"; fi
done
for seed in 10000 20000 30000; do
  out="out/eval/$NAME/seed$seed"
  # shellcheck disable=SC2086 # EVAL_ARGS is a list of arguments
  "$BIN/carp-eval" --task "$TASK" --policy "$DEST" --trials 20 --seed "$seed" --out "$out" ${EVAL_ARGS:-}
  cp "$out/results.json" "$DEST/eval/seed$seed.json"
  cp "$out/summary.png" "$DEST/eval/seed$seed.png"
done
"$BIN/python" - "$DEST/eval" <<'EOF'
import json, sys
from pathlib import Path
from carp_bringup.evaluate import wilson_interval
runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("seed*.json"))]
k, n = sum(r["successes"] for r in runs), sum(r["trials"] for r in runs)
lo, hi = wilson_interval(k, n)
rates = ", ".join(f"{r['successes']}/{r['trials']}" for r in runs)
print(f"{runs[0]['task']}: {k}/{n} over {len(runs)} seeds ({rates}); {100 * k / n:.0f}%, "
      f"Wilson 95% CI {100 * lo:.0f}-{100 * hi:.0f}%")
EOF

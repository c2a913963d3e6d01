#!/usr/bin/env bash
# Set everything up and run the main job: GRPO with none / r2 / r3 / pr2 routing replay on the
# same seed and data (tiny CPU config, torchrun with 2 ranks, EP=2), then a markdown table and
# PNG plots in runs/compare/ (summary.md, summary.json, comparison.png).
#   bash launch/compare.sh                              # defaults (about 6-8 min on 2 cores)
#   bash launch/compare.sh steps=10 replay.off_n=8      # key=value overrides for every mode
#   MODES=none,pr2 OUT=runs/cmp2 bash launch/compare.sh
#   DRY_RUN=1 bash launch/compare.sh                    # print the command, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/tiny.yaml}
OUT=${OUT:-runs/compare}
MODES=${MODES:-none,r2,r3,pr2}
NPROC=${NPROC:-2}
cmd=("$PYTHON" -m pr2_megatron.rl.compare --config "$CONFIG" --out "$OUT" --modes "$MODES"
  --nproc "$NPROC" "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  echo "${cmd[@]}"
  exit 0
fi
PR2_EXTRAS=${PR2_EXTRAS:-test,plots} bash launch/setup.sh
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
"${cmd[@]}"

#!/usr/bin/env bash
# Set everything up and run the tiny CPU PR2 demo with torchrun (default: 2 ranks, EP=2).
#   bash launch/demo.sh                       # defaults
#   NPROC=1 bash launch/demo.sh --cycles 4    # extra arguments go to pr2_megatron.examples.minimal_loop
#   DRY_RUN=1 bash launch/demo.sh             # print the command, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
MASTER_PORT=${MASTER_PORT:-29517}
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC"
     --master-port "$MASTER_PORT" -m pr2_megatron.examples.minimal_loop "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "${cmd[@]}"
  exit 0
fi
bash launch/setup.sh
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
"${cmd[@]}"

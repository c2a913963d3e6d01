#!/usr/bin/env bash
# Run pr2-train on this machine with torchrun (default: 2 CPU ranks, configs/tiny.yaml).
#   bash launch/train.sh                                    # defaults
#   bash launch/train.sh steps=5 replay.mode=r3             # arguments are key=value overrides
#   NPROC=1 CONFIG=configs/tiny.yaml bash launch/train.sh parallel.expert_model_parallel_size=1
#   DRY_RUN=1 bash launch/train.sh steps=5                  # print the command, run nothing
# Environment (default in brackets): NPROC ranks [2], CONFIG [configs/tiny.yaml], PYTHON
# [python3], TRAIN_MODULE [pr2_megatron.rl.train], DRY_RUN []. Install first: bash launch/setup.sh.
#
# Stopping cleanly: `kill -USR1 <pid of this script>` (or -TERM) is passed on to every rank, which
# finishes its step, checkpoints (checkpoint.dir=...) and exits 0; a later run with the same
# checkpoint.dir resumes. (The ranks run in their own sessions, so a signal to torchrun's process
# group does not reach them; torchrun itself would die of SIGUSR1.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
CONFIG=${CONFIG:-configs/tiny.yaml}
TRAIN_MODULE=${TRAIN_MODULE:-pr2_megatron.rl.train}
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC"
  -m "$TRAIN_MODULE" --config "$CONFIG" "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  line=$(printf '%q ' "${cmd[@]}")
  echo "${line% }"
  exit 0
fi
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun restarts (--max-restarts) hang in init_process_group when workers share the
# agent's rendezvous store (pytorch/pytorch#135712); a store of their own avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

# shellcheck disable=SC2317  # invoked by the traps
forward() {  # the ranks are torchrun's children
  echo "launch/train.sh: SIG$1: passing it to the ranks (checkpoint and stop)"
  local ranks
  ranks=$(pgrep -P "$torchrun_pid" || true)
  if [[ -n $ranks ]]; then
    # shellcheck disable=SC2086  # one PID per word
    kill -s "$1" $ranks 2>/dev/null || true
  fi
}
"${cmd[@]}" &
torchrun_pid=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" || true  # returns early whenever a trap runs
done
wait "$torchrun_pid"

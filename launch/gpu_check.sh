#!/usr/bin/env bash
# One GPU check of this checkout on a machine with (at least) one CUDA GPU, in under 8 minutes:
#   1. gpu-tests   the GPU-marked tests (pytest -m gpu: TE spec, NCCL, NVML, pinned caches)
#   2. train       a short pr2-train on GPU 0 (configs/tiny.yaml, 1 rank, NCCL, via launch/train.sh)
#   3. bench-router / bench-probmoe   the router benchmarks (benchmarks/*router_cost.py --quick)
# Each part has its own timeout; a summary file gets each part's status (PASS / FAIL / TIMEOUT),
# wall time and key lines, with every part's full log beside it.
#
#   bash launch/gpu_check.sh                      # summary in $OUT/ or /tmp/pr2_gpu_check.XXXX/
#   bash launch/gpu_check.sh /path/summary.md     # summary there (logs in the same directory)
#   bash launch/gpu_check.sh --dry-run            # print the parts and their commands, run nothing
#
# Without CUDA it exits 1 with one line before running anything (the dry run needs no CUDA).
# Environment [default]: PYTHON [python3], OUT [none: a fresh /tmp/pr2_gpu_check.XXXX directory],
# TIMEOUT_GPU_TESTS [140], TIMEOUT_TRAIN [140], TIMEOUT_BENCH [70] (seconds, per part; 7 min
# in all, plus at most 10 s each to kill a part that ignores SIGTERM).
# The router benchmarks are CPU benchmarks (no CUDA code path, CPU timers): they run with the GPU
# hidden (CUDA_VISIBLE_DEVICES=) so they take the tested CPU path on this machine too.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
TIMEOUT_GPU_TESTS=${TIMEOUT_GPU_TESTS:-140}
TIMEOUT_TRAIN=${TIMEOUT_TRAIN:-140}
TIMEOUT_BENCH=${TIMEOUT_BENCH:-70}

dry_run=""
summary=""
for arg in "$@"; do
  case $arg in
    --dry-run | -n) dry_run=1 ;;
    -h | --help)
      sed -n '2,18p' "$0"
      exit 0
      ;;
    -*)
      echo "launch/gpu_check.sh: unknown option $arg (try --help)" >&2
      exit 2
      ;;
    *) summary=$arg ;;
  esac
done

if [[ -n $summary ]]; then
  work=$(dirname "$summary")
elif [[ -n ${OUT:-} ]]; then
  work=$OUT
  summary=$OUT/gpu_check_summary.md
else
  work=/tmp/pr2_gpu_check.XXXX  # made below (mktemp), not in a dry run
  summary=$work/summary.md
fi

build_parts() {  # name | timeout | environment | command (run with bash -c)
  local gpu=${CUDA_VISIBLE_DEVICES:-0}
  parts=(
    "gpu-tests|$TIMEOUT_GPU_TESTS||$PYTHON -m pytest -m gpu -q -p no:cacheprovider -rs tests"
    "train|$TIMEOUT_TRAIN|NPROC=1 CUDA_VISIBLE_DEVICES=$gpu|bash launch/train.sh steps=3 warm_start.steps=10 parallel.expert_model_parallel_size=1 logging.dir=$work/train logging.tensorboard=false"
    "bench-router|$TIMEOUT_BENCH|CUDA_VISIBLE_DEVICES=|$PYTHON benchmarks/router_cost.py --quick --out $work/bench_router_cost.json"
    "bench-probmoe|$TIMEOUT_BENCH|CUDA_VISIBLE_DEVICES=|$PYTHON benchmarks/probmoe_router_cost.py --quick --out $work/bench_probmoe_router.json"
  )
}

if [[ -n $dry_run ]]; then
  build_parts
  echo "launch/gpu_check.sh --dry-run: summary $summary"
  for part in "${parts[@]}"; do
    IFS='|' read -r name limit envs cmd <<<"$part"
    echo "part $name (timeout ${limit}s): ${envs:+$envs }$cmd"
  done
  exit 0
fi

if ! device=$("$PYTHON" -c 'import torch, sys
if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
    sys.exit(1)
print(torch.cuda.get_device_name(0))' 2>/dev/null); then
  echo "launch/gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); nothing run" >&2
  exit 1
fi

if [[ $work == /tmp/pr2_gpu_check.XXXX ]]; then
  work=$(mktemp -d /tmp/pr2_gpu_check.XXXX)
  summary=$work/summary.md
fi
mkdir -p "$work"
build_parts
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHON
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

key_lines() {  # the lines of a part's log worth reading first
  local name=$1 log=$2
  case $name in
    gpu-tests) grep -E "passed|failed|error|skipped|no tests ran" "$log" | tail -n 3 ;;
    train) grep -E "^pr2-train: CUDA|^step |warm start done|Error|error:" "$log" | tail -n 4 ;;
    *) grep -vE "^\s*$" "$log" | tail -n 4 ;;
  esac
}

started=$(date +%s)
failed=0
rows=()
details=()
echo "launch/gpu_check.sh: $device; logs and summary in $work"
for part in "${parts[@]}"; do
  IFS='|' read -r name limit envs cmd <<<"$part"
  log=$work/$name.log
  echo "== $name (timeout ${limit}s): ${envs:+$envs }$cmd"
  t0=$(date +%s%N)
  env_args=()
  read -r -a env_args <<<"$envs"
  timeout --kill-after=10 "$limit" env "${env_args[@]}" bash -c "$cmd" >"$log" 2>&1
  code=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  wall=$((ms / 1000)).$((ms % 1000 / 100))
  if [[ $code -eq 0 ]]; then
    status=PASS
  elif [[ $code -eq 124 || $code -eq 137 ]]; then
    status=TIMEOUT
    failed=1
  else
    status="FAIL (exit $code)"
    failed=1
  fi
  echo "   $status in $wall s"
  rows+=("| $name | $status | $wall | $limit |")
  details+=("## $name" "" "\`${envs:+$envs }$cmd\`" "" '```' "$(key_lines "$name" "$log")" '```' "log: $log" "")
done

{
  echo "# launch/gpu_check.sh summary"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(hostname), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- GPU: $device"
  echo "- total wall: $(($(date +%s) - started)) s; overall: $([[ $failed -eq 0 ]] && echo PASS || echo FAIL)"
  echo
  echo "| part | status | wall s | timeout s |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  printf '%s\n' "${details[@]}"
} >"$summary"
echo "launch/gpu_check.sh: summary $summary ($([[ $failed -eq 0 ]] && echo PASS || echo FAIL))"
exit "$failed"

#!/usr/bin/env bash
# Set everything up, lint, and run the test suite on this machine (CPU, gloo), against
# megatron-core 0.16.1 (constraints/cpu.txt) and then 0.19.2 (launch/compat_megatron_0_19.sh).
#   bash launch/test.sh                 # everything, both versions
#   bash launch/test.sh -k router -x    # extra arguments go to pytest (both runs)
#   MCORE_VERSIONS=0.16 bash launch/test.sh   # one version only (0.16 or 0.19)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MCORE_VERSIONS=${MCORE_VERSIONS:-0.16 0.19}
bash launch/setup.sh
"$PYTHON" -m ruff check pr2_megatron tests benchmarks launch
"$PYTHON" -m ruff format --check pr2_megatron tests benchmarks launch
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for version in $MCORE_VERSIONS; do
  case "$version" in
    0.16)
      echo "=== megatron-core 0.16.1 ==="
      "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
      ;;
    0.19)
      echo "=== megatron-core 0.19.2 ==="
      PYTHON="$PYTHON" bash launch/compat_megatron_0_19.sh "$@"
      ;;
    *)
      echo "unknown megatron-core version '$version' (0.16 or 0.19)" >&2
      exit 2
      ;;
  esac
done

#!/usr/bin/env bash
# Set everything up, lint, and run the test suite on this machine (CPU, gloo).
#   bash launch/test.sh                 # everything
#   bash launch/test.sh -k router -x    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash launch/setup.sh
"$PYTHON" -m ruff check pr2_megatron tests benchmarks launch
"$PYTHON" -m ruff format --check pr2_megatron tests benchmarks launch
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Install pr2_megatron and the pinned CPU stack of constraints/cpu.txt (torch 2.13.0,
# megatron-core 0.16.1) into the current Python. Idempotent: a second run installs nothing new.
# On a GPU cluster install the package into the existing environment instead
# (pip install -e .): its dependencies are ranges that keep the cluster's torch and megatron-core.
#   PYTHON=python3.11 bash launch/setup.sh        # pick the interpreter
#   PR2_EXTRAS=test,plots bash launch/setup.sh    # extras to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PR2_EXTRAS=${PR2_EXTRAS:-test}
CONSTRAINTS=${CONSTRAINTS:-constraints/cpu.txt}
"$PYTHON" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" \
  -e ".[${PR2_EXTRAS}]" 2>&1 \
  | grep -v -E "^WARNING: (Location|Running pip as)" || true
"$PYTHON" -c "import torch, megatron.core, pr2_megatron; print(f'torch {torch.__version__}, megatron-core {megatron.core.__version__}, pr2_megatron {pr2_megatron.__version__}')"
# Build the ProbMoE CPU kernel now (else its first use does; it is optional: without a C++
# compiler the tensor-op DP runs, with a warning).
"$PYTHON" -W ignore::UserWarning -c "from pr2_megatron.routing.probmoe import cpu_kernel; print('ProbMoE CPU kernel: ' + ('built' if cpu_kernel.available() else 'unavailable, the tensor-op DP runs'))"

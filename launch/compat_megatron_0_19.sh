#!/usr/bin/env bash
# Run the test suite against megatron-core 0.19.2 (the main stack pins 0.16.1) in its own venv.
#   bash launch/compat_megatron_0_19.sh                  # whole suite
#   bash launch/compat_megatron_0_19.sh -k router -x     # extra arguments go to pytest
#   VENV=/somewhere/else bash launch/compat_megatron_0_19.sh
# The venv (default /tmp/pr2-mcore019) holds only what 0.19.2 adds, at the exact versions of
# constraints/megatron-0.19.txt (megatron-core 0.19.2, triton 3.7.1); torch 2.13.0 and the test
# dependencies come from the interpreter that runs this script (PYTHON, default python3), also
# when that interpreter is itself a venv: the new venv is made from the base interpreter and a
# .pth file adds the running environment's site-packages after its own (so 0.19.2 shadows the
# 0.16.1 there). megatron-core >= 0.17 declares Requires-Python >= 3.12; a CPU torch 2.13.0 for
# 3.12 is not at hand without a multi-GB CUDA download, so its wheel is installed on 3.11 with
# --ignore-requires-python --no-deps; its Requires-Dist (torch>=2.6, numpy, packaging>=24.2)
# are checked below. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/pr2-mcore019}
CONSTRAINTS=constraints/megatron-0.19.txt
PARENT_PYTHON=${PYTHON:-python3}
pin() { grep -E "^$1==" "$CONSTRAINTS" | cut -d= -f3; }
MCORE_VERSION=$(pin megatron-core)
TRITON_VERSION=$(pin triton)

if [ ! -x "$VENV/bin/python" ]; then
  BASE=$("$PARENT_PYTHON" -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")
  "$BASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The running environment's site-packages (a venv's, or the system's), after the venv's own.
"$PARENT_PYTHON" -c "import site, sysconfig; print('\n'.join(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()])))" \
  > "$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/pr2-parent-env.pth"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)

installed() {
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true
}
venv_has() {  # the version installed in the venv itself (not seen through the .pth)
  "$PY" - "$1" <<'PYEOF'
import importlib.metadata as m, sys, sysconfig
own = sysconfig.get_paths()["purelib"]
for dist in m.distributions(path=[own]):
    if dist.metadata["Name"].lower() == sys.argv[1]:
        print(dist.version)
PYEOF
}
if [ "$(venv_has megatron-core)" != "$MCORE_VERSION" ]; then
  "${PIP[@]}" install --ignore-requires-python --no-deps --force-reinstall \
    "megatron-core==${MCORE_VERSION}"
fi
if [ "$(installed triton)" != "$TRITON_VERSION" ]; then
  "${PIP[@]}" install --no-deps "triton==${TRITON_VERSION}"
fi
# Declared dependencies: all expected from the running environment; fail loudly if not.
"$PY" - <<'EOF2'
import importlib.metadata as m
from packaging.requirements import Requirement
from packaging.version import Version

missing = []
for spec in m.requires("megatron-core") or []:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (training, dev, te, ...): not needed by the core
    try:
        have = m.version(req.name)
    except m.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(Version(have), prereleases=True):
        missing.append(f"{req} (have {have})")
if missing:
    raise SystemExit("megatron-core requirements not met: " + ", ".join(missing))
EOF2

VERSION=$("$PY" -W ignore -c "import megatron.core; print(megatron.core.__version__)")
if [ "$VERSION" != "$MCORE_VERSION" ]; then
  echo "expected megatron-core ${MCORE_VERSION} in ${VENV}, got ${VERSION}" >&2
  exit 1
fi
echo "testing against megatron-core ${VERSION} ($("$PY" -W ignore -c "import megatron.core, os; print(os.path.dirname(megatron.core.__file__))")), torch $("$PY" -c "import torch; print(torch.__version__)"), triton $(installed triton)"

# This checkout's pr2_megatron, whatever an editable install elsewhere points to.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m pytest -q -p no:cacheprovider "$@"

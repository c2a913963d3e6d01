#!/usr/bin/env bash
# Run the test suite against megatron-core 0.19.2 (CI pins 0.16.1) in a separate venv.
#   bash launch/compat_megatron_0_19.sh                  # whole suite
#   bash launch/compat_megatron_0_19.sh -k router -x     # extra arguments go to pytest
#   VENV=/somewhere/else bash launch/compat_megatron_0_19.sh
# The venv (default /tmp/pr2-mcore019) is made with --system-site-packages, so it reuses the
# installed torch 2.13.0 and test dependencies; only what 0.19.2 adds goes into it.
# megatron-core >= 0.17 declares Requires-Python >= 3.12: on 3.11 its cp311 wheel is installed
# with --ignore-requires-python --no-deps; its Requires-Dist (torch>=2.6, numpy,
# packaging>=24.2) are met by the system site-packages, and `import megatron.core` also needs
# triton, which the wheel does not declare. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/pr2-mcore019}
MCORE_VERSION=0.19.2
BASE_PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)

# The version the venv sees; the venv's site-packages come before the system's on sys.path, so
# an install there shadows the system 0.16.1.
venv_mcore_version() {
  "$PY" -c "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true
}
if [ "$(venv_mcore_version)" != "$MCORE_VERSION" ]; then
  "${PIP[@]}" install --ignore-requires-python --no-deps --force-reinstall \
    "megatron-core==${MCORE_VERSION}"
fi
# Undeclared runtime dependency of megatron.core >= 0.17 (imported at package import).
if ! "$PY" -c "import triton" 2>/dev/null; then
  "${PIP[@]}" install triton
fi
# Declared dependencies: all expected from the system site-packages; fail loudly if not.
"$PY" - <<'EOF'
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
EOF

VERSION=$("$PY" -W ignore -c "import megatron.core; print(megatron.core.__version__)")
if [ "$VERSION" != "$MCORE_VERSION" ]; then
  echo "expected megatron-core ${MCORE_VERSION} in ${VENV}, got ${VERSION}" >&2
  exit 1
fi
echo "testing against megatron-core ${VERSION} ($("$PY" -W ignore -c "import megatron.core, os; print(os.path.dirname(megatron.core.__file__))")), torch $("$PY" -c "import torch; print(torch.__version__)")"

# This checkout's pr2_megatron, whatever an editable install elsewhere points to.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m pytest -q -p no:cacheprovider "$@"

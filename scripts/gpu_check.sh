#!/usr/bin/env bash
# make gpu-check: the prepared GPU check on a bare CUDA machine (docs/gpu.md has the device call). Installs the wheels
# that make gpu-wheels put in .whl/ into a private folder with pip --no-index --no-deps --target, puts that folder
# and the project on PYTHONPATH (no build step), then runs scripts/gpu_check.py, which runs its stages within
# GPU_CHECK_MINUTES (default 8) and packs what they measured into $OUT (at most 8 files).
#   GPU_CHECK_PYTHON  the python with torch (default python3)
#   GPU_CHECK_WHEELS  the wheel folder (default .whl), or "skip" where the python has every package already
#   GPU_CHECK_SITE    where the wheels are installed (default /tmp/gpu_check_site)
# The other GPU_CHECK_* settings are scripts/gpu_check.py's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
if [ "$WHEELS" = skip ]; then
  echo "gpu_check: wheel install skipped (GPU_CHECK_WHEELS=skip): $PY must have the project's packages"
else
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $WHEELS/: run make gpu-wheels on the machine that sends this tree, and carry .whl" >&2
    exit 3
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing $WHEELS/*.whl failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py check

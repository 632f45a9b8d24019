#!/usr/bin/env bash
# The whole GPU check in one call (run from anywhere): build the CUDA extension, run every `cuda`-marked test,
# then the GPU benchmarks. Logs go to $OUT (or /tmp/mmcoconut_gpu_check). A failing step is reported and the
# next one still runs; the exit status is non-zero if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/mmcoconut_gpu_check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

# Carried wheels (same versions as CI) take precedence over the image's packages.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package itself, without installing it

failed=()
step() {  # step NAME CMD...: run, tee to $LOG_DIR/NAME.log, record failure and carry on
  local name=$1; shift
  echo "=== [$name] $*" | tee -a "$LOG_DIR/summary.log"
  if "$@" 2>&1 | tee "$LOG_DIR/$name.log"; then
    echo "=== [$name] OK" | tee -a "$LOG_DIR/summary.log"
  else
    echo "=== [$name] FAILED (rc=$?)" | tee -a "$LOG_DIR/summary.log"
    failed+=("$name")
  fi
}

step env "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
step build_cuda_ext env MMCOCONUT_EXT_VERBOSE=1 "$PY" -c \
  "from mmcoconut.kernels.build import load_extension; print(load_extension('cuda'))"
step pytest_cuda "$PY" -m pytest -m cuda tests/ -q -rs
step bench_inject env MMCOCONUT_INJECT=ext "$PY" bench/bench_inject.py --device cuda
if [ -f bench/bench_forward.py ]; then
  step bench_forward "$PY" bench/bench_forward.py --device cuda
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $LOG_DIR)" | tee -a "$LOG_DIR/summary.log"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $LOG_DIR)" | tee -a "$LOG_DIR/summary.log"

#!/usr/bin/env bash
# The whole GPU check in one call, sized for < 9 minutes on one H100/H200 including the extension build (~2 min):
#   bash bench/gpu_check.sh                 # on a GPU machine
#   bash bench/gpu_check.sh --device cpu    # tiny end-to-end run of the same steps on CPU (the script's own test)
# Steps: environment, CUDA extension build, the tests this environment can run (CUDA kernel tests + the model /
# hot-path / generation proofs), injection op fwd+bwd vs PyTorch, multi-pass a/c and host syncs (bench_hotpath),
# training-step samples/s + MFU + peak memory at stages 0 and 3, eager and compiled, fp16 and bf16 (gpu_bench,
# plain torch AdamW + autocast: no DeepSpeed needed). Logs go to $OUT (or /tmp/mmcoconut_gpu_check); a failing
# step is reported and the next one still runs; the exit status is non-zero if any step failed.
#
# Works on a bare image with torch, transformers, nvcc, ninja, pytest, PyYAML, Pillow. It does NOT need deepspeed,
# webdataset, braceexpand or wandb: test modules are collected only if their imports resolve here. To run the
# training/loader tests too, carry these wheels in .whl/ (installed with --no-deps into /tmp/site):
#   deepspeed==0.19.8 (sdist-built wheel, DS_BUILD_OPS=0), webdataset==1.0.2, braceexpand, wandb, accelerate
# (`pip download --no-deps -d .whl deepspeed==0.19.8 webdataset==1.0.2 braceexpand wandb accelerate`, then build
# deepspeed's wheel with `pip wheel`); a newer local transformers wheel the same way.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ] && [ -n "${2:-}" ]; then DEVICE=$2; fi
LOG_DIR="${OUT:-/tmp/mmcoconut_gpu_check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export MMCOCONUT_EXT_DIR="${MMCOCONUT_EXT_DIR:-/tmp/mmcoconut_ext}"
if [ "$DEVICE" = "cuda" ] && [ -z "${CUDA_HOME:-}" ]; then
  # the toolkit root whose lib64 holds libcudart (torch's guess from nvcc's path can miss it)
  for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8 "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
    if [ -e "$d/lib64/libcudart.so" ] || compgen -G "$d/lib64/libcudart.so*" >/dev/null; then export CUDA_HOME=$d; break; fi
  done
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels take precedence over the image's packages
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package itself, without installing it

failed=()
step() {  # step NAME CMD...: run, tee to $LOG_DIR/NAME.log, record failure and carry on
  local name=$1; shift
  echo "=== [$name] $* ($(date +%T))" | tee -a "$LOG_DIR/summary.log"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    echo "=== [$name] OK" | tee -a "$LOG_DIR/summary.log"
  else
    echo "=== [$name] FAILED (rc=$rc)" | tee -a "$LOG_DIR/summary.log"
    failed+=("$name")
  fi
}

# test modules whose imports resolve in this environment (no deepspeed / webdataset / wandb needed)
runnable_tests() {
  "$PY" - <<'PY'
import importlib.util, sys, traceback
from pathlib import Path
sys.path.insert(0, "tests")
LAZY = ("mmcoconut.train", "mmcoconut.data.loader", "mmcoconut.data.pipeline", "mmcoconut.data.sharding",
        "mmcoconut.eval", "make_shards", "eval_shards", "eval_cfg_factory")  # import deepspeed/webdataset inside
ok = []
for f in sorted(Path("tests").glob("test_*.py")):
    reason = None
    try:  # the module's own imports must resolve here
        spec = importlib.util.spec_from_file_location(f.stem, f)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as e:
        reason = f"import: {e}"
    except BaseException as e:  # pytest.importorskip raises Skipped (a BaseException)
        reason = f"{type(e).__name__}: {e}"
    if reason is None and any(m in f.read_text() for m in LAZY):
        missing = [m for m in ("deepspeed", "webdataset", "braceexpand") if importlib.util.find_spec(m) is None]
        reason = f"needs {', '.join(missing)}" if missing else None
    print(f"{'skip' if reason else 'run '} {f}" + (f"  ({reason})" if reason else ""), file=sys.stderr)
    if reason is None:
        ok.append(str(f))
print(" ".join(ok))
PY
}

step env "$PY" -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available(), 'transformers', transformers.__version__); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); import os; \
print('CUDA_HOME', os.environ.get('CUDA_HOME'))"
if [ "$DEVICE" = "cuda" ]; then
  step build_cuda_ext env MMCOCONUT_EXT_VERBOSE=1 "$PY" -c \
    "from mmcoconut.kernels.build import load_extension; print(load_extension('cuda'))"
fi
TESTS=$(runnable_tests 2>"$LOG_DIR/collected.log")
cat "$LOG_DIR/collected.log"
if [ -z "$TESTS" ]; then echo "gpu_check: no runnable test module (see $LOG_DIR/collected.log)"; TESTS=__none__; fi
# CUDA kernel tests (skipped without a GPU) + the model proofs on the image's torch/transformers versions
step pytest "$PY" -m pytest -q -rs -p no:cacheprovider $TESTS
step bench_inject env MMCOCONUT_INJECT=ext "$PY" bench/bench_inject.py --device "$DEVICE" --quick
if [ "$DEVICE" = "cuda" ]; then
  step bench_hotpath "$PY" bench/bench_hotpath.py --device cuda --what syncs,vd,saved,ac --n 4,8 --reps 10
  # eager: fp16 and bf16 at stages 0 and 3; compiled: bf16 (each compiled configuration compiles for ~1 min)
  step gpu_bench "$PY" bench/gpu_bench.py --device cuda --modes eager
  step gpu_bench_compiled "$PY" bench/gpu_bench.py --device cuda --modes compiled --dtypes bf16 --skip-check
else
  step bench_hotpath "$PY" bench/bench_hotpath.py --device cpu --small --what syncs,vd,ac --n 4 --reps 2 --batch 2
  step gpu_bench "$PY" bench/gpu_bench.py --device cpu
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $LOG_DIR)" | tee -a "$LOG_DIR/summary.log"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $LOG_DIR)" | tee -a "$LOG_DIR/summary.log"

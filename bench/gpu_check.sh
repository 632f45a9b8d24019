#!/usr/bin/env bash
# The GPU check, sized for a GPU lent for 15 minutes in all: two calls of at most ~5 minutes each (the steps'
# timeouts add up to 360 s and 310 s; expected about 3-4 minutes each).
#   bash bench/gpu_check.sh 1          # environment, CUDA op build, the CUDA kernel tests, eager benchmark
#   bash bench/gpu_check.sh 2          # compiled benchmark at stages 0 and 3, compiled vs eager loss compared
#   bash bench/gpu_check.sh --dry-run  # both calls on CPU, GPU steps stubbed (bench/gpu_check.sh 1 --dry-run: one;
#                                      # timeouts x DRY_RUN_TIMEOUT_SCALE, default 5; MMCOCONUT_INJECT=ref)
# Every step runs under its own `timeout`; a failing or timed-out step is recorded and the next one still runs; the
# exit status is non-zero if any step failed. Results go to $OUT (default /tmp/mmcoconut_gpu_check; a dry run of
# both calls writes $OUT/1 and $OUT/2): at most 8 files per call, 00_summary.txt first (also in name order), then
# one log per step. The summary is rewritten after every step, so a call cut short still brings back what it did.
#
# Call 1 builds the CUDA op for the device's architecture only (TORCH_CUDA_ARCH_LIST from the GPU) and runs
# tests/test_kernels_cuda.py, which includes the debug mode where out-of-range ids/indices raise inside the CUDA op.
# If the build fails, the benchmark runs with MMCOCONUT_INJECT=ref (the PyTorch implementation) and says so. Call 2
# uses the op built by call 1 when the machine is still the same (warm), else the PyTorch implementation.
# The benchmarks are bench/gpu_bench.py (plain torch AdamW + autocast: no DeepSpeed): samples/s, MFU, a/c and peak
# memory per stage; a CUDA sync-debug failure is reported and the benchmark goes on.
# Needs torch, transformers, pytest on the image; not deepspeed, webdataset, braceexpand or wandb.
set -uo pipefail
cd "$(dirname "$0")/.."
CALL="" DRY=0
for arg in "$@"; do
  case "$arg" in
    1|2) CALL=$arg ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu_check.sh 1|2 [--dry-run] | --dry-run" >&2; exit 2 ;;
  esac
done
if [ -z "$CALL" ]; then
  if [ "$DRY" = 1 ]; then  # rehearse both calls, each into its own folder
    base="${OUT:-/tmp/mmcoconut_gpu_check}"
    rc=0
    OUT="$base/1" bash "$0" 1 --dry-run || rc=1
    OUT="$base/2" bash "$0" 2 --dry-run || rc=1
    exit $rc
  fi
  echo "usage: bash bench/gpu_check.sh 1|2 [--dry-run] | --dry-run" >&2; exit 2
fi
LOG_DIR="${OUT:-/tmp/mmcoconut_gpu_check}"
mkdir -p "$LOG_DIR"
SUMMARY="$LOG_DIR/00_summary.txt"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  SCALE=${DRY_RUN_TIMEOUT_SCALE:-5}  # a shared CI box is slower than the GPU machine's 16 cores
  export MMCOCONUT_INJECT=${MMCOCONUT_INJECT:-ref}  # the rehearsal needs no CPU op build
else
  SCALE=1
  export MMCOCONUT_EXT_DIR="${MMCOCONUT_EXT_DIR:-/tmp/mmcoconut_ext}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package itself, without installing it
if [ "$DRY" = 0 ] && [ -z "${CUDA_HOME:-}" ]; then
  # the toolkit root whose lib64 holds libcudart (torch's guess from nvcc's path can miss it)
  nvcc_root=$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")
  for d in /usr/local/cuda /usr/local/cuda-13.0 "$nvcc_root"; do
    if compgen -G "$d/lib64/libcudart.so*" >/dev/null; then export CUDA_HOME=$d; break; fi
  done
fi

LINES=()  # one line per finished step (the summary's body)
# key lines of a log: pytest's closing line, the benchmark's checks, comparisons and table rows, errors
KEY_LINES='^(check|compare|\| [0-9]|=+ .*(passed|failed|error|skipped)|[0-9]+ (passed|failed|tests? collected)'
KEY_LINES+='|torch |GPU |arch |cuda: |error)'
write_summary() {
  { echo "gpu_check call $CALL$([ "$DRY" = 1 ] && echo " (dry run: GPU steps stubbed)") $(date -u +%FT%TZ)"
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MMCOCONUT_INJECT=${MMCOCONUT_INJECT:-auto}"
    printf '%s\n' "${LINES[@]}"; } > "$SUMMARY"
}
failed=()
step() {  # step FILE SECONDS CMD...: run under timeout, log to $LOG_DIR/FILE.log, record the outcome
  local name=$1 secs=$(($2 * SCALE)); shift 2
  local t0=$SECONDS
  echo "=== [$name] timeout ${secs}s: $*"
  timeout -k 10 "$secs" "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  local status="OK"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${secs}s"
  elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  [ "$status" = OK ] || failed+=("$name")
  LINES+=("[$name] $status ($((SECONDS - t0)) s)")
  while IFS= read -r line; do LINES+=("    $line"); done < <(grep -E "$KEY_LINES" "$LOG_DIR/$name.log" | head -40)
  [ "$status" = OK ] || while IFS= read -r line; do LINES+=("    | $line"); done < <(tail -5 "$LOG_DIR/$name.log")
  echo "=== [$name] $status"
  write_summary
}
write_summary

# ------------------------------------------------------------------ both calls: the environment
step 01_env 30 "$PY" -c "import sys, torch, transformers, os; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), \
'transformers', transformers.__version__); \
print('GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'); \
print('CUDA_HOME', os.environ.get('CUDA_HOME'))"
if [ "$DRY" = 1 ]; then
  export TORCH_CUDA_ARCH_LIST="9.0"  # stand-in: no GPU to ask
else
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"
fi
echo "arch $TORCH_CUDA_ARCH_LIST" >> "$LOG_DIR/01_env.log"
cuda_op_cached() {  # the CUDA op built (by call 1) in this machine's cache
  compgen -G "$MMCOCONUT_EXT_DIR/mmcoconut_inject_cuda-*/built.json" >/dev/null
}

if [ "$CALL" = 1 ]; then
  # ---------------------------------------------------------------- call 1: build, kernel tests, eager benchmark
  if [ "$DRY" = 1 ]; then  # what can be checked without nvcc: the sources, the TORCH_LIBRARY registration
    step 02_build 60 "$PY" -c "from mmcoconut.kernels.build import KINDS, CSRC
name, src, *_, pymod = KINDS['cuda']
text = (CSRC / src[0]).read_text()
assert not pymod and f'TORCH_LIBRARY({name},' in text, 'not a TORCH_LIBRARY op'
assert '#include <torch/extension.h>' not in text and 'PYBIND11_MODULE' not in text
print('cuda: dry run:', CSRC / src[0], 'registers', name)"
    step 03_kernel_tests 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/test_kernels_cuda.py
    step 04_eager_bench 240 "$PY" bench/gpu_bench.py --device cpu --modes eager --stages 0,3 --checks sync --ac \
      --steps 1 --warmup 1
  else
    step 02_build 180 env MMCOCONUT_EXT_VERBOSE=1 "$PY" -c \
      "from mmcoconut.kernels.build import load_extension; print('cuda:', load_extension('cuda').__file__)"
    if ! cuda_op_cached; then export MMCOCONUT_INJECT=ref; write_summary; fi
    step 03_kernel_tests 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_cuda.py
    step 04_eager_bench 90 "$PY" bench/gpu_bench.py --device cuda --modes eager --stages 0,3 --dtypes bf16,fp16 \
      --checks sync --ac --steps 6 --warmup 2
  fi
else
  # ---------------------------------------------------------------- call 2: compiled benchmark, compiled vs eager
  if [ "$DRY" = 1 ]; then  # dynamo traces the model's own passes fullgraph; no code generation
    step 05_compiled_stage3 180 "$PY" bench/gpu_bench.py --device cpu --modes compiled --stages 3 --checks compiled \
      --compile-backend eager --ac --steps 1 --warmup 1
    step 06_compiled_stage0 100 "$PY" bench/gpu_bench.py --device cpu --modes compiled --stages 0 --checks compiled \
      --compile-backend eager --steps 1 --warmup 1
  else
    cuda_op_cached || { export MMCOCONUT_INJECT=ref; write_summary; }
    # stage 3 first (the launch-bound one); stage 0 in a second process reuses inductor's on-disk cache
    step 05_compiled_stage3 180 "$PY" bench/gpu_bench.py --device cuda --modes compiled --stages 3 --dtypes bf16 \
      --checks compiled --ac --steps 6 --warmup 3
    step 06_compiled_stage0 100 "$PY" bench/gpu_bench.py --device cuda --modes compiled --stages 0 --dtypes bf16 \
      --checks compiled --steps 6 --warmup 3
  fi
fi

if [ ${#failed[@]} -gt 0 ]; then
  LINES+=("gpu_check call $CALL: FAILED steps: ${failed[*]}")
  write_summary
  exit 1
fi
LINES+=("gpu_check call $CALL: all steps passed")
write_summary

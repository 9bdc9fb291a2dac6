#!/usr/bin/env bash
# The CUDA checks of pyops, for a machine with an NVIDIA GPU (no internet needed):
# report the machine, build the extension in place for the visible GPU, run the CUDA
# tests, then the CUDA benchmarks (float32, then the convolutions in float16 and
# bfloat16, which run on tensor cores). Every step logs to OUT_DIR/gpu_check.log and its
# exit status goes to OUT_DIR/steps.tsv; a failed step does not stop the later ones, and
# the script exits non-zero if any step failed. OUT_DIR ends with seven files (the device
# tool brings back at most eight): gpu_check.log, steps.tsv, pytest-cuda.xml, the float32
# benchmark's results.json (rewritten after every case) and speedup.png, and the same two
# for the 16-bit convolutions under OUT_DIR/conv-16bit/.
#
# Usage: scripts/gpu_check.sh OUT_DIR
# Per-step time limits in seconds, together at most 10 minutes (the whole run is meant to
# take a few): GPU_CHECK_BUILD_TIMEOUT (210), GPU_CHECK_TEST_TIMEOUT (150),
# GPU_CHECK_BENCH_TIMEOUT (100), GPU_CHECK_BENCH_16BIT_TIMEOUT (50); 30 for the machine
# report, 60 for the determinism check.
# TORCH_CUDA_ARCH_LIST is honoured; by default the visible GPU's arch (9.0 if unknown).

set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
STATUS_FILE="$OUT_DIR/steps.tsv"
printf 'step\tstatus\tseconds\n' >"$STATUS_FILE"
failures=0

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, tees its output to
# OUT_DIR/gpu_check.log and records its status (124 means it ran out of time).
LOG_FILE="$OUT_DIR/gpu_check.log"
: >"$LOG_FILE"
run_step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status
  echo "=== [$name] $* (limit ${limit}s)" | tee -a "$LOG_FILE"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG_FILE"
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$STATUS_FILE"
  echo "=== [$name] exit status $status after $((SECONDS - start))s" | tee -a "$LOG_FILE"
  if [[ $status -ne 0 ]]; then failures=$((failures + 1)); fi
  return 0
}

# Fails when nvidia-smi does (no GPU or no driver), after printing everything else.
machine_info() {
  local gpu_status=0
  nvidia-smi || gpu_status=$?
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv
  echo "cpu cores: $(nproc)"
  "$CUDA_HOME/bin/nvcc" --version
  "$PYTHON" -c 'import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  git rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
  git status --short 2>/dev/null | head -n 20
  return "$gpu_status"
}

# Compute capability of GPU 0 as "major.minor" (what TORCH_CUDA_ARCH_LIST expects).
visible_arch() {
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' '
}

build_in_place() {
  # build_ext --inplace needs neither pip nor the network.
  PYOPS_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS=${MAX_JOBS:-16} \
    "$PYTHON" setup.py build_ext --inplace &&
    "$PYTHON" -c 'import pprint, pyops; pprint.pprint(pyops.build_info())'
}

# The bias gradient of bias_act must be bitwise identical from run to run (no atomics):
# checked on both layouts the CUDA kernels distinguish, with sizes that give many blocks,
# on planes of 32x32 (16-byte packs) and 33x33 (element by element).
determinism_check() {
  "$PYTHON" - <<'EOF'
import itertools

import torch
import pyops  # noqa: F401

torch.manual_seed(0)
failed = False
for layout, side, dtype in itertools.product(("contiguous", "channels_last"), (32, 33),
                                            (torch.float32, torch.float16, torch.bfloat16)):
    x = torch.randn(64, 96, side, side, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(96, device="cuda", dtype=dtype)
    grad = torch.randn_like(x)
    runs = [torch.ops.pyops._bias_act_backward(grad, x, bias, "tanh", 0.01, False)
            for _ in range(3)]
    same = all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])
               for r in runs[1:])
    x_ref = x.detach().float().requires_grad_()
    b_ref = bias.detach().float().requires_grad_()
    torch.tanh(x_ref + b_ref.view(1, -1, 1, 1)).backward(grad.float())
    err = (runs[0][1].float() - b_ref.grad).abs().max().item()
    scale = b_ref.grad.abs().max().item()
    print(f"{layout:13s} {side}x{side} {str(dtype):15s} deterministic={same} "
          f"grad_bias max abs err={err:.3g} (max |grad_bias|={scale:.3g})")
    failed |= not same
raise SystemExit(1 if failed else 0)
EOF
}

ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(visible_arch)}
ARCH_LIST=${ARCH_LIST:-9.0}
# The steps run under `timeout`, in a child bash that needs the functions and settings.
export PYTHON ARCH_LIST
export -f machine_info build_in_place determinism_check

run_step machine 30 bash -c machine_info
run_step build "${GPU_CHECK_BUILD_TIMEOUT:-210}" bash -c build_in_place
run_step determinism 60 bash -c determinism_check
run_step tests "${GPU_CHECK_TEST_TIMEOUT:-150}" \
  "$PYTHON" -m pytest tests -k cuda -q -rs --junitxml="$OUT_DIR/pytest-cuda.xml"
run_step bench "${GPU_CHECK_BENCH_TIMEOUT:-100}" \
  "$PYTHON" -m pyops.bench --device cuda --out "$OUT_DIR"
run_step bench-conv-16bit "${GPU_CHECK_BENCH_16BIT_TIMEOUT:-50}" \
  "$PYTHON" -m pyops.bench --device cuda --family conv --dtype float16,bfloat16 \
  --out "$OUT_DIR/conv-16bit"

echo "=== summary (also in $STATUS_FILE)"
column -t "$STATUS_FILE" 2>/dev/null || cat "$STATUS_FILE"
if [[ $failures -ne 0 ]]; then
  echo "$failures step(s) failed"
  exit 1
fi
echo "all steps passed"

#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer and runs the
# whole test suite (whatever tests/ holds) under them. Any report fails the run.
#
#   scripts/sanitize.sh [pytest args]      e.g. scripts/sanitize.sh tests/test_pool.py -x
#
# The checkout is copied (tracked and untracked-but-not-ignored files) to
# build/sanitize/tree and built in place there, so the normal in-place build and the
# pip-installed one are left alone; object files stay in build/sanitize/temp, so a rerun
# recompiles only what changed. Environment:
#   PYOPS_CPU_CAPABILITIES   CPU kernel copies to instrument besides DEFAULT (default AVX2)
#   MAX_JOBS                 parallel compile jobs (torch.utils.cpp_extension's variable)
# See docs/HARDENING.md for why each sanitizer option below is set.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/build/sanitize"
TREE="$WORK/tree"
PYTHON="${PYTHON:-python3}"

libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
for lib in "$libasan" "$libubsan"; do
  # gcc prints the bare name back when it has no such runtime.
  [[ "$lib" == /* && -e "$lib" ]] || { echo "[sanitize] gcc has no $(basename "$lib")" >&2; exit 2; }
done

start=$SECONDS
echo "[sanitize] copying the checkout to $TREE"
rm -rf "$TREE"
mkdir -p "$TREE"
# Sources only (no build outputs); tar keeps mtimes, so ninja stays incremental.
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
     | tar --null -T - -cf -) | tar -xpf - -C "$TREE"
else
  (cd "$ROOT" && tar --exclude=./build --exclude='*.so' --exclude=__pycache__ -cf - .) \
    | tar -xpf - -C "$TREE"
fi

echo "[sanitize] building (PYOPS_SANITIZE=1, CPU capabilities DEFAULT,${PYOPS_CPU_CAPABILITIES:-AVX2})"
(cd "$TREE" && PYOPS_SANITIZE=1 PYOPS_CUDA=0 PYOPS_CPU_CAPABILITIES="${PYOPS_CPU_CAPABILITIES:-AVX2}" \
   "$PYTHON" setup.py -q build_ext --inplace --build-temp "$WORK/temp" > "$WORK/build.log" 2>&1) || {
  tail -n 50 "$WORK/build.log" >&2
  echo "[sanitize] build failed (full log: $WORK/build.log)" >&2
  exit 1
}
echo "[sanitize] built in $((SECONDS - start)) s"

# ASan must be the first library loaded into the (uninstrumented) Python process.
export LD_PRELOAD="$libasan:$libubsan${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# alloc_dealloc_mismatch=0 / new_delete_type_mismatch=0: torch's and CPython's own
#   (uninstrumented) libraries mix allocators in ways ASan's interceptors flag; pyops code
#   is checked by the instrumentation, which these options do not touch.
# halt_on_error=1, abort_on_error=1: the first report kills the test process (and the run).
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:halt_on_error=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:${UBSAN_OPTIONS:-}"
# Tests that spawn Python subprocesses (the CPU capability tests) inherit all of the above.

cd "$TREE"
# The tests must import this instrumented build, not an installed or in-place one.
"$PYTHON" - <<'PY'
import os
import pyops
assert "libasan" in open("/proc/self/maps").read(), "libasan is not loaded"
assert pyops._C.__file__.startswith(os.getcwd() + os.sep), f"wrong pyops build: {pyops._C.__file__}"
print("[sanitize] testing", pyops._C.__file__, pyops.build_info()["cpu_capabilities_compiled"])
PY

# --capture=sys: reports are written to file descriptor 2 by the sanitizer runtimes; with
# pytest's default fd-level capture they would vanish with the aborted process.
test_start=$SECONDS
set +e
"$PYTHON" -m pytest -q --capture=sys "${@:-tests}" 2>&1 | tee "$WORK/pytest.log"
status=${PIPESTATUS[0]}
set -e
reports=$(grep -cE "ERROR: AddressSanitizer|runtime error:" "$WORK/pytest.log" || true)
echo "[sanitize] tests took $((SECONDS - test_start)) s, build + tests $((SECONDS - start)) s;" \
     "sanitizer reports: $reports; pytest exit status $status"
[[ $status -eq 0 && $reports -eq 0 ]]

#!/usr/bin/env bash
# The GPU check: tests/test_gpu.py, then a throughput table (Lightning DDP against hybrid_sgd's single and
# sharded server, K = N and K = 1, a 10M and a ~100M-parameter MLP, 2 ranks), in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUT          # on a machine with CUDA; OUT: where everything is written
#   bash benchmarks/gpu_check.sh --cpu OUT    # the same steps on CPU, small models: a check of this script
#                                             # (or GPU_CHECK_CPU=1)
#
# Needs python with torch, pytorch-lightning and torchmetrics, nothing else: no pytest (the tests run as a plain
# script), no Hydra, W&B or scikit-learn, no network. Python: $PYTHON, else the first of python3, python,
# .venv/bin/python that imports torch and pytorch_lightning. One GPU is enough: the two ranks are two torchrun
# "nodes" of one process each on 127.0.0.1 (devices=1, num_nodes=2), Lightning's default group on gloo.
# Without CUDA (and without --cpu) it says what it skipped and exits 0.
#
# Everything goes to OUT as it runs (a run cut short keeps what it measured), at most seven files:
# environment.txt, tests.txt, throughput.txt, throughput.json, throughput.log (the runs' own output),
# throughput.err (only if the table's driver wrote to stderr), summary.txt (printed at the end too).
# Time: GPU_CHECK_BUDGET seconds in all (default 450), the tests at most 180 of them; the table starts no
# configuration with under 30 s left and stops one at what is left (its row says so).
# Exit status: 0 when everything that ran passed (or CUDA is absent), 1 when a test or a configuration failed
# or was skipped for time, 2 when python, torch or the package cannot be imported.
set -u

CPU=${GPU_CHECK_CPU:-0}
OUT=""
for arg in "$@"; do
    case "$arg" in
        --cpu) CPU=1 ;;
        -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) OUT=$arg ;;
    esac
done
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
MODE=()
[ "$CPU" = 1 ] && MODE=(--cpu)
status=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }

find_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for candidate in python3 python .venv/bin/python; do
        if "$candidate" -c "import torch, pytorch_lightning" >/dev/null 2>&1; then echo "$candidate"; return; fi
    done
}

# The versions, the GPU(s), and that the package imports without Hydra, W&B and scikit-learn.
check_environment() {
    "$PY" - >"$OUT/environment.txt" 2>&1 <<'EOF'
import importlib.util, platform, sys, torch, pytorch_lightning as pl
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__},",
      f"pytorch-lightning {pl.__version__}")
for name, note in (("torchmetrics", ""), ("pytest", " (not needed)")):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'absent'}{note}")
if torch.cuda.is_available():
    print(f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s):",
          ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
else:
    print("CUDA: absent")
import torchmetrics  # what these three import by themselves (e.g. transformers, then sklearn) is not the package's
optional = {"hydra", "wandb", "sklearn"}
before = {m.split(".")[0] for m in sys.modules} & optional
import lightning_hybrid
pulled = sorted({m.split(".")[0] for m in sys.modules} & optional - before)
if before:
    print("torch, pytorch_lightning and torchmetrics import", ", ".join(sorted(before)), "by themselves")
print("import lightning_hybrid pulls in", ", ".join(pulled) if pulled else "none of hydra, wandb, sklearn")
sys.exit(3 if pulled else 0)
EOF
    local code=$?
    cat "$OUT/environment.txt" | tee -a "$SUMMARY"
    case $code in
        0) ;;
        3) status=1 ;;
        *) say "gpu_check: the environment check failed (above)"; exit 2 ;;
    esac
}

# tests/test_gpu.py as a plain script (no pytest needed), at most 180 s.
run_tests() {
    local seconds=$(($(left) - 60 < 180 ? $(left) - 60 : 180)) code
    say ""
    if [ "$seconds" -lt 30 ]; then
        say "== tests/test_gpu.py skipped: $(left) s left of GPU_CHECK_BUDGET=$BUDGET"
        status=1
        return
    fi
    say "== tests/test_gpu.py ${MODE[*]}: two torchrun nodes of one process on 127.0.0.1, at most ${seconds} s"
    timeout -k 15 "$seconds" "$PY" tests/test_gpu.py "${MODE[@]}" --timeout $((seconds / 2)) 2>&1 |
        tee "$OUT/tests.txt"
    code=${PIPESTATUS[0]}
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then
        echo "(stopped at its ${seconds} s limit)" | tee -a "$OUT/tests.txt"
    fi
    grep "^test_.*\] \(passed\|FAILED\)\|^tests/test_gpu.py\|^(stopped" "$OUT/tests.txt" >>"$SUMMARY"
    [ "$code" = 0 ] || status=1
}

# The throughput table, in what is left of the budget.
run_table() {
    local seconds=$(($(left) - 15)) code
    say ""
    if [ "$seconds" -lt 45 ]; then
        say "== throughput table skipped: $(left) s left of GPU_CHECK_BUDGET=$BUDGET"
        status=1
        return
    fi
    say "== throughput table ${MODE[*]}, at most ${seconds} s"
    timeout -k 15 "$seconds" "$PY" benchmarks/gpu_throughput.py --out "$OUT" --budget $((seconds - 15)) \
        "${MODE[@]}" 2>"$OUT/throughput.err"
    code=$?
    cat "$OUT/throughput.txt" >>"$SUMMARY" 2>/dev/null
    if [ "$code" != 0 ]; then
        status=1
        say "gpu_throughput.py exited with $code$([ "$code" = 124 ] && echo ' (its time limit)'):"
        tail -5 "$OUT/throughput.err" | tee -a "$SUMMARY"
    fi
    [ -s "$OUT/throughput.err" ] || rm -f "$OUT/throughput.err"
    if grep -q "failed after\|timed out after\| skipped: " "$OUT/throughput.txt" 2>/dev/null; then status=1; fi
}

PY=$(find_python)
if [ -z "$PY" ]; then
    say "gpu_check: no python here imports torch and pytorch_lightning (set PYTHON=...)"
    exit 2
fi
check_environment
if [ "$CPU" = 1 ]; then
    say "gpu_check: --cpu: tests/test_gpu.py's launches and the table on CPU, small models (a check of this script)"
elif ! grep -q "^CUDA [0-9]" "$OUT/environment.txt"; then
    say "gpu_check: CUDA is absent; skipped: tests/test_gpu.py (3 tests: K = N against DDP, one server and sharded;"
    say "  K = 1 trains and evaluates one model) and the GPU throughput table (DDP, K = N and K = 1, single and"
    say "  sharded server, 10M and ~100M parameters, 2 ranks). --cpu runs both on CPU as a check of this script."
    exit $status
fi
run_tests
run_table
say ""
say "gpu_check: $SECONDS s in all; exit $status; written to $OUT"
echo
echo "================ summary ($SUMMARY)"
cat "$SUMMARY"
exit $status

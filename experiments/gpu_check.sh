#!/usr/bin/env bash
# The one prepared GPU check (issue 2): install, attention benchmark, GPU tests; ~9 minutes at most.
#
# Run from the repository root on a CUDA box that already has torch and triton (no internet):
#
#     FPDT_COMMIT=<sha of the tree> OUT=/some/dir bash experiments/gpu_check.sh
#
# Writes into $OUT (default experiments/results/gpu_check): env.txt, install.log, bench.log,
# bench_attention_<gpu>.csv, pytest_gpu.log and summary.txt (one line per step with its exit
# status and seconds). Every step has its own timeout, and a failed step is recorded, not fatal.
# The benchmark runs before the tests: its CSV is the figure only a GPU can produce, and its
# d=128 rows come first. Exit status: 0 if every step passed, else 1.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-experiments/results/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Works even if the editable install fails (the tree is importable from its root).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS LOG OK_RCS CMD...: run CMD under a timeout into LOG, record the result.
    local name=$1 limit=$2 log=$3 ok_rcs=$4
    shift 4
    local start=$SECONDS rc
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    rc=$?
    tail -n 60 "$OUT/$log"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "    (timed out)" | tee -a "$OUT/summary.txt"
    echo "    $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    case " $ok_rcs " in *" $rc "*) ;; *) status=1 ;; esac
}

: >"$OUT/summary.txt"
{
    date -u
    nvidia-smi || true
    python --version
    # What the benchmark and tests import; nothing can be installed without internet, so report.
    python - <<'EOF'
import importlib
for name in ("torch", "triton", "pytest", "numpy", "hydra", "matplotlib", "setuptools"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except ImportError as e:
        print(f"{name} MISSING ({e})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --no-build-isolation: build isolation would fetch setuptools from the internet.
step install 60 install.log "0" python -m pip install -e . --no-deps --no-build-isolation

step bench 300 bench.log "0" python -m experiments.bench_attention
csvs=$(ls experiments/results/bench_attention_*.csv 2>/dev/null | grep -v '_cpu\.csv$')
if [ -n "$csvs" ]; then cp $csvs "$OUT/"; else echo "    no GPU benchmark CSV" | tee -a "$OUT/summary.txt"; fi

# pytest exit 5 = no test carries the gpu marker yet: recorded in the log, not a failure.
# Only the kernel tests carry GPU cases; collecting the rest would need hydra/matplotlib there.
step pytest_gpu 180 pytest_gpu.log "0 5" python -m pytest -m gpu -x -q -p no:cacheprovider tests/test_attention.py

echo "=== done: status $status" | tee -a "$OUT/summary.txt"
exit "$status"

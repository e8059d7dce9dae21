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
OUT_DEFAULT=experiments/results/gpu_check
# shellcheck source=experiments/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"

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

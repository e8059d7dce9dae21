#!/usr/bin/env bash
# The prepared GPU run for the parallel and experiments issues (~9 minutes at most, one GPU):
#   1. FPDT block: offload vs no offload step time, peak memory vs chunk count, a timeline
#      (bf16, H=32, d=128, S in {128K, 256K}, C in {16K, 32K, 64K});
#   2. a short seq_len sweep of llama3.2-1b, fpdt vs ulysses on one GPU (MFU, memory);
#   3. max_seqlen for both strategies (capped by search.limit and timeouts to fit the budget).
#
#     OUT=/some/dir bash experiments/gpu_experiments.sh
#
# The device box has no internet. hydra-core/omegaconf (pure Python) must be importable there:
# if they are not, download their wheels here into .wheels/ (pip download --no-deps hydra-core
# omegaconf antlr4-python3-runtime==4.9.3 -d .wheels) and carry that folder; this script installs
# from it. Every step has its own timeout and its log in $OUT; a failed step is recorded.
OUT_DEFAULT=experiments/results/gpu_experiments
# shellcheck source=experiments/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
if ! python -c "import hydra, omegaconf" 2>/dev/null && [ -d .wheels ]; then
    python -m pip install --no-index --find-links .wheels hydra-core omegaconf >"$OUT/install.log" 2>&1
fi
python -m pip install -e . --no-deps --no-build-isolation >>"$OUT/install.log" 2>&1 || true
nvidia-smi >"$OUT/env.txt" 2>&1 || true

step fpdt_block 200 fpdt_block.log 0 python -m experiments.bench_fpdt_block --out "$OUT/fpdt_block_cuda.csv"
step sweep 180 sweep.log 0 python -m experiments.run -m model=llama3.2-1b parallel=ulysses,fpdt chunks=4 gpus=1 \
    seq_len=16384,32768,65536 steps=3 warmup_steps=1 timeout_s=90 "hydra.sweep.dir=$OUT/sweep"
step max_seqlen 150 max_seqlen.log 0 python -m experiments.max_seqlen -m model=llama3.2-1b parallel=ulysses,fpdt chunks=8 gpus=1 \
    search.start=65536 search.limit=524288 search.resolution=0.25 steps=1 warmup_steps=1 timeout_s=60 \
    "hydra.sweep.dir=$OUT/max_seqlen"
echo "=== done: status $status" | tee -a "$OUT/summary.txt"
exit "$status"

#!/usr/bin/env bash
# A short prepared GPU check (~3 minutes, one GPU) for the FPDT block, with GPU tests beside it:
#   1. smoke (as every prepared script);
#   2. while the FPDT kernels compile into Triton's on-disk cache (a tiny block run), the GPU tests
#      named by $PYTEST_SELECT and $PYTEST_K run on 12 workers (default: the fp32 kernel cases, the chunk tests
#      and the pipeline tests: what the first H200 run left unfinished);
#   3. the FPDT block at S=$FPDT_S (default 128K), C in $FPDT_C (default 32K 64K): offload vs
#      on-device step time, peak/reserved memory, and a timeline, alone on the GPU.
#
#     OUT=/some/dir GPU_BUDGET_S=180 bash experiments/gpu/fpdt_check.sh
#
# $OUT ends with summary.txt, fpdt_block_<gpu>.csv, fpdt_block_<gpu>_timeline.{csv,png} and
# logs.tar.gz. Exit status 0 if every step passed.
OUT_DEFAULT=experiments/results/gpu_fpdt_check
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"

environment >/dev/null
gpu=$(gpu_slug)
KEEP_FILES="fpdt_block_$gpu.csv fpdt_block_${gpu}_timeline.csv fpdt_block_${gpu}_timeline.png"
smoke_or_exit

timeout 120 python3 -m experiments.bench_fpdt_block --seq-lens 8192 --chunk-tokens 2048 --reps 1 --no-timeline \
    --out "$OUT/warm_fpdt.csv" >"$OUT/warm_fpdt.log" 2>&1 &
warm=$!
# shellcheck disable=SC2086  # PYTEST_SELECT is a list of node ids or options
step pytest_gpu "${PYTEST_LIMIT_S:-90}" pytest_gpu.log 0 python3 -m pytest -m gpu -v -rf -n 12 -p no:cacheprovider --timeout=120 \
    ${PYTEST_SELECT:-tests/test_attention.py tests/test_gpu_pipeline.py} -k "${PYTEST_K:-fp32 or chunked or fpdt}"
wait "$warm"
note "=== FPDT compile warm-up: exit $?"

# shellcheck disable=SC2086
step fpdt_block 120 fpdt_block.log 0 python3 -m experiments.bench_fpdt_block --seq-lens "${FPDT_S:-131072}" \
    --chunk-tokens ${FPDT_C:-32768 65536} --reps 2 --out "$OUT/fpdt_block_$gpu.csv"

note "=== done: status $status"
pack_out
exit "$status"

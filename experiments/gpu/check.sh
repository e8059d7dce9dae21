#!/usr/bin/env bash
# The first prepared GPU check (at most ~8 minutes, one GPU): kernels and the FPDT pipeline.
#   1. smoke: import, one tiny flash_attention forward+backward vs the float64 reference (~20 s);
#   2. the kernels' compile check on this box's Triton (registers, spills, shared memory);
#   3. the bf16 GPU tests: the kernel matrix (odd shapes up to 4K), GQA, chunked and packed
#      documents, softmax scale, and the pipeline tests (offload on/off bit-identical with delayed
#      copies, side streams allocate nothing), on 12 workers so Triton compiles in parallel;
#      meanwhile the pipeline under TORCH_CUDA_SANITIZER=1 (naive backend) and four processes
#      that compile the benchmark's kernels into Triton's on-disk cache;
#   4. the attention table vs SDPA (bf16, d in {128, 64}, S 1K-16K, causal and not), alone on the GPU;
#   5. flash_attention's forward+backward memory peak beside SDPA's at S=16K;
#   6. the FPDT block at S=128K: offload vs on-device step time, peak/reserved memory, a timeline;
#   7. the fp16 and fp32 (tf32x3) GPU tests, with the time left.
#
#     OUT=/some/dir FPDT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu/check.sh   # GPU_BUDGET_S=470
#
# $OUT ends with at most 8 files: summary.txt (one line per step: exit status, seconds),
# bench_attention_<gpu>.csv, fpdt_block_<gpu>.csv, fpdt_block_<gpu>_timeline.{csv,png}, and
# logs.tar.gz (every log: env, smoke, compile check, pytest, sanitizer, benchmarks, FPDT block).
# Exit status 0 if every step passed.
OUT_DEFAULT=experiments/results/gpu_check
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"

environment
gpu=$(gpu_slug)
KEEP_FILES="bench_attention_$gpu.csv fpdt_block_$gpu.csv fpdt_block_${gpu}_timeline.csv fpdt_block_${gpu}_timeline.png"

# Compile the benchmark's kernels while the tests run: Triton caches compiled kernels on disk, so
# the timed run later only autotunes (autotune choices are not cached: they are made alone).
mkdir -p "$OUT/warm"
warmers=()
for d in 128 64; do
    for causal in true false; do
        timeout 240 python3 -m experiments.bench_attention --quick --seq-lens 1024 --tokens 1024 --head-dims "$d" \
            --causal "$causal" --modes fwd_bwd --out "$OUT/warm/d${d}_$causal.csv" >"$OUT/warm/d${d}_$causal.log" 2>&1 &
        warmers+=($!)
    done
done

smoke_or_exit
step compile_check 60 compile_check.log 0 python3 -m fpdt_kernels.compile_check --quick --jobs 16

(
    timeout 150 env TORCH_CUDA_SANITIZER=1 FPDT_ATTENTION_BACKEND=naive python3 -m pytest -q -n 0 -p no:cacheprovider \
        tests/test_gpu_pipeline.py -k "sanitizer or host_checkpoints" >"$OUT/sanitizer.log" 2>&1
    echo "exit $?" >>"$OUT/sanitizer.log"
) &
sanitizer=$!

# Only these files carry GPU cases; collecting the rest would need hydra there. bf16 and the
# pipeline first (the dtype models train in); fp16/fp32 at the end, with what time is left.
# The kernel tests run on CUDA as they are (their device is CUDA when there is one), GPU-only cases included.
step pytest_gpu_bf16 150 pytest_gpu_bf16.log 0 python3 -m pytest -v -rf -n 12 -p no:cacheprovider --timeout=120 \
    tests/test_attention.py tests/test_kernels_varlen.py tests/test_gpu_pipeline.py \
    -k "bf16 or chunked or gqa or softmax_scale or fpdt or varlen"

wait "$sanitizer"
note "=== sanitizer (TORCH_CUDA_SANITIZER=1, naive backend): $(tail -n 1 "$OUT/sanitizer.log")"
for pid in "${warmers[@]}"; do wait "$pid"; done
note "=== cache warm-up: $(grep -l 'FAILED' "$OUT"/warm/*.log 2>/dev/null | wc -l) of ${#warmers[@]} logs report a failure"

step bench 180 bench.log 0 python3 -m experiments.bench_attention --out "$OUT/bench_attention_$gpu.csv"

step attention_memory 40 attention_memory.log 0 python3 -m experiments.bench.attention_memory --seq-len 16384

step fpdt_block 100 fpdt_block.log 0 python3 -m experiments.bench_fpdt_block --seq-lens 131072 --reps 2 \
    --out "$OUT/fpdt_block_$gpu.csv"

step pytest_gpu_fp16_fp32 150 pytest_gpu_fp16_fp32.log 0 python3 -m pytest -v -rf -n 14 -p no:cacheprovider --timeout=120 \
    tests/test_attention.py tests/test_kernels_varlen.py -k "fp16 or fp32"

note "=== done: status $status"
pack_out
exit "$status"

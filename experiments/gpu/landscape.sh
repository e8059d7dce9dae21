#!/usr/bin/env bash
# The kernel landscape in one GPU window (at most ~7 minutes, one GPU):
#   1. smoke (as every prepared script);
#   2. the GPU kernel and pipeline tests (the TMA tiles' and Inductor's around our op too), each failure named as it happens (-v, -rf, junit XML),
#      while four processes compile every autotune config of the benchmark's kernels into Triton's
#      on-disk cache (so the timed steps below only run them);
#   3. alone on the GPU: ours (the split backward, the default, and the fused one:
#      deterministic=False), SDPA-FA2 and cuDNN side by side (bf16, S=16K, d 128 and 64, causal and not, fwd and bwd);
#   4. alone on the GPU: every autotune config of each kernel (fwd, dK/dV, dQ, fused) at d 128/64, S=16K,
#      the tensor-descriptor (tma, tma ws) tiles included;
#   5. step 3 again with FPDT_TMA=1 (autotune may pick those tiles; rows ours_triton_tma, ...);
#   6. with LANDSCAPE_FPDT=1 and what time is left: the FPDT attention block at S=64K (scale.sh's
#      part `block` measures it in a window of its own).
#
#     OUT=/some/dir FPDT_COMMIT=$(git rev-parse --short=12 HEAD) bash experiments/gpu/landscape.sh
#     LANDSCAPE_TESTS="tests/test_attention.py -k sk1" LANDSCAPE_TMA=0 GPU_BUDGET_S=200 bash ...   # shorter
#
# $OUT ends with summary.txt, bench_attention_<gpu>.csv, bench_attention_tma_<gpu>.csv,
# kernel_configs_<gpu>.csv, junit_gpu_<gpu>.xml (fpdt_block_<gpu>.csv) and logs.tar.gz. Exit
# status 0 if every step passed.
OUT_DEFAULT=experiments/results/gpu_landscape
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"

environment >/dev/null
gpu=$(gpu_slug)
KEEP_FILES="bench_attention_$gpu.csv bench_attention_tma_$gpu.csv kernel_configs_$gpu.csv junit_gpu_$gpu.xml fpdt_block_$gpu.csv"
smoke_or_exit

# What to run (defaults: the whole landscape). LANDSCAPE_TESTS: pytest arguments (node ids or
# -k); LANDSCAPE_KERNELS: the kernels whose autotune configs are timed; LANDSCAPE_TMA=0 skips
# the second table (FPDT_TMA=1); LANDSCAPE_FPDT=1 adds the FPDT block.
TESTS=${LANDSCAPE_TESTS:-tests/test_attention.py tests/test_attention_tma.py tests/test_attention_compile.py tests/test_kernels_varlen.py tests/test_gpu_pipeline.py -k "bf16 or fp32 or varlen or fpdt or gqa or chunked or docs or tma or inductor"}
KERNELS=${LANDSCAPE_KERNELS:-fwd,fwd_scale_first,dkdv,dq,fused}

mkdir -p "$OUT/warm"
warmers=()
for d in 128 64; do
    for causal in true false; do
        timeout "${WARM_LIMIT_S:-200}" python3 -m experiments.bench.kernel_configs --compile-only --head-dims "$d" \
            --causal "$causal" --kernels "$KERNELS" >"$OUT/warm/configs_d${d}_$causal.log" 2>&1 &
        warmers+=($!)
    done
done

# Each failure named as it lands (-v), repeated at the end (-rf), kept as XML.
eval "set -- $TESTS"
step pytest_gpu "${PYTEST_LIMIT_S:-200}" pytest_gpu.log 0 python3 -m pytest -v -rf -n "${PYTEST_WORKERS:-10}" \
    -p no:cacheprovider --timeout=120 --junitxml="$OUT/junit_gpu_$gpu.xml" "$@"
grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
grep -E "^E   " "$OUT/pytest_gpu.log" | head -20 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
for pid in "${warmers[@]}"; do wait "$pid"; done
note "=== config warm-up: $(grep -c Error "$OUT"/warm/*.log | tr '\n' ' ')"

step bench 120 bench.log 0 python3 -m experiments.bench_attention --seq-lens 16384 --head-dims 128,64 \
    --modes fwd,bwd --out "$OUT/bench_attention_$gpu.csv"
step kernel_configs 120 kernel_configs.log 0 python3 -m experiments.bench.kernel_configs --kernels "$KERNELS" \
    --out "$OUT/kernel_configs_$gpu.csv"
if [ "${LANDSCAPE_TMA:-1}" = 1 ]; then
    step bench_tma 150 bench_tma.log 0 env FPDT_TMA=1 python3 -m experiments.bench_attention --seq-lens 16384 \
        --head-dims 128,64 --modes fwd,bwd --out "$OUT/bench_attention_tma_$gpu.csv"
fi
if [ "${LANDSCAPE_FPDT:-0}" = 1 ]; then
    step fpdt_block 90 fpdt_block.log 0 python3 -m experiments.bench_fpdt_block --seq-lens 65536 \
        --chunk-tokens 16384 --reps 2 --no-timeline --out "$OUT/fpdt_block_$gpu.csv"
fi

note "=== done: status $status"
pack_out
exit "$status"

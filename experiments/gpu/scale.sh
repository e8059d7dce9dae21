#!/usr/bin/env bash
# FPDT at scale on one GPU: what the CPU cannot show. Parts (SCALE_PARTS, default all three;
# the three together need about 9 minutes on an H200, so a lease call runs them in two goes):
#   overhead  llama3.2-1b, local and fpdt (u=4) at 64K tokens, one timed step each after one
#             warm-up step (the target: fpdt's step at most 1.10x local's; ~60 s and ~95 s wall
#             on an H200, autotuning included). local needs ~110 GiB there, so a GPU with less
#             memory (an 80 GB H100) compares them at 32K, where local fits (~62 GiB);
#             OVERHEAD_SEQ_LEN overrides;
#   million   one step of llama3.2-1b with 2 layers, fpdt, 32K chunks, at one million tokens (the
#             planner predicts 28 GiB device, 30 GiB host, ~125 s; the host-kept checkpoints
#             grow 4 GiB per layer at 1M tokens, so 16 layers need ~86 GiB of host RAM);
#   block     llama3.2-1b's attention block (32 query heads, 8 KV heads, d=64) at 64K, u=4: step
#             time without offload and with it in each backward order (kv: the paper's; query:
#             what auto picks for this GQA model), and the per-stream timeline of each (where the
#             overhead goes: copies, all-to-alls and compute per stream).
#
#     OUT=/some/dir SCALE_PARTS="overhead block" bash experiments/gpu/scale.sh
#     OUT=/some/dir SCALE_PARTS=million bash experiments/gpu/scale.sh
#
# Needs hydra-core/omegaconf/antlr4 wheels in .wheels/ (see experiments.sh). $OUT ends with
# summary.txt, rows_<gpu>.csv (every row of overhead and million), fpdt_block_<gpu>*.csv/png and
# logs.tar.gz.
OUT_DEFAULT=experiments/results/gpu_scale
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"

environment >/dev/null
gpu=$(gpu_slug)
KEEP_FILES="rows_$gpu.csv fpdt_block_$gpu.csv"
for order in kv query; do
    KEEP_FILES+=" fpdt_block_${gpu}_timeline_$order.csv fpdt_block_${gpu}_timeline_$order.png"
done
install_wheels || { note "=== hydra unavailable: stopping"; pack_out; exit 1; }
smoke_or_exit

PARTS=" ${SCALE_PARTS:-overhead million block} "
mem_gib=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
OVERHEAD_SEQ_LEN=${OVERHEAD_SEQ_LEN:-$([ "${mem_gib:-0}" -ge 120 ] && echo 65536 || echo 32768)}
note "=== a ${mem_gib:-?} GiB GPU: the overhead part compares local and fpdt at seq_len=$OVERHEAD_SEQ_LEN"
runs=()
if [[ $PARTS == *" overhead "* ]]; then
    step overhead 240 overhead.log 0 python3 -m experiments.run -m model=llama3.2-1b parallel=local,fpdt \
        "seq_len=$OVERHEAD_SEQ_LEN" chunks=4 gpus=1 steps=1 warmup_steps=1 timeout_s=150 "hydra.sweep.dir=$OUT/overhead"
    runs+=("$OUT/overhead/results.csv")
fi
if [[ $PARTS == *" million "* ]]; then
    step million 300 million.log 0 python3 -m experiments.run model=llama3.2-1b model.n_layers=2 parallel=fpdt \
        gpus=1 seq_len=1048576 chunks=32 steps=1 warmup_steps=0 timeout_s=280 "hydra.run.dir=$OUT/million"
    runs+=("$OUT/million/results.csv")
fi
if [ "${#runs[@]}" -gt 0 ]; then  # one table of every row (the header once)
    awk 'FNR > 1 || NR == 1' "${runs[@]}" >"$OUT/rows_$gpu.csv" 2>/dev/null
    cat "$OUT"/*.log 2>/dev/null | grep -E "\] (ok|oom|error|timeout)" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
fi
if [[ $PARTS == *" block "* ]]; then
    step fpdt_block 150 fpdt_block.log 0 python3 -m experiments.bench_fpdt_block --seq-lens 65536 \
        --chunk-tokens 16384 --heads 32 --kv-heads 8 --head-dim 64 --backward-orders kv query --reps 3 \
        --out "$OUT/fpdt_block_$gpu.csv"
fi

note "=== done: status $status"
pack_out
exit "$status"

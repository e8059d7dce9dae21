#!/usr/bin/env bash
# FPDT at scale on one GPU (~8 minutes at most): what the CPU cannot show.
#   1. smoke (as every prepared script);
#   2. the pipeline's overhead: llama3.2-1b, local and fpdt (u=4) at 64K tokens, 2 timed steps each
#      (the target: fpdt's step time at most 1.10x local's);
#   3. one million tokens: llama3.2-1b with 2 layers, fpdt, 32K chunks, one step (the planner
#      predicts 32 GiB device, 38 GiB host, ~130 s; the host-kept checkpoints grow 4 GiB per layer
#      at 1M tokens, so 16 layers need ~94 GiB of host RAM);
#   4. with what time is left: the FPDT attention block's per-stream timeline at 64K (where the
#      overhead of step 2 goes: copies, all-to-alls and compute per stream).
#
#     OUT=/some/dir bash experiments/gpu/scale.sh
#
# Needs hydra-core/omegaconf/antlr4 wheels in .wheels/ (see experiments.sh). $OUT ends with
# summary.txt, rows_<gpu>.csv (every row of steps 2-3), fpdt_block_<gpu>*.csv/png and logs.tar.gz.
OUT_DEFAULT=experiments/results/gpu_scale
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"

environment >/dev/null
gpu=$(gpu_slug)
KEEP_FILES="rows_$gpu.csv fpdt_block_$gpu.csv fpdt_block_${gpu}_timeline.csv fpdt_block_${gpu}_timeline.png"
install_wheels || { note "=== hydra unavailable: stopping"; pack_out; exit 1; }
smoke_or_exit

step overhead 200 overhead.log 0 python3 -m experiments.run -m model=llama3.2-1b parallel=local,fpdt \
    seq_len=65536 chunks=4 gpus=1 steps=2 warmup_steps=1 timeout_s=95 "hydra.sweep.dir=$OUT/overhead"
step million 230 million.log 0 python3 -m experiments.run model=llama3.2-1b model.n_layers=2 parallel=fpdt \
    gpus=1 seq_len=1048576 chunks=32 steps=1 warmup_steps=0 timeout_s=220 "hydra.run.dir=$OUT/million"
# One table of every row (the header once).
awk 'FNR > 1 || NR == 1' "$OUT"/overhead/results.csv "$OUT"/million/results.csv >"$OUT/rows_$gpu.csv" 2>/dev/null
grep -hE " ok | oom | error | timeout " "$OUT/overhead.log" "$OUT/million.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"

step fpdt_block 90 fpdt_block.log 0 python3 -m experiments.bench_fpdt_block --seq-lens 65536 \
    --chunk-tokens 16384 --reps 1 --out "$OUT/fpdt_block_$gpu.csv"

note "=== done: status $status"
pack_out
exit "$status"

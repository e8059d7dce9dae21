#!/usr/bin/env bash
# The prepared GPU run for the model (~8 minutes at most, one GPU):
#   1. smoke (as every prepared script);
#   2. a short seq_len sweep of llama3.2-1b, fpdt vs ulysses on one GPU (MFU, memory);
#   3. max_seqlen for both strategies (capped by search.limit and timeouts to fit the budget).
#
#     OUT=/some/dir bash experiments/gpu/experiments.sh
#
# The device box has no internet and no Hydra: carry hydra-core/omegaconf/antlr4 wheels in .wheels/
#   pip download --no-deps -d .wheels hydra-core omegaconf
#   pip wheel --no-deps -w .wheels antlr4-python3-runtime==4.9.3     # sdist only on PyPI
# $OUT ends with summary.txt, sweeps.tar.gz (the two sweep directories) and logs.tar.gz.
OUT_DEFAULT=experiments/results/gpu_experiments
# shellcheck source=experiments/gpu/common.sh
source "$(dirname "$0")/common.sh"
KEEP_FILES="sweeps.tar.gz"

environment >/dev/null
install_wheels || { note "=== hydra unavailable: stopping"; pack_out; exit 1; }
smoke_or_exit

step sweep 200 sweep.log 0 python3 -m experiments.run -m model=llama3.2-1b parallel=ulysses,fpdt chunks=4 gpus=1 \
    seq_len=16384,32768,65536 steps=3 warmup_steps=1 timeout_s=90 "hydra.sweep.dir=$OUT/sweep"
step max_seqlen 200 max_seqlen.log 0 python3 -m experiments.max_seqlen -m model=llama3.2-1b parallel=ulysses,fpdt \
    chunks=8 gpus=1 search.start=65536 search.limit=524288 search.resolution=0.25 steps=1 warmup_steps=1 \
    timeout_s=60 "hydra.sweep.dir=$OUT/max_seqlen"
tar -czf "$OUT/sweeps.tar.gz" -C "$OUT" sweep max_seqlen 2>/dev/null && rm -rf "$OUT/sweep" "$OUT/max_seqlen"
note "=== done: status $status"
pack_out
exit "$status"

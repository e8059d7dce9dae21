# Shared by the prepared GPU scripts (sourced, not run): $OUT, a deadline, a `step` runner, the
# smoke test, wheel installs and the packing of $OUT into a few files.
#
# Usage in a script: OUT_DEFAULT=experiments/results/<name>; source "$(dirname "$0")/common.sh"
# GPU boxes may have a `python` without torch: every command here uses python3.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$OUT_DEFAULT}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Works without an install (the tree is importable from its root).
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The whole script ends within GPU_BUDGET_S seconds (default 470, under an 8-minute lease call):
# each step's timeout is cut to what is left, and a step with under 10 s left is skipped.
DEADLINE=$((SECONDS + ${GPU_BUDGET_S:-470}))
status=0
: >"$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

step() {  # step NAME SECONDS LOG OK_RCS CMD...: run CMD under a timeout into LOG, record the result.
    local name=$1 limit=$2 log=$3 ok_rcs=$4
    shift 4
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
        note "=== $name: SKIPPED (only ${left}s of the script's budget left)"
        status=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS rc
    note "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    rc=$?
    tail -n 40 "$OUT/$log"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note "    (timed out)"
    note "    $name: exit $rc after $((SECONDS - start))s"
    case " $ok_rcs " in *" $rc "*) return 0 ;; *) status=1 ;; esac
    return 1
}

environment() {  # what the box has, into env.txt
    {
        date -u
        nvidia-smi || true
        python3 --version
        python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "pytest", "xdist", "numpy", "hydra", "omegaconf", "matplotlib"):
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
}

install_wheels() {  # pure-Python packages the box lacks (hydra-core, omegaconf, antlr4), carried in .wheels/
    if python3 -c "import hydra, omegaconf" 2>/dev/null; then return 0; fi
    if [ ! -d .wheels ]; then
        note "    hydra/omegaconf missing and no .wheels/ folder carried"
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fpdt_site .wheels/*.whl \
        >"$OUT/install.log" 2>&1 || { note "    wheel install failed (install.log)"; return 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/fpdt_site"
}

gpu_slug() {  # e.g. nvidia_h200: the GPU's name as it goes into result file names
    python3 -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))"
}

smoke_or_exit() {  # the 20-second check: a broken install ends the script here, not at a timeout
    if ! step smoke 60 smoke.log 0 env FPDT_AUTOTUNE=0 python3 -m experiments.gpu.smoke; then
        note "=== smoke test failed: stopping"
        pack_out
        exit 1
    fi
}

pack_out() {  # keep KEEP_FILES (globs) as they are; everything else under $OUT goes into logs.tar.gz
    local keep=" summary.txt ${KEEP_FILES:-} "
    local pack=()
    for f in "$OUT"/*; do
        local base
        base=$(basename "$f")
        case "$keep" in *" $base "*) continue ;; esac
        pack+=("$base")
    done
    if [ "${#pack[@]}" -gt 0 ]; then
        tar -czf "$OUT/logs.tar.gz" -C "$OUT" "${pack[@]}" && (cd "$OUT" && rm -rf "${pack[@]}")
    fi
    ls -la "$OUT"
}

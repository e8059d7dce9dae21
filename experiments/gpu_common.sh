# Shared by the prepared GPU scripts (sourced, not run): $OUT set up and a `step` runner.
# Usage in a script: OUT_DEFAULT=experiments/results/<name>; source "$(dirname "$0")/gpu_common.sh"
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$OUT_DEFAULT}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Works even if the editable install fails (the tree is importable from its root).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
: >"$OUT/summary.txt"

step() {  # step NAME SECONDS LOG OK_RCS CMD...: run CMD under a timeout into LOG, record the result.
    local name=$1 limit=$2 log=$3 ok_rcs=$4
    shift 4
    local start=$SECONDS rc
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    rc=$?
    tail -n 60 "$OUT/$log"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo "    (timed out)" | tee -a "$OUT/summary.txt"
    echo "    $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    case " $ok_rcs " in *" $rc "*) ;; *) status=1 ;; esac
}

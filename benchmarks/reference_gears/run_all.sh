#!/usr/bin/env bash
# Reference GEARS side of the issue-7 benchmark: venv, export, offline run, JSON results.
# Usage: bash benchmarks/reference_gears/run_all.sh [norman] [sim20k] [tiny]   (default: norman sim20k)
# N_PREDICT=50 predicts only the first 50 of the 500 doubles and extrapolates (the reference's
# predict() does the same work for each perturbation; all 500 take hours on a contended 2-core machine).
# REF_ARGS is passed on to run_reference.py, e.g. REF_ARGS="--max-train-steps 60 --max-eval-batches 40".
# The committed results came from:
#   norman: N_PREDICT=50; sim20k: N_PREDICT=30 REF_ARGS="--max-train-steps 60 --max-eval-batches 40"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
venv=benchmarks/work/ref-venv
data=benchmarks/work/ref_data
logs=benchmarks/work/logs
mkdir -p "$data" "$logs" benchmarks/results
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import gears" 2>/dev/null || bash benchmarks/reference_gears/setup_venv.sh "$venv"

datasets=("$@")
[ ${#datasets[@]} -eq 0 ] && datasets=(norman sim20k)
for name in "${datasets[@]}"; do
    case "$name" in
        norman) src=(norman) ;;
        sim20k) src=(simulated --n-genes 2000 --n-singles 60 --n-doubles 40 --cells-per-perturbation 190 --n-control 1000) ;;
        tiny) src=(tiny) ;;
        *) echo "unknown dataset $name (norman, sim20k, tiny)" >&2; exit 2 ;;
    esac
    .venv/bin/python benchmarks/reference_gears/export_inputs.py "${src[@]}" --out "$data/$name" \
        > "$logs/export_$name.log" 2>&1
    "$venv/bin/python" benchmarks/reference_gears/run_reference.py --data-dir "$data/$name" \
        --n-predict "${N_PREDICT:-500}" ${REF_ARGS:-} --out "benchmarks/results/reference_gears_$name.json" > "$logs/$name.log" 2>&1
    echo "wrote benchmarks/results/reference_gears_$name.json"
done

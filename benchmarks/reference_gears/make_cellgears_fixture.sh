#!/usr/bin/env bash
# Make the committed cell-gears test fixture (tests/data/cellgears_fixture/) from our simulator's data.
#
# 1. our venv: a small simulated screen exported in the reference's input format (export_inputs.py);
# 2. the reference venv (setup_venv.sh): cell-gears processes it, makes its own simulation split,
#    trains two small models (with and without uncertainty), saves them with its own save_model and
#    saves its predictions (make_cellgears_fixture.py).
# Usage (from the repository root): bash benchmarks/reference_gears/make_cellgears_fixture.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ours="${OUR_PYTHON:-$root/.venv/bin/python}"
ref="${REF_PYTHON:-$root/benchmarks/work/ref-venv/bin/python}"
work="$root/benchmarks/work/ref_data/cellgears_fixture"
cd "$root"
OMP_NUM_THREADS=1 PYTHONPATH=src "$ours" benchmarks/reference_gears/export_inputs.py simulated \
    --n-genes 120 --n-singles 12 --n-doubles 10 --cells-per-perturbation 25 --n-control 150 \
    --n-predict 20 --n-gi 2 --seed 0 --out "$work"
OMP_NUM_THREADS=1 "$ref" benchmarks/reference_gears/make_cellgears_fixture.py \
    --data-dir "$work" --out tests/data/cellgears_fixture --epochs 2 --hidden-size 16 --seed 0
OMP_NUM_THREADS=1 "$ref" benchmarks/reference_gears/cellgears_float64.py \
    --fixture tests/data/cellgears_fixture --out tests/data/cellgears_fixture/predictions_float64.npz

#!/usr/bin/env bash
# Create the isolated virtual environment in which the reference GEARS (PyPI `cell-gears`) runs.
#
# It is never a dependency of pertpy-gnn: it lives in benchmarks/work/ref-venv (git-ignored).
# Usage: bash benchmarks/reference_gears/setup_venv.sh [VENV_DIR]
#
# Pins, each for a known trap of the reference:
#   torch==2.13.0        an unconstrained torch pulls a multi-GB CUDA build; this is the CPU wheel
#   torch-geometric      imported by gears but not declared as a dependency of cell-gears
#   scipy<1.15           cell-gears 0.1.2 crashes with scipy >= 1.15
#   cell-gears==0.1.2    the version whose source the harness was written against
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/../work/ref-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet \
    'cell-gears==0.1.2' 'torch==2.13.0' 'torch-geometric' 'scipy<1.15' 'anndata' 'psutil'
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("cell-gears", "torch", "torch-geometric", "scipy", "anndata", "scanpy", "numpy", "pandas"):
    print(f"{p}=={md.version(p)}")
PY

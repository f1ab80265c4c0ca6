# Quick start:  `make demo` (main job on the embedded simulated screen)  and  `make test`.
# `make tutorials` re-executes the tutorial notebooks on the real data and keeps their outputs.
# Both create .venv and install the package with everything it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/demo
DATA ?=
# On machines without an NVIDIA driver the CPU build of torch is installed first, so that the
# unpinned `torch` dependency does not pull a multi-GB CUDA build. Elsewhere set e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to take the CPU wheel from PyTorch's index.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install demo test docs lint bench clean tutorials

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip install -q "$(TORCH_CPU_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m pertpy_gnn run --out $(OUT) $(if $(DATA),--data $(DATA))

test: install
	$(BIN)/python -m pytest -q

docs: install
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

# Re-execute the tutorials in place on the real data (../shared/data), keeping their outputs for the docs
tutorials: install
	cd tutorials && for nb in *.ipynb; do \
		PYTHONPATH=$(CURDIR)/src OMP_NUM_THREADS=1 $(abspath $(BIN))/jupyter execute --inplace --timeout=3600 $$nb || exit 1; \
	done

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) docs/_build results .pytest_cache

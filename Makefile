# Each target sets itself up on a fresh machine: a virtual environment in .venv with the package installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that CI pins; a GPU user may pass e.g. TORCH="torch==2.13.0" from the CUDA index.
TORCH ?= torch==2.13.0

.PHONY: demo test bench

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	WANDB_MODE=offline $(BIN)/python examples/demo.py

test: $(BIN)/.installed
	WANDB_MODE=offline $(BIN)/python -m pytest --durations=25
	WANDB_MODE=offline $(BIN)/python -m pytest -m soak

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/stragglers.py

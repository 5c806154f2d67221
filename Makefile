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

# Tests at a time (pytest-xdist): most of a multi-process test is waiting (imports, gloo, timeouts), so two share
# 2 cores well (measured: 28 min against 38 one at a time); 1 runs them one by one.
TEST_WORKERS ?= 2

# The soak tests (4 min, left out of a plain `pytest`) run beside the rest: alone they did 96 epochs a minute where
# they ask for 10.
test: $(BIN)/.installed
	WANDB_MODE=offline $(BIN)/python -m pytest -n $(TEST_WORKERS) -m "soak or not soak" --durations=25

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/stragglers.py

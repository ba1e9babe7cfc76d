# Quick start: `make zoo` (install, then train/evaluate/card every method into zoo/) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch that the pyproject range admits; a newer or unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2

.PHONY: install zoo test bench clean

# setup.py too: it maps model_cards/ into the package, which an editable install records when installed.
$(BIN)/hfpapers: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/hfpapers

install: $(BIN)/hfpapers

zoo: install
	$(BIN)/hfpapers zoo build

# Two workers, one thread each (two 2-thread workers would fight over the 2 cores); a file's tests stay on one
# worker, so its module fixtures are built once.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: install
	$(BIN)/python evaluation/benchmarks/throughput.py

clean:
	rm -rf $(VENV) zoo

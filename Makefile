# Two commands (see README): `make demo` sets up and runs the whole demo workflow; `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# rules call the `ctgen`/`ctprep` commands of this environment
export PATH := $(abspath $(BIN)):$(PATH)
PROFILE ?= workflow/profiles/local
TORCH ?= 2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH)  # the pinned build first: a bare `torch` pulls GBs of CUDA wheels
	$(BIN)/pip install --quiet -e '.[models,minilm,workflow,dev]'
	touch $@

demo: setup
	$(BIN)/snakemake --workflow-profile $(PROFILE)

test: setup
	$(BIN)/snakemake --lint
	$(BIN)/pytest

lint: setup
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

bench: setup
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf results resources/demo .snakemake

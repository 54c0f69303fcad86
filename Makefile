# Two commands (see README): `make demo` sets up and runs the whole demo workflow; `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= workflow/profiles/local

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[workflow,dev]'
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

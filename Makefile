# Two commands (see README): `make demo` sets up and runs the whole demo workflow; `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# rules call the `ctgen`/`ctprep` commands of this environment
export PATH := $(abspath $(BIN)):$(PATH)
PROFILE ?= workflow/profiles/local
TORCH ?= 2.13.0
# where torch comes from: pip's configured index by default (PyPI's Linux wheels are CUDA builds, GBs of them);
# a CPU-only machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TEST_WORKERS ?= 3  # make test: pytest worker processes, one more than 2 cores (tests/conftest.py: why, what shares one)

.PHONY: setup demo test lint bench clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))  # before the rest: its `torch` is then this one
	$(BIN)/pip install --quiet -e '.[models,minilm,workflow,dev]'
	touch $@

demo: setup
	$(BIN)/snakemake --workflow-profile $(PROFILE)

# OMP_WAIT_POLICY=PASSIVE: three workers share 2 cores, and an OpenMP thread that spins while it waits takes
# a core from the others; the 2-thread report2ct step beside two busy processes took 45 s instead of 31 s
# (a quarter of its latent; alone 15.7 s passive vs 16.7 s spinning, 2026-12-05)
# nice -n 5: the test Slurm cluster's jobs run at niceness 0 (tests/slurm/cluster.sh), ahead of the workers
# where the kernel does not already share the CPU by session: the tiny demo's chain of short jobs waits on
# each, the other tests are long and fill what it leaves
test: setup browser
	$(BIN)/snakemake --lint
	OMP_WAIT_POLICY=PASSIVE nice -n 5 $(BIN)/pytest -n $(TEST_WORKERS)

# tests/workflow/test_report.py opens the demo's report in headless Chromium: found on PATH, or installed
# with apt-get where this runs as root; elsewhere those tests are skipped and the line below says so
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	echo "note: chromium is not installed: the browser tests of tests/workflow/test_report.py are skipped (apt-get install chromium)"

lint: setup
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

# the benchmarks that check a target (each exits 1 on a miss), all run, then a miss fails make: minutes on 2 cores
bench: setup
	@status=0; \
	$(BIN)/python benchmarks/prep_scale.py || status=1; \
	$(BIN)/python benchmarks/train_stream.py || status=1; \
	$(BIN)/python benchmarks/evaluate_scale.py --n 2 || status=1; \
	exit $$status

clean:
	rm -rf results resources/demo .snakemake checkpoints

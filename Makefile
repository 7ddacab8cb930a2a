# make run   - set up .venv if needed and run the default study; prints the report's path
# make test  - set up .venv if needed and run the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
BROWSER := $(VENV)/.browser
# root installs system packages itself; anyone else through sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# jobs call `python -m batchscope`: put the venv first on PATH
export PATH := $(BIN):$(PATH)

BENCH_VENV := benchmarks/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: install run test lint format bench bench-env clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first, pinned, and only when absent: an unpinned torch (or a range admitting a newer release)
	@# pulls the CUDA build with gigabytes of dependencies; an existing (e.g. CUDA) torch is kept
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev,slurm]'
	touch $@

# The report test opens the report in Debian's Chromium through Playwright (never Playwright's own browser
# download); installed here when missing, so a fresh clone's `make test` has it.
$(BROWSER): $(STAMP)
	@dpkg -s chromium chromium-driver >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	touch $@

install: $(STAMP)

run: $(STAMP)
	snakemake --cores all
	@echo "report: $(abspath results/report/report.html)"

test: $(STAMP) $(BROWSER)
	python -m pytest

lint: $(STAMP)
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile workflow/rules
	snakemake --lint
	snakemake --lint --configfile config/test/adaptive.yaml  # the adaptive study's own rules

format: $(STAMP)
	ruff check --fix .
	ruff format .
	snakefmt Snakefile workflow/rules

# The Hessian benchmark compares with PyHessian and curvlinops: they go into benchmarks/.venv, which sees the
# project's venv (a .pth line) and adds them without dependencies (curvlinops' would replace the CPU torch);
# nothing is installed into the project's environment.
$(BENCH_STAMP): $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(BIN)/python -m venv $(BENCH_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" > \
		"$$($(BENCH_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/project-venv.pth"
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -e . pyhessian==0.1 \
		curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einconv linear_operator jaxtyping wadler_lindig einops \
		opt-einsum unfoldNd
	touch $@

bench-env: $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	python benchmarks/pipeline.py
	python benchmarks/stability.py
	$(BENCH_VENV)/bin/python benchmarks/hessian.py
	python benchmarks/ghostbn.py
	python benchmarks/noise.py
	python benchmarks/memory.py

clean:
	rm -rf results logs .snakemake

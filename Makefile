# Two entry points (README quick start): `make results` and `make test`; `make report` rebuilds the HTML report.
# Both create .venv on first use and install the pinned CPU stack from pyproject.toml.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CORES   ?= all
REPORT  := results/report.html
# A config file over config/config.yaml (snakemake --configfile), e.g. config/seeds.yaml; none by default.
CONFIGFILE ?=
SNAKE_CONFIG := $(if $(CONFIGFILE),--configfile $(CONFIGFILE))
# Reproducible CPU runs: one BLAS pool per library, sized to the machine; never reach the Hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Rules call the `sftrl` CLI: put the venv first on PATH for every job Snakemake starts.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install results results-seeds report report-check test gpu-check lint dryrun clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import sftrl, torch, transformers, trl, snakemake"
	touch $(STAMP)

install: $(STAMP)

## Run the whole study DAG on the embedded default (config/config.yaml). Recovers by itself from an interrupted
## run: the stale lock a killed Snakemake leaves is released (scripts/unlock_stale.py: only when no live Snakemake
## works in this directory, else it stops naming it; flock: never while another `make results` runs here) and
## incomplete outputs are redone; training resumes from its saved state. Jobs are forked from one process that has
## imported torch and transformers once (sftrl.jobserver; same outputs, ~4 s less per job).
results: $(STAMP)
	@mkdir -p .snakemake
	@flock -n -E 75 .snakemake/make-results.lock $(BIN)/python -m sftrl.jobserver sh -c '$(BIN)/python scripts/unlock_stale.py && \
		$(BIN)/snakemake --cores $(CORES) $(SNAKE_CONFIG) --rerun-incomplete all && $(BIN)/snakemake --cores $(CORES) $(SNAKE_CONFIG) --report $(REPORT) --report-stylesheet workflow/report/style.css' \
		|| { rc=$$?; [ $$rc = 75 ] && echo "make results: another one is running in this directory"; exit $$rc; }
	@$(BIN)/python scripts/stage_timings.py
	@echo "make results: done. Report: $(abspath $(REPORT))  Summary: $(abspath results/SUMMARY.md)"

## The study with three replicate seeds (config/seeds.yaml; issue 28): seed 0 is the default run's, so after
## `make results` only seeds 1 and 2 run, then the across-seed claims table and figures.
results-seeds:
	$(MAKE) results CONFIGFILE=config/seeds.yaml

## The HTML report of the finished run (every figure captioned, the tables, the configuration, each result's
## rule, code and runtime), from the existing results: `snakemake --report` runs no job (--cores only because the
## report lists each rule's threads, some of which are the machine's cores).
report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) $(SNAKE_CONFIG) --report $(REPORT) --report-stylesheet workflow/report/style.css
	@echo "make report: $(abspath $(REPORT))"

## Open the report in headless Chromium (installed from Debian's packages when missing; not part of `make test`):
## no console errors, every figure decoded with its caption; screenshots beside it in report_check/.
report-check: $(STAMP)
	@test -f $(REPORT) || { echo "make report-check: no $(REPORT); run make report first"; exit 1; }
	@command -v chromium > /dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; }
	$(BIN)/python scripts/report_check.py $(REPORT) --out $(dir $(REPORT))report_check

## Unit tests, then the micro config end to end through real Snakemake. Two pytest workers (pytest-xdist) on the
## 2-core budget machine: many tests wait on single-threaded Snakemake starts and job chains, so one process left a
## core idle a third of the time. Units and order: tests/conftest.py. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder tests

## The prepared first GPU check (scripts/gpu_check.sh: ≤ 8 min on one H100 / H200, SmolLM2-135M; preparation in the
## script's header; `make gpu-check GPU_CHECK_DRY=1` runs its CPU-possible parts). Report: results/gpu_check/report.json
gpu-check: $(STAMP)
	scripts/gpu_check.sh

lint: $(STAMP)
	$(BIN)/snakemake --lint

dryrun: $(STAMP)
	$(BIN)/snakemake -n all

clean:
	rm -rf results/* logs benchmarks .snakemake .test/results .test/logs .test/benchmarks .test/.snakemake

# loopline — the two commands of the README are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# Where the CPU build of torch (torch==2.13.0+cpu, pinned in requirements.lock) lies.
FIND_LINKS ?= /opt/wheels
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast fuzz lint lock docs reference browser-deps screenshots replay replay-late backtest bench bench-bootstrap bench-scale bench-scale-50m bench-flow bench-commands bench-torch bench-serve bench-batch bench-shadow bench-soak bench-onnx bench-monitor bench-log bench-concurrent bench-dask

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python --find-links $(FIND_LINKS) requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The training flow on the bundled Bikeshare data (params.yaml), offline: Prefect + MLflow + registry;
# then the champion packaged as a Bento, served over HTTP, asked for one prediction, stopped.
run: install
	$(BIN)/loopline train
	$(BIN)/python -m serving.smoke

# Test modules are spread over $(TEST_WORKERS) worker processes (pytest-xdist), a module per
# worker at a time, the longest first (tests/conftest.py: LONGEST_FIRST). The suite keeps both
# cores busy (~88 %): a third worker measured no faster (16m25 against 16m29-16m35, 2026-12-07).
TEST_WORKERS ?= 2
# Coverage of loopline's own code in the test processes (servers it starts are not traced),
# with a floor just under what the suite reaches: `make test COVERAGE=1`, as CI runs it. The
# tracer sees every Python call in the test processes, about two minutes of the suite here.
COVERAGE ?=
COVERAGE_FLOOR ?= 82
COVERAGE_ARGS = $(if $(COVERAGE),--cov --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR))
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(COVERAGE_ARGS)

# The gate CI runs before the tests: lint, format, types, and the layer contracts.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The OpenAPI fuzz deeper than in `make test`: 500 schemathesis examples per operation and
# phase (over 1,000 requests) against a real `loopline serve`.
fuzz: install
	LOOPLINE_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest -p no:randomly tests/e2e/test_serving.py -k fuzzing

# Unit tests only (tests/unit: no DVC repro in a temp clone, no servers).
test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit

# The manual (MkDocs Material), built offline into site/; CI builds it with --strict.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The reference pages written from the code: the params models and the Typer app (a test
# fails when the committed pages are stale).
reference: install
	$(BIN)/loopline check-params --reference > docs/reference/configuration.md
	$(BIN)/typer loopline.cli utils docs --name loopline --title "Command line" --output docs/reference/cli.md

# Re-resolve requirements.lock from pyproject.toml (needs the package index).
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev -c constraints.txt --override overrides.txt --python-version 3.11 \
		--find-links $(FIND_LINKS) --no-emit-find-links -o requirements.lock

# Debian's Chromium for tests/e2e/test_browser.py (Playwright drives it; no browser download).
# Needs root; the browser tests skip, saying so, where no Chromium is found.
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The README's screenshots, from the browser tests on the full 2011 replay (run `make replay` first).
screenshots: install
	LOOPLINE_REPLAY=data/replay LOOPLINE_SCREENSHOTS=docs/results/screenshots $(BIN)/python -m pytest -p no:randomly tests/e2e/test_browser.py

# The closed loop over 2011: Jan-Mar champion, then monthly batches served, labelled,
# monitored and retrained; the timeline chart shown in the README.
replay: install
	$(BIN)/loopline replay --chart docs/results/replay-2011.png

# The same replay with each label landing 30 days after its hour: alarms from served traffic
# before the labels, retrains when they land.
replay-late: install
	$(BIN)/loopline replay --workdir data/replay-late --label-delay 30d --chart docs/results/replay-2011-30d.png

# The 2011 back-test: every policy in backtest.policies side by side, with labels at once, 7 and
# 30 days late (trainings shared); the table and chart shown in the manual.
backtest: install
	$(BIN)/loopline backtest --label-delay 0 --label-delay 7d --label-delay 30d --chart docs/results/backtest-2011.png

bench: bench-scale bench-flow bench-commands bench-torch bench-onnx bench-serve bench-batch bench-soak bench-shadow bench-monitor bench-log bench-concurrent bench-bootstrap bench-dask

# Promotion evidence: the moving-block bootstrap of 100k test rows x 1,000 resamples.
bench-bootstrap: install
	$(BIN)/python bench/bootstrap.py --rows 100000 --resamples 1000

# Scale benchmark: synthetic Bikeshare-shaped data at 1M and 10M rows, pandas and Dask side by side.
bench-scale: install
	$(BIN)/python bench/scale.py --rows 1000000 10000000 --engine pandas dask

# The Dask engine at 10M and 50M rows (a table pandas cannot hold on this machine); ~4 GB of disk.
bench-scale-50m: install
	$(BIN)/python bench/scale.py --rows 10000000 50000000 --engine dask

# Training flow vs the same functions in a plain script, at 8,645 (Bikeshare) and 1M rows.
bench-flow: install
	$(BIN)/python bench/flow_overhead.py --rows 0 1000000

# What a command costs: the first train, a 5-row score and a 300-row monitor, with the temporary
# Prefect API, against a running `loopline prefect-server`, and in its warm process.
bench-commands: install
	$(BIN)/python bench/commands.py --runs 3

# PyTorch trainer vs a bare loop (and GPU vs CPU where CUDA exists).
bench-torch: install
	$(BIN)/python bench/torch_throughput.py --rows 1000000 --epochs 3

# BentoML service vs a bare FastAPI app on the registry champion (run `make run` first).
bench-serve: install
	$(BIN)/python bench/serving.py --requests 2000 --busy

# The service with a shadow loaded against the same service without one (p99, throughput, rows skipped).
bench-shadow: install
	$(BIN)/python bench/serving.py --shadow --requests 2000

# Model -> ONNX per family: loopline's forest converter vs skl2onnx's own, with parity.
bench-onnx: install
	$(BIN)/python bench/onnx_convert.py

# Batch requests against the raw engine: /predict_batch (records) and /predict_columns (columns).
bench-batch: install
	$(BIN)/python bench/serving.py --batches --batch 1000

# Sustained load: 7 rounds of 10k requests at c=64 on one service; p99 and RSS per round.
bench-soak: install
	$(BIN)/python bench/serving.py --soak 7

# Two trainings on one machine: in series vs at once.
bench-concurrent: install
	$(BIN)/python bench/concurrent_training.py --rows 300000

# The candidate search sequential vs on 2 Dask workers, the flow with each runner, and the
# wall time with 8 and 32 workers worked out from the measured per-candidate times.
bench-dask: install
	$(BIN)/python bench/dask_search.py --workers 2

# The prediction log as a monitoring store: a 100k-row served window read from a 10M-row log
# (SQLite and PostgreSQL) and measured; a prune of 1M expired rows under load (run `make run` first).
bench-log: install
	$(BIN)/python bench/prediction_log.py --rows 10000000 --window 100000 --prune 1000000

# Monitoring flow time against reference size (100k, 1M, 5M rows) at a 10k-row window.
bench-monitor: install
	$(BIN)/python bench/monitoring.py --references 100000 1000000 5000000 --window 10000

# Development tasks for asgi_sqla.  `make help` lists the targets; every target that needs
# the virtualenv creates it (or refreshes it when pyproject.toml changed) first.
#
# Variables (override on the command line: `make run FRAMEWORK=fastapi`):
#   PYTHON        interpreter that creates the virtualenv            (python3)
#   VENV          virtualenv directory                                (.venv)
#   FRAMEWORK     `make run` serves examples/$(FRAMEWORK)_app.py:app   (starlette)
#   HOST, PORT    where `make run` listens                            (127.0.0.1, 8000)
#   DATABASE_URL  the database `make run` serves; unset, each example uses a file of its
#                 own: ./$(FRAMEWORK)_example.db (SQLite)
#   UVICORN_ARGS  extra uvicorn options, e.g. --reload
#   PYTEST_ARGS   extra pytest options, e.g. "-k websocket -x"
#   NOX_ARGS      `make test-matrix` options, e.g. "-s tests-3.12" (`nox -l` lists the cells);
#                 after "--", pytest options for every cell: "-- -x"
#   Tests use TEST_DATABASE_URL (an existing PostgreSQL server) when set, and CI=true
#   turns "PostgreSQL unavailable" skips into failures; see tests/conftest.py.

SHELL := /bin/sh
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VENV_PYTHON := $(BIN)/python
# Rebuilt whenever pyproject.toml is newer than this file.
VENV_STAMP := $(VENV)/.installed-from-pyproject

FRAMEWORK ?= starlette
HOST ?= 127.0.0.1
PORT ?= 8000
UVICORN_ARGS ?=
PYTEST_ARGS ?=

NOX_ARGS ?=

# Checked and formatted code; directories and files that do not exist (yet) are left out.
SOURCES := $(wildcard asgi_sqla tests examples noxfile.py)

# Fallback for a pip without `--group` (older than 25.1): read the group with tomllib,
# resolving `{include-group = "..."}` entries (PEP 735) into the included group's lines.
define PRINT_DEV_GROUP
import tomllib
with open("pyproject.toml", "rb") as f:
    groups = tomllib.load(f)["dependency-groups"]
def requirements(name):
    for entry in groups[name]:
        if isinstance(entry, dict):
            yield from requirements(entry["include-group"])
        else:
            yield entry
print("\n".join(requirements("dev")))
endef
export PRINT_DEV_GROUP

.PHONY: help venv run test pytest test-matrix test-lowest check lint typecheck imports format bench-overhead bench-autocommit bench-hotpath bench bench-sync bench-shedding docs docs-serve clean distclean

help: ## list the targets
	@echo "usage: make TARGET [VARIABLE=value ...]   (variables: see the top of the Makefile)"
	@echo
	@awk 'BEGIN { FS = ":[^#]*## " } /^[a-zA-Z][a-zA-Z_-]*:.*## / { printf "  %-10s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --upgrade pip
	@if $(VENV_PYTHON) -m pip install --help | grep -e '--group' >/dev/null; then \
		echo "$(VENV_PYTHON) -m pip install -e . --group dev"; \
		$(VENV_PYTHON) -m pip install -e . --group dev; \
	else \
		echo "pip has no --group option: installing [dependency-groups] dev read with tomllib"; \
		$(VENV_PYTHON) -c "$$PRINT_DEV_GROUP" > $(VENV)/dev-requirements.txt && \
		$(VENV_PYTHON) -m pip install -e . -r $(VENV)/dev-requirements.txt; \
	fi
	touch $@

venv: $(VENV_STAMP) ## create the virtualenv with the package (editable) and the dev group

# DATABASE_URL, when set in the environment or on the command line, reaches uvicorn
# (make exports both).  examples/logging.json is uvicorn's own logging configuration
# plus a handler for every other logger: asgi_sqla's records show as
# "ERROR:    asgi_sqla: ..." lines, like uvicorn's, instead of bare text.
run: $(VENV_STAMP) ## uvicorn examples.FRAMEWORK_app:app on HOST:PORT (DATABASE_URL: see the top)
	@test -f examples/$(FRAMEWORK)_app.py || \
		{ echo "examples/$(FRAMEWORK)_app.py does not exist (FRAMEWORK=$(FRAMEWORK))" >&2; exit 1; }
	$(BIN)/uvicorn --app-dir . examples.$(FRAMEWORK)_app:app --host $(HOST) --port $(PORT) --log-config examples/logging.json $(UVICORN_ARGS)

test: lint typecheck imports docs ## lint, typecheck, import contracts, the strict docs build, then the tests under branch coverage
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage report

pytest: $(VENV_STAMP) ## only the test suite (no lint, no typecheck, no coverage)
	$(BIN)/pytest $(PYTEST_ARGS)

# The site in site/ (gitignored).  --strict turns every warning into a failure: a broken
# link or anchor, a page missing from the nav or the disk, a bad mkdocstrings reference.
# Material 9.7+ prints a banner about its end of life on every build; the build is the same.
docs docs-serve: export NO_MKDOCS_2_WARNING := 1
docs: $(VENV_STAMP) ## build the documentation site into site/ with mkdocs build --strict
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(VENV_STAMP) ## serve the documentation site on HOST:PORT, rebuilt on every change
	$(BIN)/mkdocs serve --strict --dev-addr $(HOST):$(PORT)

# The version matrix of noxfile.py (a virtualenv per cell, made by uv under .nox/): Python
# 3.10 to 3.13 found on PATH or under pyenv, each with every dependency at its lower bound
# and at its newest release, and SQLAlchemy's two ends crossed with the rest's on the newest
# Python; the whole suite on SQLite and PostgreSQL in each.  An interpreter not found is
# reported in the summary as skipped, not failed.  About 8 minutes a cell on 2 cores.
test-matrix: $(VENV_STAMP) ## the version matrix: each Python x lowest and newest dependencies (noxfile.py)
	$(BIN)/nox $(NOX_ARGS)

# The matrix's lowest corner on $(PYTHON) alone: what .ci/run adds to `make test`.
test-lowest: $(VENV_STAMP) ## the suite with every dependency at its lower bound, on PYTHON
	$(BIN)/nox --force-python "$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
		-k 'lowest and not sqla' $(NOX_ARGS)

check: lint typecheck imports ## lint, typecheck and import contracts, changing nothing

lint: $(VENV_STAMP) ## ruff check and ruff format --check, changing nothing
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(VENV_STAMP) ## mypy --strict on the package, the examples, the tests and noxfile.py
	$(BIN)/mypy --strict asgi_sqla examples tests noxfile.py

imports: $(VENV_STAMP) ## import-linter: modules import one way, the core imports no framework
	$(BIN)/lint-imports

format: $(VENV_STAMP) ## rewrite files: ruff check --fix (imports, upgrades...), then ruff format
	$(BIN)/ruff check --fix --exit-zero $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

bench-overhead: $(VENV_STAMP) ## time the middleware adds to a request that never touches the database
	$(VENV_PYTHON) benchmarks/overhead.py

bench-autocommit: $(VENV_STAMP) ## one SELECT per request, PostgreSQL 0.5 ms away: autocommit_reads against the rest
	$(VENV_PYTHON) benchmarks/autocommit.py

# About 15 minutes (Valgrind runs Python some 50 times slower): instructions per request
# (cachegrind) for no DB and one query, by hand and with asgi_sqla, on SQLite and a
# throwaway PostgreSQL, then the same cases timed.  Valgrind from apt when root.
# BENCH_ARGS="--only bare asgi_sqla --no-time" picks cases; see docs/overhead.md.
bench-hotpath: $(VENV_STAMP) ## instructions per request on the hot path (no DB, one query), counted by Valgrind
	@command -v valgrind >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		echo "installing valgrind (apt-get)" && export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -qq --no-install-recommends valgrind >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends valgrind >/dev/null; }; }; }
	$(VENV_PYTHON) -m benchmarks.hotpath $(BENCH_ARGS)
	$(VENV_PYTHON) -m benchmarks.server_count

# Its own virtualenv (.venv-bench: the package, the peers and the `bench` group), rebuilt
# like $(VENV) when pyproject.toml changes; wrk from apt when root, else a Python load
# generator.  BENCH_ARGS=--quick: a two-minute smoke run; see `python -m benchmarks -h`.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-from-pyproject

$(BENCH_STAMP): pyproject.toml
	@echo "creating $(BENCH_VENV): the package, the peers and the bench group"
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	@if $(BENCH_VENV)/bin/python -m pip install --help | grep -e '--group' >/dev/null; then \
		$(BENCH_VENV)/bin/python -m pip install --quiet -e . --group bench; \
	else \
		$(BENCH_VENV)/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["dependency-groups"]["bench"]))' \
			> $(BENCH_VENV)/bench-requirements.txt && \
		$(BENCH_VENV)/bin/python -m pip install --quiet -e . -r $(BENCH_VENV)/bench-requirements.txt; \
	fi
	touch $@

# Not listed by `make help`: a step of `bench` and `bench-sync`.
.PHONY: bench-wrk
bench-wrk:
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		echo "installing wrk (apt-get)" && export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends wrk >/dev/null; }; }; } || \
		echo "no wrk (it needs root and apt-get): the real-server scenarios use benchmarks/load.py"

bench: $(BENCH_STAMP) bench-wrk ## asgi_sqla against its peers, interleaved; prints the table, writes benchmarks/results.*
	$(BENCH_VENV)/bin/python -m benchmarks $(BENCH_ARGS)

# A few minutes: FastAPI `def` endpoints on psycopg 3, by hand and with SyncDatabase; its
# figures replace the `sync` section of benchmarks/results.* and leave the rest as it was.
bench-sync: $(BENCH_STAMP) bench-wrk ## only the sync scenario (FastAPI def endpoints, SyncDatabase), merged into results.*
	$(BENCH_VENV)/bin/python -m benchmarks --only sync --merge $(BENCH_ARGS)

# About two minutes: uvicorn on PostgreSQL (asyncpg), pool of 5, wrk with 50 connections,
# with and without admission_limit=5; prints the table of docs/load-shedding.md.
bench-shedding: $(BENCH_STAMP) bench-wrk ## load shedding (admission_limit) against the pool's queue, under wrk
	$(BENCH_VENV)/bin/python -m benchmarks.shedding $(BENCH_ARGS)

clean: ## delete caches, coverage data, build artefacts, the site and the examples' databases (keeps the virtualenv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .nox htmlcov build dist site *.egg-info
	rm -f .coverage .coverage.* coverage.xml *_example.db*
	$(if $(SOURCES),find $(SOURCES) -type d -name __pycache__ -prune -exec rm -rf {} +)

distclean: clean ## clean, and delete the virtualenv too
	rm -rf $(VENV)

# The fault-injection soak of tests/test_soak.py, long, for the async app and then its
# sync twin (`def` endpoints, SyncDatabase): `make test` runs both bounded (1000 requests
# from 50 clients, and 300 from 30).  SOAK_REQUESTS, SOAK_CONCURRENCY, SOAK_SEED (replay a
# run), SOAK_DRIVER (asyncpg or psycopg), SOAK_SYNC_DRIVER (psycopg or psycopg2) and
# SOAK_REPORT (a file for the figures; the sync run's gets .sync appended) may be set.
# The failover drill of the same file (a primary stopped and its standby promoted
# mid-run; `make test` runs 300 requests from 20 clients, async and sync) is sized by
# SOAK_FAILOVER_REQUESTS and SOAK_FAILOVER_CONCURRENCY; its figures go to
# SOAK_REPORT.failover and SOAK_REPORT.failover-sync.
# Then the state machine of tests/test_invariants.py with its long Hypothesis profile.
.PHONY: soak
soak: $(VENV_STAMP) ## long runs: the soaks and the failover drills (10000 and 5000 requests, 100 clients), then the invariants machine
	SOAK_REQUESTS=$${SOAK_REQUESTS:-10000} SOAK_CONCURRENCY=$${SOAK_CONCURRENCY:-100} \
		SOAK_FAILOVER_REQUESTS=$${SOAK_FAILOVER_REQUESTS:-5000} \
		SOAK_FAILOVER_CONCURRENCY=$${SOAK_FAILOVER_CONCURRENCY:-100} \
		$(BIN)/pytest tests/test_soak.py $(PYTEST_ARGS)
	ASGI_SQLA_HYPOTHESIS=long $(BIN)/pytest tests/test_invariants.py $(PYTEST_ARGS)

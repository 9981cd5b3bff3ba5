# DirectDriveX developer commands. `make run` and `make test` are all a newcomer needs.
#
#   make run    venv + install + migrate + storage folder + local admin, then Daphne on 127.0.0.1:8000
#   make test   the test suite (the same command CI runs); extra pytest arguments in PYTEST_ARGS
#   make faults the fault suite at its full count, on PostgreSQL + Redis, the folder and SeaweedFS (docs/reliability.md)
#   make lint   ruff check, ruff format --check, lint-imports (the app's layers), makemigrations --check
#   make ci     what CI runs (.ci/run): lint, deploy checks, tests on SQLite and on PostgreSQL + Redis

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# The one place the server command is written down. `manage.py serve` starts Daphne
# with WebSocket message/frame limits of twice DIRECTDRIVEX_CHUNK_SIZE (so an
# oversize frame reaches the consumer and gets a clean 4400 instead of a TCP
# reset), no 24 h connection cap, and transport backpressure (directdrivex/server.py;
# docs/deployment.md). `make -s daphne-command` prints the equivalent Daphne flags.
SERVE_CMD := $(PY) manage.py serve --bind $(HOST) --port $(PORT)

STORAGE_DIR := $(or $(DIRECTDRIVEX_STORAGE_DIR),var/storage)
# make run is a development server: DEBUG on unless the caller says otherwise.
RUN_DEBUG := $(or $(DEBUG),1)

.PHONY: help venv run test faults lint format ci daphne-command clean

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when requirements.txt is newer than the last install.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(STAMP)

run: $(STAMP)
	mkdir -p var "$(STORAGE_DIR)"
	DEBUG=$(RUN_DEBUG) $(PY) manage.py migrate --noinput
	DEBUG=$(RUN_DEBUG) $(PY) manage.py bootstrap_admin --base-url http://$(HOST):$(PORT)
	DEBUG=$(RUN_DEBUG) exec $(SERVE_CMD)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Its own database and Redis db (as CI's), SeaweedFS started by the suite itself; the figures it prints
# at the end are also written to var/faults-report.json (docs/reliability.md publishes them).
FAULTS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/ddx_faults
FAULTS_REDIS_URL ?= redis://127.0.0.1:6379/2

faults: $(STAMP)
	mkdir -p var
	DIRECTDRIVEX_FAULTS=full DATABASE_URL=$(FAULTS_DATABASE_URL) REDIS_URL=$(FAULTS_REDIS_URL) \
		DIRECTDRIVEX_FAULTS_REPORT=var/faults-report.json $(VENV)/bin/pytest tests/faults tests/test_schemathesis.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	DEBUG=1 $(PY) manage.py makemigrations --check --dry-run

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

ci:
	bash .ci/run

daphne-command: $(STAMP)
	@DEBUG=$(RUN_DEBUG) $(SERVE_CMD) --print

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis

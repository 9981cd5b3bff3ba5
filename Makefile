# DirectDriveX developer commands. `make run` and `make test` are all a newcomer needs.
#
#   make run    venv + install + migrate + storage folder + local admin, then Daphne on 127.0.0.1:8000
#   make test   the test suite (the same command CI runs); extra pytest arguments in PYTEST_ARGS
#   make lint   ruff check, ruff format --check, makemigrations --check
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

# Daphne refuses WebSocket messages above its limits with a TCP reset, before the
# application sees them; twice the chunk size lets an oversize frame reach the
# consumer, which refuses it cleanly with close code 4400 (docs/deployment.md).
# Underscores are allowed in the variable, as settings allow them.
CHUNK_SIZE := $(subst _,,$(or $(DIRECTDRIVEX_CHUNK_SIZE),1048576))
WS_MAX_SIZE := $(or $(shell expr 2 \* '$(CHUNK_SIZE)' 2>/dev/null),not-an-integer)

# The one place the server's flags are written down; docs/deployment.md and the
# benchmarks use the same ones (`make -s daphne-args` prints them).
DAPHNE_ARGS := --websocket-max-message-size $(WS_MAX_SIZE) --websocket-max-frame-size $(WS_MAX_SIZE) --websocket_timeout -1
DAPHNE_APP := directdrivex.asgi:application
DAPHNE_CMD := $(VENV)/bin/daphne -b $(HOST) -p $(PORT) $(DAPHNE_ARGS) $(DAPHNE_APP)

STORAGE_DIR := $(or $(DIRECTDRIVEX_STORAGE_DIR),var/storage)
# make run is a development server: DEBUG on unless the caller says otherwise.
RUN_DEBUG := $(or $(DEBUG),1)

.PHONY: help venv run test lint format ci daphne-args daphne-command clean

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
	@[ "$(WS_MAX_SIZE)" != not-an-integer ] || { echo "DIRECTDRIVEX_CHUNK_SIZE=$(DIRECTDRIVEX_CHUNK_SIZE) is not an integer" >&2; exit 2; }
	mkdir -p var "$(STORAGE_DIR)"
	DEBUG=$(RUN_DEBUG) $(PY) manage.py migrate --noinput
	DEBUG=$(RUN_DEBUG) $(PY) manage.py bootstrap_admin --base-url http://$(HOST):$(PORT)
	DEBUG=$(RUN_DEBUG) exec $(DAPHNE_CMD)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DEBUG=1 $(PY) manage.py makemigrations --check --dry-run

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

ci:
	bash .ci/run

daphne-args:
	@echo $(DAPHNE_ARGS)

daphne-command:
	@echo $(DAPHNE_CMD)

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis

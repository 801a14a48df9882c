# dicomnode — the two quick-start commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb socat dicom3tools mricron-data invesalius-examples podman runc debootstrap
PYTEST_ARGS ?=

.PHONY: setup setup-dev apt run test test-fast bench lint docs container-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Debian peers used by the tests: DCMTK, Orthanc, dicom3tools (dciodvfy), real test data.
apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

run: setup
	$(VENV)/bin/dicomnode db upgrade
	$(VENV)/bin/dicomnode serve

# The architecture rules (lint) are part of the test command, and so of CI.
test: setup apt lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not container" $(PYTEST_ARGS)

# Builds the podman image (docker/build.sh: cached debootstrap base + host wheelhouse) and runs it.
container-test: setup apt
	$(PY) -m pytest -q -m container tests/e2e $(PYTEST_ARGS)

bench: setup apt
	$(PY) -m benchmarks

# ruff, mypy, the import-linter contracts in pyproject.toml (layers, no cycles) and the
# check that no module outside dicomnode/compat/ touches a library's private names.
lint: setup
	$(VENV)/bin/ruff check dicomnode tests benchmarks
	$(VENV)/bin/mypy dicomnode
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_compat.py tests/unit/test_compat_private_names.py

# docs/configuration.md is generated from the settings model (a test fails when it is stale).
docs: setup
	$(PY) -m dicomnode.config_docs > docs/configuration.md
	$(PY) -m dicomnode.conformance

clean:
	rm -rf $(VENV) var .pytest_cache

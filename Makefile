# The two commands of the README. `make run` sets everything up and runs the default job;
# `make test` sets everything up and runs the test suite (this is what .ci/run calls).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt

# transformers 4.57 beside the project's 5.x (a venv over the system site-packages: it reuses torch), for
# tests/test_transformers_compat.py: outputs must load in both releases.
COMPAT_VENV ?= build/transformers-4.57

.PHONY: setup compat-env run test bench

setup:
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[test,plots]"

run: setup
	$(PYTHON) -m moeprune.cli demo --out runs/demo --overwrite

compat-env:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts -c constraints-cpu.txt transformers==4.57.6

test: setup compat-env
	MOEPRUNE_COMPAT_PYTHON=$(COMPAT_VENV)/bin/python $(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) scripts/bench_collect.py

# The two commands of the README. `make run` sets everything up and runs the default job;
# `make test` sets everything up and runs the test suite (this is what .ci/run calls).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt

.PHONY: setup run test bench

setup:
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[test,plots]"

run: setup
	$(PYTHON) -m moeprune.cli demo --out runs/demo --overwrite

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) scripts/bench_collect.py

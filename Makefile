# Two entry points (see README):  make run   — set up and start on the embedded default
#                                 make test  — set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench data clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: setup
	$(PY) app.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/samplers.py

# The built-in foley training set (regenerated deterministically, never committed).
data: setup
	$(VENV)/bin/edmsound data synth --out data/builtin --per-class 800 --seed 0

clean-venv:
	rm -rf $(VENV)

# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test test-slow test-all lint format bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

# Two workers, one test file each at a time (module fixtures are built once per file).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST) -m ''

SOURCES := jax_specsel tests launch benchmarks configs

lint: $(STAMP)
	$(PY) -m pyink --check $(SOURCES)
	$(PY) -m ruff check $(SOURCES)

format: $(STAMP)
	$(PY) -m pyink $(SOURCES)

bench: $(STAMP)
	$(PY) benchmarks/benchmark.py

clean:
	rm -rf $(VENV)

# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo lint test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned: this exact CPU wheel is on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# The test tools (pytest, ruff, mypy, shellcheck) and TensorBoard only where the tests need them: `make demo` skips them.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]' tensorboard
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m safe.demo

# ruff (style, imports, pyflakes) and mypy (safe/, settings in pyproject.toml): run before the tests.
lint: $(TEST_STAMP)
	$(PY) -m ruff check safe tests benchmarks
	$(PY) -m mypy

test: $(TEST_STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_out

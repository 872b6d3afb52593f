# Set-up is part of every target: a local venv with CPU PyTorch (never a bare `torch`, which pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kbricks-installed

.PHONY: venv test test-slow demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m kbricks train configs/teacher/digits_cnn.yaml --run-dir runs/demo/digits_cnn-$$(date +%Y%m%d-%H%M%S)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache

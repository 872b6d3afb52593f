# Set-up is part of every target: a local venv with CPU PyTorch (never a bare `torch`, which pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kbricks-installed

.PHONY: venv test test-slow demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The main job end to end on embedded data (~2 min on 2 cores): train a digits teacher, factorize it into
# a common-knowledge network + 2 task-specific bricks, train a same-size KD student, report, then assemble
# the bricks from the store without fine-tuning and score the assembled network against the teacher.
demo: $(STAMP)
	$(PY) -m kbricks study kf --dataset digits --seeds 0 --out runs/demo
	$(PY) -m kbricks assemble runs/demo/kf/digits/kf-seed0/bricks/ckn.json \
		runs/demo/kf/digits/kf-seed0/bricks/tsn-classes_0-1-2-3-4.json \
		runs/demo/kf/digits/kf-seed0/bricks/tsn-classes_5-6-7-8-9.json \
		--out runs/demo/assembled --evaluate

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache

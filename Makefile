# Set-up is part of every target: a local venv with CPU PyTorch (never a bare `torch`, which pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kbricks-installed

.PHONY: venv test test-slow demo bench lint readme report clean

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

# The main job end to end on embedded data, then every claim at quick budgets (~10 min on 2 cores):
# `kbricks reproduce --quick` trains digits teachers, factorizes them (KF) next to same-size KD students, runs
# dSprites KF, SupSup vs ImpressLearn, SSKT vs KD/DML/MAXL (3 seeds each) and writes REPRODUCTION-quick.md;
# then the digits bricks are assembled from the brick store without fine-tuning and scored against the teacher.
DEMO := runs/demo
DEMO_BRICKS := $(DEMO)/runs-quick/kf/digits/kf-seed0/bricks
demo: $(STAMP)
	$(PY) -m kbricks reproduce --quick --out $(DEMO)
	$(PY) -m kbricks assemble $(DEMO_BRICKS)/ckn.json $(DEMO_BRICKS)/tsn-classes_0-1-2-3-4.json \
		$(DEMO_BRICKS)/tsn-classes_5-6-7-8-9.json --out $(DEMO)/assembled --evaluate

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Tables from the committed raw results (results/runs/**/study.json), no training: RESULTS.md, REPRODUCTION.md, README block
report: $(STAMP)
	$(PY) -m kbricks report --runs results/runs --out results
	$(PY) scripts/update_readme.py

readme: $(STAMP)
	$(PY) scripts/update_readme.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache

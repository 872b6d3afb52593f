# Set-up is part of every target: a local venv with the users' environment, pinned: the registry's standard torch,
# torchvision and timm builds (never a bare `torch`, which would pull the newest CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kbricks-installed

.PHONY: venv test test-slow demo bench lint readme report clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 timm==1.0.31
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# one pytest-xdist worker per core (TEST_WORKERS=0 runs in one process); a test file stays on one worker, so its
# module fixtures are built once
TEST_WORKERS ?= auto
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The main job end to end on embedded data, then every claim at quick budgets (install excluded): `kbricks reproduce --quick` runs its five studies (KF digits and dSprites: teacher -> KF -> same-size KD
# student; SupSup vs ImpressLearn on PermutedMNIST-5k and RotatedMNIST-5k; SSKT vs KD/DML/MAXL; 3 seeds each) in
# parallel single-threaded worker processes (one per core; WORKERS=N to choose) and writes REPRODUCTION-quick.md;
# then the digits bricks are assembled from the brick store without fine-tuning and scored against the teacher
# (9.6 min on 2 cores, 2026-12-04: the quick dSprites study fits DCI's trees on 500 codes with 20 rounds; 18.0 min
# before, with the reference DCI budget; README).
# The wall time goes to runs/demo/demo-time.json (and the bench table).
DEMO := runs/demo
DEMO_BRICKS := $(DEMO)/runs-quick/kf/digits/kf-seed0/bricks
WORKERS ?=
demo: $(STAMP)
	rm -rf $(DEMO)
	@start=$$(date +%s.%N); load=$$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0); \
	$(PY) -m kbricks reproduce --quick --out $(DEMO) $(if $(WORKERS),--workers $(WORKERS)) && \
	$(PY) -m kbricks assemble $(DEMO_BRICKS)/ckn.json $(DEMO_BRICKS)/tsn-classes_0-1-2-3-4.json \
		$(DEMO_BRICKS)/tsn-classes_5-6-7-8-9.json --out $(DEMO)/assembled --evaluate && \
	$(PY) scripts/record_demo.py $$start $$load "$(WORKERS)" $(DEMO)/demo-time.json

# Every performance ratio as median [IQR] over >= 5 interleaved rounds, 1 thread, CPU time (results/bench.md,
# results/bench.json; flags rows > 10 % worse than the committed bench.json; BENCH_ONLY=kf,trainer,accel,threads,supermask,
# BENCH_ROUNDS=N, BENCH_QUICK=1 for a smoke run into runs/bench-quick/), then time / FLOPs / memory of the paper-scale
# recipes (results/bench_recipes.md)
bench: $(STAMP)
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/bench_recipes.py

# Tables from the committed raw results (results/runs*/**/study.json), no training: RESULTS.md, REPRODUCTION(-quick).md, README block
report: $(STAMP)
	$(PY) -m kbricks report --runs results/runs --out results
	$(PY) -m kbricks report --runs results/runs-quick --out results
	$(PY) scripts/update_readme.py

readme: $(STAMP)
	$(PY) scripts/update_readme.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache

PYTHON ?= python3
# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one
# process so its module fixtures are built once; 0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

.PHONY: install test test-all bench bench-quick clean

install:
	$(PYTHON) -m pip install -e ".[dev,torch,jax]"

# The fast tier: every feature end to end on tiny models (docs/testing.md).
test:
	$(PYTEST) -m "not slow" tests

# Both tiers: what CI runs.
test-all:
	$(PYTEST) tests

clean:
	rm -rf build *.egg-info .pytest_cache

bench:
	$(PYTHON) benchmarks/bench.py
	$(PYTHON) benchmarks/cold_start.py

bench-quick:
	$(PYTHON) benchmarks/bench.py --quick --out benchmarks/results/quick

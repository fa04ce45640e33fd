PYTHON ?= python3
# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one
# process so its module fixtures are built once; 0 runs them in this process.
# A worker that dies ends the run (--max-worker-restart 0: replacing it under
# --dist loadfile can hang the run, pytest-xdist #784), and a test that hangs fails
# after TEST_TIMEOUT seconds instead of holding CI to its limit.
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 900
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --max-worker-restart 0 \
	--timeout $(TEST_TIMEOUT) --durations=15

.PHONY: install test test-all bench bench-quick clean

install:
	$(PYTHON) -m pip install -e ".[dev,torch,jax,peers]"

# The fast tier: every feature end to end on tiny models (docs/testing.md).
test:
	$(PYTEST) -m "not slow" tests

# Both tiers: what CI runs. One pytest run per tier, so no worker lives through the
# whole suite; the slow tier runs even when the fast one fails, and either fails the target.
test-all:
	$(PYTEST) -m "not slow" tests; fast=$$?; $(PYTEST) -m slow tests && exit $$fast

clean:
	rm -rf build *.egg-info .pytest_cache

bench:
	$(PYTHON) benchmarks/bench.py
	$(PYTHON) benchmarks/cold_start.py
	$(PYTHON) benchmarks/cold_start.py --preset algpt2
	$(PYTHON) benchmarks/peers.py

bench-quick:
	$(PYTHON) benchmarks/bench.py --quick --out benchmarks/results/quick

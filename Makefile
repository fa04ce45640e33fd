PYTHON ?= python3

.PHONY: install test test-fast bench bench-quick clean

install:
	$(PYTHON) -m pip install -e ".[dev,torch,jax]"

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

clean:
	rm -rf build *.egg-info .pytest_cache

bench:
	$(PYTHON) benchmarks/bench.py

bench-quick:
	$(PYTHON) benchmarks/bench.py --quick --out benchmarks/results/quick

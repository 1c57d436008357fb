# Every target creates .venv when it is missing and installs the package into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test demo bench docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e '.[test,examples]'
	touch $@

install: $(VENV)/.installed

# Lint and type-check, then the tests (they also build the docs site with --strict and run every guide's code).
test: install $(VENV)/.docs-installed
	$(PY) -m ruff check .
	$(VENV)/bin/pyright
	$(PY) -m pytest -q --doctest-modules deq_functional tests

demo: install
	$(PY) examples/compare.py --out runs/demo

# Benchmarks (bench/, never collected by `make test`). BENCH_ARGS="--device cuda" on a GPU.
bench: install
	$(PIP) install -q -e '.[test,examples,bench]'
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/latest.json -q $(BENCH_ARGS)
	$(PY) bench/make_results.py bench/latest.json bench/RESULTS.md

# Documentation site (docs/, mkdocs.yml) into site/; warnings are errors.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .benchmarks site

# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test bench setup clean catalog

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/tapeflow serve

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python bench/bench_bars.py

catalog: $(STAMP)
	$(BIN)/python catalogs/make_catalog.py

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis test-artifacts

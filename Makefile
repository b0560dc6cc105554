# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench format clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pnnh demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest
	$(MAKE) bench

# The benchmark suite at the machine's size (small shapes on a CPU, a few minutes), then the report
# built from its JSON: CI runs both so that neither rots.
bench: $(STAMP)
	mkdir -p build
	$(BIN)/python -m pytest bench/ --benchmark-only -q --benchmark-json=build/bench.json
	$(BIN)/pnnh report build/bench.json --out build/bench_report > /dev/null
	@echo "benchmark report: build/bench_report/report.md"

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache

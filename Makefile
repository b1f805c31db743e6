# Everything a fresh clone needs: `make test` and `make demo` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo golden coverage lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[test,bench,hf]'
	$(BIN)/pip install -c constraints.txt --no-deps legrad-torch
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/libragrad-fx demo

golden: setup
	$(BIN)/python -m tests.golden

# every section; `make coverage COVERAGE_ARGS="--only hf,torchvision"` reruns only those (the
# other sections' rows reused from the cache or docs/coverage.json)
coverage: setup
	$(BIN)/python -m benchmarks.coverage $(COVERAGE_ARGS)

lint: setup
	$(BIN)/ruff check libragrad_fx tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

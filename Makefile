# The README's quick start is `make run` and `make test`; both install first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8765

.PHONY: install run test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: install
	$(VENV)/bin/tokenfan serve --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check broker protocol bench tests

typecheck: install
	$(PY) -m mypy --strict

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
pytest: install
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint typecheck pytest

# The standard comparison of tokenfan and its peers (under 10 minutes): results, report and plots.
bench: install
	$(PY) -m bench compare --out bench-results

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench-results

# The README's quick start is `make run` and `make test`; both install first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JS := clients/js
JS_STAMP := $(JS)/node_modules/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8765

.PHONY: install run test test-prereqs js-deps lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	    echo "tokenfan needs Python's venv module: install it, e.g. 'sudo apt-get install python3-venv'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools prints a notice box on every editable install of a flat layout; it tells us nothing.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: install
	$(VENV)/bin/tokenfan serve --host $(HOST) --port $(PORT)

# Node.js, Chromium and a C compiler: installed when missing (as root), or named and stopped at once.
test-prereqs:
	@PYTHON=$(PYTHON) scripts/test-prereqs

# The npm package's dev tools (ws, React, esbuild), from its lock file; tests then work offline.
js-deps: $(JS_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json | test-prereqs
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

lint: install
	$(PY) -m ruff check broker protocol bench tests docs

typecheck: install
	$(PY) -m mypy --strict

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
pytest: install test-prereqs js-deps
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: test-prereqs lint typecheck pytest

# The standard comparison of tokenfan and its peers (under 10 minutes): results, report and plots.
bench: install
	$(PY) -m bench compare --out bench-results

clean:
	rm -rf $(VENV) $(JS)/node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis bench-results

# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the same virtualenv in .venv from pyproject.toml and requirements.lock.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-long lint up clean lock docs

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qt demo

up: $(STAMP)
	$(BIN)/qt up

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

# The dashboard test drives Debian's Chromium; install it when missing (needs root and Debian's packages).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "no $(CHROMIUM) and no apt-get: install Chromium, or set CHROMIUM"; exit 1; }
	(apt-get install -y --no-install-recommends chromium || (apt-get update && apt-get install -y --no-install-recommends chromium))

test: lint $(CHROMIUM)
	QT_CHROMIUM=$(CHROMIUM) $(BIN)/pytest

# The property suites with many more examples: 50 fault/restart sequences and 10,000 runs of the invariant
# model (about an hour on 2 cores).
test-long: $(STAMP)
	QT_PROPERTY_EXAMPLES=50 QT_MODEL_EXAMPLES=10000 $(BIN)/pytest --timeout=7200 -p no:logging \
		tests/integration/test_order_properties.py tests/integration/test_invariant_model.py

test-fast: $(STAMP)
	$(BIN)/pytest -x -q tests/unit

# Regenerate docs that are derived from code (a test fails when they drift).
docs: $(STAMP)
	$(BIN)/python -c "from quantum_trader.domain.reasons import markdown; open('docs/deny-reasons.md','w').write(markdown())"

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

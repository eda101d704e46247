# Two commands do everything on a fresh clone:
#   make run   - install (when pyproject.toml or requirements.lock changed), start the embedded
#                PostgreSQL and Valkey under ./var/ (or reuse them), migrate, and run the worker
#                with beat; Ctrl-C stops the worker and the servers
#   make test  - install, make sure PostgreSQL and Redis are up, lint, type-check and run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install lock run beat test lint faults bench bench-quick bench-transport bench-renewals bench-grants bench-expiry bench-batches bench-brokers bench-reads bench-domain-debit bench-pools profile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One pip call; the versions the image ships (requirements.lock) are the versions the tests run
# on. The main distribution carries token_worker_client itself (pyproject.toml; a separate
# editable install of ./client from before is removed, or two would provide it). Done again only
# when a dependency list changed (the stamp is older than one of them), not on every make run.
STAMP := $(VENV)/.installed
$(STAMP): pyproject.toml requirements.lock client/pyproject.toml | $(BIN)/python
	$(BIN)/pip uninstall --quiet --yes token-worker-client 2>/dev/null || true
	$(BIN)/pip install --quiet -c requirements.lock -e '.[ops,dev]'
	touch $@

install: $(STAMP)

# Refresh requirements.lock after changing dependencies in pyproject.toml.
LOCK ?= requirements.lock
lock:
	scripts/lock-requirements.sh $(LOCK)

# worker/embedded.py: with no TOKENS_* server set, starts (or takes over) PostgreSQL and Valkey
# from their wheels, migrates, runs `celery -A worker worker -B` and stops them all on exit.
run: install
	$(BIN)/python -m worker.embedded run

beat: install
	$(BIN)/celery -A worker beat -l INFO

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# The end-to-end tasks suite, the poison messages, the faults (a worker killed mid-debit, the
# database down), the coalescer, the CLI, the worker's start-up checks and beat (RedBeat keeps
# its schedule in Redis) run a second and third time on RabbitMQ (classic, then quorum queues, a
# virtual host of their own): about 6 minutes more. Then the end-to-end tasks suite once more on
# the embedded default, started exactly as `make run` starts it (tests/devenv.py EmbeddedRun:
# PostgreSQL and Valkey from their wheels, on free ports): about a minute.
AMQP_TESTS ?= tests/tasks tests/worker/test_poison.py tests/worker/test_faults.py \
	tests/worker/test_coalescer.py tests/worker/test_cli.py tests/worker/test_preflight.py \
	tests/test_beat_schedule.py tests/worker/test_producers_e2e.py
test: install lint
	scripts/ensure-services.sh
	VENV=$(VENV) scripts/ensure-promtool.sh
	$(BIN)/pytest -q
	TOKENS_TEST_BROKER=amqp $(BIN)/pytest -q $(AMQP_TESTS)
	TOKENS_TEST_BROKER=quorum $(BIN)/pytest -q $(AMQP_TESTS)
	TOKENS_TEST_BROKER=embedded $(BIN)/pytest -q tests/tasks

# The fault suite under load (issue 25, tests/faults/): each fault (Redis SIGKILLed, PostgreSQL
# restarted with an immediate shutdown, the worker's links to PostgreSQL and to Redis cut for
# 10 s, the worker SIGKILLed every 2 s) on private servers of its own (a Redis and a PostgreSQL on
# free ports, scratch directories) while producers send 5,000 debits through the typed client;
# one table row per fault, also in var/faults/results-<time>.md. `make test` runs the short form
# (500 debits, links cut for 5 s, fewer faults) with the rest of pytest: about two minutes.
faults: install
	TOKENS_TEST_FAULTS=full $(BIN)/pytest -q tests/faults

# Every benchmark below, one after another (output in var/bench/bench-<time>.log), then one
# table of issue 12's goals, also written to var/bench/summary-<date>.md.
bench: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.all

# The same with small sizes (a few minutes): checks the plumbing, not the figures.
bench-quick: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.all --quick

# tokens.debit over Redis, RabbitMQ classic and RabbitMQ quorum queues, interleaved in one run.
bench-brokers: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.brokers

# A history page and a month's statistics at 10 million ledger rows (builds them: ~3 minutes).
bench-reads: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.ledger_reads

# tokens.debit against a Celery no-op task on the same worker (rate and worker CPU), and the
# p50/p99 of a debit round trip at low load and at half the maximum rate.
bench-transport: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.transport

# A worker under a debit load, sampled by py-spy: a speedscope file under var/profile/ and a
# summary of where the worker's CPU went.
profile: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.profile

bench-grants: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.grant_debits

bench-domain-debit: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.domain_debit

# A member's debit through 3 levels with 2 limits each against a plain debit; a hot pool of 16
# members against one hot account (issue 22).
bench-pools: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.pool_debit

bench-batches: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.debit_batches
	$(BIN)/python -m bench.coalescer

bench-renewals: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.renewal_sweep

bench-expiry: install
	scripts/ensure-services.sh
	$(BIN)/python -m bench.grant_expiry

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

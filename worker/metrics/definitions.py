"""The metrics every process of a worker writes to its own files (prometheus_client's
multiprocess mode); the main process merges them on each scrape. Not registered anywhere: the
server reads every process's files."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OPERATIONS = Counter(
    "tokens_operations",
    "Contract task outcomes: outcome is ok or the error code (a replay is ok).",
    ["task", "operation_type", "outcome"],
    registry=None,
)
REPLAYS = Counter(
    "tokens_replays",
    "Successful outcomes that replayed an earlier identical request (nothing applied again).",
    ["task", "operation_type"],
    registry=None,
)
MOVED = Counter(
    "tokens_moved",
    "Tokens moved by movements that applied (replays excluded), by sign: credit or debit.",
    ["operation_type", "direction"],
    registry=None,
)
BATCH_ITEMS = Counter(
    "tokens_batch_items",
    "Items of tokens.debit_batch by outcome (ok or the error code).",
    ["operation_type", "outcome"],
    registry=None,
)
RETRIES = Counter(
    "tokens_operation_retries",
    "Attempts that failed with a transient database error and will run again.",
    ["task"],
    registry=None,
)
RENEWALS = Counter(
    "tokens_renewals",
    "Users renewed, skipped or failed by sweeps and renew_user. tier is the account's for"
    " renewed; for skipped and failed, the sweep's tier, or all when it swept every tier.",
    ["tier", "outcome"],
    registry=None,
)
EXPIRED_TOKENS = Counter(
    "tokens_expired",
    "Tokens that left balances through expiry entries (what was left of due grants, less holds).",
    registry=None,
)
EXPIRED_GRANTS = Counter(
    "tokens_grants_expired",
    "Expiry entries written: one per grant whose unheld remaining expired.",
    registry=None,
)
REFUSED = Counter(
    "tokens_messages_refused",
    "Messages refused before any task saw them (poison messages), by reason.",
    ["reason"],
    registry=None,
)
UNAUTHORIZED = Counter(
    "tokens_unauthorized",
    "Messages refused UNAUTHORIZED (TOKENS_PRODUCERS): producer is the one named, unknown when"
    " none could be (unsigned, or a name the worker does not know).",
    ["producer", "task"],
    registry=None,
)
DURATION = Histogram(
    "tokens_task_duration_seconds",
    "Time a contract task took, from validation to its committed outcome.",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
    registry=None,
)
RECONCILE_MISMATCHES = Gauge(
    "tokens_reconcile_mismatches",
    "Users whose balance differed from their ledger at the last full ledger.reconcile"
    " (at most 1000 are counted, as the task lists at most 1000).",
    registry=None,
    multiprocess_mode="mostrecent",
)
CHAIN_BROKEN = Gauge(
    "tokens_ledger_broken_entries",
    "Problems the last full ledger.verify found in the hash chains, balance fields and balances"
    " (at most 100 are counted, as the task lists at most 100).",
    registry=None,
    multiprocess_mode="mostrecent",
)
LAST_VERIFY = Gauge(
    "tokens_last_verify_timestamp_seconds",
    "When the last full ledger.verify finished (Unix time).",
    registry=None,
    multiprocess_mode="mostrecent",
)
LAST_RECONCILE = Gauge(
    "tokens_last_reconcile_timestamp_seconds",
    "When the last full ledger.reconcile finished (Unix time).",
    registry=None,
    multiprocess_mode="mostrecent",
)

# celery-exporter's names (worker-side: what this worker received, started, sent...).
_TASK = ["name", "queue_name"]
SENT = Counter("celery_task_sent", "Tasks this worker published.", _TASK, registry=None)
RECEIVED = Counter("celery_task_received", "Tasks this worker received.", _TASK, registry=None)
STARTED = Counter("celery_task_started", "Tasks a pool process started.", _TASK, registry=None)
SUCCEEDED = Counter(
    "celery_task_succeeded",
    "Tasks that returned (a business refusal too: it is a result).",
    _TASK,
    registry=None,
)
FAILED = Counter("celery_task_failed", "Tasks that failed.", [*_TASK, "exception"], registry=None)
RETRIED = Counter("celery_task_retried", "Tasks that will be retried.", _TASK, registry=None)
RUNTIME = Histogram(
    "celery_task_runtime",
    "Run time of tasks that succeeded, seconds.",
    _TASK,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
    registry=None,
)
QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_seconds",
    "Time from this worker taking a message off the broker (or its ETA, if later) until a"
    " pool process started it.",
    _TASK,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
    registry=None,
)
EVENT_DELIVERIES = Counter(
    "tokens_events_deliveries",
    "Events the relay pushed, by channel (celery, webhook) and outcome: delivered; for a webhook"
    " also failed (to be retried) and dead (given up after TOKENS_WEBHOOK_GIVE_UP_HOURS).",
    ["channel", "outcome"],
    registry=None,
)
LIMIT_REFUSALS = Counter(
    "tokens_limit_refusals",
    "Requests refused LIMIT_EXCEEDED (a debit, charge, reserve or extend, or a batch's item), by"
    " the refusing limit's period (minute, hour, day, week, month).",
    ["period"],
    registry=None,
)
LEDGER_MONTHS_UNTIL = Gauge(
    "tokens_ledger_months_until_timestamp_seconds",
    "The end of the ledger's newest monthly partition at the last ledger.make_months (Unix"
    " time): entries stamped past it all land in one partition, `after`.",
    registry=None,
    multiprocess_mode="mostrecent",
)
LEDGER_OUTSIDE_MONTHS = Gauge(
    "tokens_ledger_entries_outside_months",
    "Ledger entries past the newest month (in the partition `after`) at the last"
    " ledger.make_months: no month from theirs on can be made while they are there.",
    registry=None,
    multiprocess_mode="mostrecent",
)
ACTIVE = Gauge(
    "celery_worker_tasks_active",
    "Tasks running now.",
    registry=None,
    multiprocess_mode="livesum",
)

FILE_METRICS: tuple[Counter | Gauge | Histogram, ...] = (
    OPERATIONS, REPLAYS, MOVED, BATCH_ITEMS, RETRIES, RENEWALS, EXPIRED_TOKENS, EXPIRED_GRANTS,
    REFUSED, UNAUTHORIZED, DURATION,
    RECONCILE_MISMATCHES, LAST_RECONCILE, CHAIN_BROKEN, LAST_VERIFY,
    LEDGER_MONTHS_UNTIL, LEDGER_OUTSIDE_MONTHS,
    SENT, RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED,
    RUNTIME, QUEUE_WAIT, ACTIVE, EVENT_DELIVERIES, LIMIT_REFUSALS,
)  # fmt: skip

# Movement tasks: their result's ``amount`` is the signed change of the balance.
MOVEMENTS = frozenset(
    {"tokens.debit", "tokens.credit", "tokens.charge", "tokens.refund", "tokens.reset_balance",
     "tokens.capture"}
)  # fmt: skip
# Stamped on each request in the main process when the message arrives (queue wait).
RECEIVED_AT = "tokens_received_at"
OTHER = "other"

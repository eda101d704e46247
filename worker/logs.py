"""Logs: one line per task outcome, JSON or text, with no result reprs and no passwords.

Celery keeps its own logging set-up (``-l`` level, ``-f`` file or stderr, the same handlers in the
main process and, inherited through fork, in every pool process); ``after_setup_logger`` and
``after_setup_task_logger`` fire once it has made its handlers, and with ``TOKENS_LOG_FORMAT=json``
(the default with servers) each handler gets a JSON formatter: one object per line. Connecting to
``setup_logging`` instead would make Celery skip its set-up altogether, and ours would have to
redo it.

- Each task outcome is one line on the ``tokens.operations`` logger, written from
  ``operation_completed`` (sent once per outcome): task id, task, operation type, user id,
  amount, outcome (``ok`` or the error code), replayed, duration in ms, the error. A success or a
  refusal is INFO, a final failure ERROR.
- A final failure's traceback: in JSON, one escaped ``exc_info`` field of that same line (the
  diagnosis stays with its task id, and a line-based shipper never splits it); in text, a
  separate DEBUG record, so ``-l INFO`` shows one line and ``-l DEBUG`` the traceback.
- Celery's own "Task … succeeded in …: <result repr>" and "raised unexpected" lines
  (``celery.app.trace``) are dropped for a task whose outcome our line told; any other task's
  success line keeps its time but loses the result repr. Results hold balances and user data.
- Celery's start-up banner goes in JSON mode (it is text); one JSON line says the same (URLs
  masked, as everywhere: ``worker.settings.masked``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from celery import current_task
from celery.app import trace
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_after_setup
from celery.signals import celeryd_init as _celeryd_init
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from worker.settings import get_settings, masked
from worker.signals import FAILURE_CODES, operation_completed

OPERATIONS = logging.getLogger("tokens.operations")
log = logging.getLogger(__name__)

# Celery's trace records carry args, kwargs and the return value in ``data``: never written.
_SKIPPED = [*RESERVED_ATTRS, "data"]
_SUCCESS_WITHOUT_RESULT = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


class JsonLines(JsonFormatter):
    """One JSON object per record: time, level, logger, process, message, the record's extra
    fields, the task id and name when logged inside a task, and a traceback as one field."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "processName", "message"],
            rename_fields={"levelname": "level", "name": "logger", "processName": "process"},
            reserved_attrs=_SKIPPED,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat()  # first
        super().add_fields(log_data, record, message_dict)

    def format(self, record: logging.LogRecord) -> str:
        task = current_task
        if task and task.request and task.request.id and not hasattr(record, "task_id"):
            record.task_id = task.request.id
            record.task_name = task.name
        return super().format(record)


class _Reported:
    """Ids of the tasks whose outcome this process has logged (bounded: a task's Celery line
    follows its outcome within the same call, so only the latest few are ever looked up)."""

    def __init__(self, size: int = 1024) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, task_id: str) -> None:
        self._ids[task_id] = None
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def pop(self, task_id: Any) -> bool:
        return isinstance(task_id, str) and self._ids.pop(task_id, False) is None


_reported = _Reported()


class CeleryTraceFilter(logging.Filter):
    """On ``celery.app.trace``: drop Celery's line for an outcome ours told, and the result repr
    from any other success line."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if not isinstance(data, dict):
            return True
        if _reported.pop(data.get("id")):
            return False
        if record.msg == trace.LOG_SUCCESS:
            record.msg = _SUCCESS_WITHOUT_RESULT
        return True


_state = {"configured": False}


def _as_json(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonLines())


@after_setup_logger.connect  # type: ignore[untyped-decorator]
def _after_setup_logger(logger: logging.Logger, **_: Any) -> None:
    _state["configured"] = True
    trace_logger = logging.getLogger(trace.__name__)
    if not any(isinstance(f, CeleryTraceFilter) for f in trace_logger.filters):
        trace_logger.addFilter(CeleryTraceFilter())
    if get_settings().logs_as_json:
        _as_json(logger)
        from billiard.util import get_logger as multiprocessing_logger  # type: ignore[import-untyped]

        _as_json(multiprocessing_logger())


@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _after_setup_task_logger(logger: logging.Logger, **_: Any) -> None:
    if get_settings().logs_as_json:
        _as_json(logger)


@_celeryd_init.connect  # type: ignore[untyped-decorator]
def _no_text_banner(instance: Any, **_: Any) -> None:
    if get_settings().logs_as_json:
        instance.quiet = True  # the banner is many lines of text: one JSON line instead


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _banner_as_one_line(sender: str, instance: Any, **_: Any) -> None:
    if not get_settings().logs_as_json:
        return
    settings = get_settings()
    log.info(
        "worker %s starting",
        sender,
        extra={
            "hostname": sender,
            "transport": masked(settings.broker),
            "results": masked(settings.backend),
            "database": masked(settings.db_url),
            "concurrency": instance.concurrency,
            "queues": sorted(instance.app.amqp.queues.consume_from),
        },
    )


def operation_fields(sent: dict[str, Any]) -> dict[str, Any]:
    """The fields of an outcome's line, from what ``operation_completed`` sent (fields a later
    version adds to the signal are left out, not an error)."""
    error_code = sent.get("error_code")
    fields: dict[str, Any] = {
        "task_id": sent.get("task_id"),
        "task": sent.get("operation"),
        "operation_type": sent.get("operation_type"),
        "user_id": sent.get("user_id"),
        "amount": sent.get("amount"),
        "outcome": "ok" if sent.get("success") else (error_code or "FAILED"),
        "replayed": bool(sent.get("replayed")),
        "duration_ms": round(float(sent.get("duration") or 0) * 1000, 3),
    }
    if sent.get("error") is not None:
        fields["error"] = sent["error"]
    return fields


@operation_completed.connect  # type: ignore[untyped-decorator]
def _log_operation(sender: Any = None, **sent: Any) -> None:
    if not _state["configured"]:  # a process whose logging Celery did not set up (the CLI)
        return
    fields = operation_fields(sent)
    failed = not sent.get("success") and sent.get("error_code") in FAILURE_CODES
    # Sent from inside the task's ``except`` block: the exception being handled is the failure.
    exc_info = sys.exc_info() if failed and sys.exc_info()[0] is not None else None
    as_json = get_settings().logs_as_json
    message = f"{fields['task']}[{fields['task_id']}] {fields['outcome']}"
    if not as_json:  # the fields, in the line itself
        message += "".join(
            f" {key}={json.dumps(fields[key])}"
            for key in ("user_id", "operation_type", "amount", "replayed", "duration_ms", "error")
            if key in fields
        )
    OPERATIONS.log(
        logging.ERROR if failed else logging.INFO,
        "%s",
        message,
        extra=fields,
        exc_info=exc_info if as_json else None,
    )
    if exc_info is not None and not as_json:
        OPERATIONS.debug("%s[%s] traceback", fields["task"], fields["task_id"], exc_info=exc_info)
    if isinstance(fields["task_id"], str):
        _reported.add(fields["task_id"])

"""Signal handlers a worker connects by dotted path in the tests that run a real worker: each
appends one JSON line to the file named by ``TOKENS_TEST_SIGNAL_SINK``."""

from __future__ import annotations

import json
import os
from typing import Any


def _append(signal: str, fields: dict[str, Any]) -> None:
    fields.pop("signal", None)  # the Signal object itself, which Celery's dispatch passes along
    with open(os.environ["TOKENS_TEST_SIGNAL_SINK"], "a", encoding="utf-8") as sink:
        sink.write(json.dumps({"signal": signal, **fields}, default=str) + "\n")


def on_balance_changed(sender: Any = None, **fields: Any) -> None:
    _append("balance_changed", fields)


def on_operation_completed(sender: Any = None, **fields: Any) -> None:
    _append("operation_completed", fields)


def on_operation_retried(sender: Any = None, **fields: Any) -> None:
    _append("operation_retried", fields)


def on_message_refused(sender: Any = None, **fields: Any) -> None:
    _append("message_refused", fields)

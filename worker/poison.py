"""Messages the worker refuses before any task sees them ("poison" messages).

Celery decodes a task message in the worker's main process and pickles its arguments to a pool
process; a message nested a few hundred levels deep, a body that is not ``[args, kwargs, embed]``
or headers of the wrong type raise there, outside any task, and stop the whole worker; with late
acks the message goes back on the queue and stops the next worker too. So every message is
checked where it is decoded (``worker.consumer``, and for Redis the envelope in
``worker.transport``), and one that fails is refused: acknowledged once, logged in one line,
counted in :data:`refused_messages`, announced by ``message_refused``, and, when its task id can be
read, answered in the result backend as the contract answers every invalid request (state
``SUCCESS``, ``{"success": false, "error": "Invalid arguments: <part>: <why>", "error_code":
"VALIDATION_ERROR"}``).

With ``TOKENS_PRODUCERS`` set, the same check refuses a message from no allowed producer
(worker/producers.py) the same way, its result ``UNAUTHORIZED``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import states
from celery.utils.time import maybe_iso8601

from accounting.errors import unauthorized
from models.schemas import Failure
from worker.producers import Producers
from worker.settings import Settings
from worker.signals import message_refused

log = logging.getLogger(__name__)

# Why a message was refused (the ``reason`` of message_refused and the keys of the counter).
REASONS = ("envelope", "headers", "content_type", "size", "decode", "shape", "depth", "error")
#: The reason of a message from no allowed producer (worker/producers.py): answered UNAUTHORIZED,
#: counted apart from poison (``tokens_unauthorized_total``).
UNAUTHORIZED = "unauthorized"

refused_messages: Counter[str] = Counter()
"""Refused messages by reason, since this process started (for the metrics to export)."""

JSON = "application/json"
_TEXT_HEADERS = ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin")


@dataclass(frozen=True)
class Refusal:
    task_id: str | None
    task: str | None
    reason: str
    error: str  # "<part or field>: <why>", as it follows "Invalid arguments: " in the result
    # An UNAUTHORIZED refusal: ``error`` is its whole result message, ``producer`` the producer
    # named (None: none could be), ``detail`` which check failed (the log line's).
    code: str = "VALIDATION_ERROR"
    producer: str | None = None
    detail: str | None = None

    @property
    def result(self) -> Failure:
        if self.code == "VALIDATION_ERROR":
            return Failure(error=f"Invalid arguments: {self.error}", error_code=self.code)
        return Failure(error=self.error, error_code=self.code)

    @classmethod
    def of(cls, message: Any, reason: str, error: str) -> Refusal:
        """A refusal of a received ``message``, naming its task id and task where its headers
        hold them."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        return cls(readable(headers.get("id")), readable(headers.get("task")), reason, error)


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists or objects more than ``limit`` levels (a scalar is 0, ``[]``
    is 1). Iterative: a recursive walk would fail on exactly the values it looks for."""
    if not isinstance(value, list | dict):
        return False
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, list | dict):
                pending.append((child, depth + 1))
    return False


def first_too_deep(items: Iterable[tuple[Any, Any]], limit: int) -> str | None:
    """The key of the first ``(key, value)`` whose value nests more than ``limit`` levels."""
    for key, value in items:
        if isinstance(value, list | dict) and too_deep(value, limit):
            return str(key)
    return None


def readable(value: Any) -> str | None:
    """A task id or name as the headers carry it, if it is one."""
    return value if isinstance(value, str) and value else None


class MessageCheck:
    """The bounds a message must keep: depth of every argument and header, size of the body,
    time limits below the visibility timeout. ``problem`` is on the hot path: for an ordinary
    debit it is a few type checks, one length and two byte counts (the body is decoded once, as
    Celery would decode it anyway, and kept on the message)."""

    def __init__(
        self,
        max_depth: int,
        max_bytes: int,
        visibility_timeout: float,
        producers: Producers | None = None,
    ) -> None:
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.visibility_timeout = visibility_timeout
        self.producers = producers
        self.deep = f"nested deeper than {max_depth} levels"

    @classmethod
    def from_settings(cls, settings: Settings) -> MessageCheck:
        producers = None if settings.producers is None else Producers(settings.producers)
        return cls(
            settings.max_message_depth,
            settings.max_message_bytes,
            settings.visibility_timeout,
            producers,
        )

    @property
    def max_envelope_chars(self) -> int:
        """The largest Redis envelope worth reading: the body base64-encoded, plus headers."""
        return (self.max_bytes + 2) // 3 * 4 + 1024 * 1024

    # --- headers ------------------------------------------------------------------------------

    def headers_problem(self, headers: Any, known_tasks: Collection[str] | None) -> Refusal | None:
        """What is wrong with a protocol 2 message's headers, if anything. ``known_tasks``: the
        registered task names (None: not checked, as the transport cannot know them)."""
        if not isinstance(headers, dict):
            return Refusal(None, None, "envelope", "message envelope: headers: expected an object")
        task_id, task = readable(headers.get("id")), readable(headers.get("task"))

        def refuse(reason: str, error: str) -> Refusal:
            return Refusal(task_id, task, reason, error)

        deep = first_too_deep(headers.items(), self.max_depth)
        if deep is not None:
            return refuse("depth", f"headers.{deep}: {self.deep}")
        if "compression" in headers:
            # kombu would inflate it before anything could bound its size.
            return refuse("headers", "headers.compression: compressed messages are not accepted")
        if known_tasks is None:
            return None
        if task is None:
            missing = headers.get("task") is None
            return refuse(
                "headers", "headers.task: " + ("missing" if missing else "expected a string")
            )
        if task_id is None:
            missing = headers.get("id") is None
            return refuse(
                "headers", "headers.id: " + ("missing" if missing else "expected a string")
            )
        if task not in known_tasks:
            return refuse("headers", f"headers.task: unknown task {task}")
        for key in _TEXT_HEADERS:
            if not isinstance(headers.get(key), str | None):
                return refuse("headers", f"headers.{key}: expected a string")
        retries = headers.get("retries")
        if retries is not None and not (type(retries) is int and retries >= 0):
            return refuse("headers", "headers.retries: expected a whole number of at least 0")
        limits = headers.get("timelimit")
        if limits is not None:
            if not (isinstance(limits, list | tuple) and len(limits) == 2):
                return refuse("headers", "headers.timelimit: expected [soft, hard]")
            for limit in limits:
                if limit is None:
                    continue
                if not (type(limit) in (int, float) and 0 <= limit < self.visibility_timeout):
                    return refuse(
                        "headers",
                        "headers.timelimit: must be below the visibility timeout "
                        f"({self.visibility_timeout:g} s)",
                    )
        for key in ("eta", "expires"):
            when = headers.get(key)
            if when is not None and not isinstance(when, datetime):
                try:
                    maybe_iso8601(when)
                except (TypeError, ValueError, AttributeError):
                    return refuse("headers", f"headers.{key}: not an ISO 8601 date")
        if not isinstance(headers.get("stamped_headers"), list | None):
            return refuse("headers", "headers.stamped_headers: expected a list")
        if not isinstance(headers.get("stamps"), dict | None):
            return refuse("headers", "headers.stamps: expected an object")
        return None

    # --- the whole message, as the consumer receives it ---------------------------------------

    def problem(self, message: Any, known_tasks: Collection[str]) -> Refusal | None:
        """What is wrong with a received kombu message, if anything. Decodes the body (once:
        kombu keeps it, and Celery reads it from there)."""
        headers = message.headers
        refusal = self.headers_problem(headers, known_tasks)
        if refusal is not None:
            return refusal
        task_id, task = headers["id"], headers["task"]

        def refuse(reason: str, error: str) -> Refusal:
            return Refusal(task_id, task, reason, error)

        if message.content_type != JSON:
            return refuse(
                "content_type",
                f"message body: content type {message.content_type} is not accepted (JSON only)",
            )
        body = message.body
        size = len(body) if isinstance(body, bytes | str) else 0
        if size > self.max_bytes:
            return refuse("size", f"message body: {size} bytes; at most {self.max_bytes} allowed")
        if self.producers is not None:
            raw = body.encode() if isinstance(body, str) else bytes(body or b"")
            denial = self.producers.check(headers, task, raw)
            if denial is not None:
                return Refusal(
                    task_id,
                    task,
                    UNAUTHORIZED,
                    unauthorized(denial.producer, task).message,
                    "UNAUTHORIZED",
                    denial.producer,
                    denial.why,
                )
        try:
            decoded = message.decode()
        except Exception as exc:
            cause = exc.__context__ or exc  # kombu wraps what the decoder raised in DecodeError
            if isinstance(cause, RecursionError):
                return refuse("depth", f"message body: {self.deep}")
            if isinstance(cause, UnicodeError):
                return refuse("decode", "message body: not UTF-8")
            return refuse("decode", "message body: not valid JSON")
        if not (isinstance(decoded, list | tuple) and len(decoded) == 3):
            return refuse("shape", "message body: expected [args, kwargs, embed]")
        args, kwargs, embed = decoded
        if not isinstance(args, list | tuple):
            return refuse("shape", "args: expected a list")
        if not isinstance(kwargs, dict):
            return refuse("shape", "kwargs: expected an object")
        if not isinstance(embed, dict):
            return refuse("shape", "embed: expected an object")
        # No argument can nest deeper than the body has brackets: most messages stop here.
        raw = body.encode() if isinstance(body, str) else body
        if raw.count(b"[") + raw.count(b"{") > self.max_depth:
            for part, items in (
                ("args", enumerate(args)),
                ("kwargs", kwargs.items()),
                ("embed", embed.items()),
            ):
                deep = first_too_deep(items, self.max_depth)
                if deep is not None:
                    return refuse("depth", f"{part}.{deep}: {self.deep}")
        return None

    # --- the Redis envelope, before kombu builds a message from it ----------------------------

    def envelope_problem(self, payload: Any, body_encodings: Collection[str]) -> Refusal | None:
        """What is wrong with a decoded Redis envelope (kombu's JSON document holding headers,
        properties and the base64 body), if anything kombu would fail on, or be harmed by."""
        if not isinstance(payload, dict):
            return Refusal(None, None, "envelope", "message envelope: expected an object")
        headers = payload.get("headers")
        if headers is None:
            headers = {}
        refusal = self.headers_problem(headers, None)
        if refusal is not None:
            return refusal
        task_id, task = readable(headers.get("id")), readable(headers.get("task"))

        def refuse(error: str, reason: str = "envelope") -> Refusal:
            return Refusal(task_id, task, reason, error)

        deep = first_too_deep(
            ((k, v) for k, v in payload.items() if k != "headers"), self.max_depth
        )
        if deep is not None:
            return refuse(f"message envelope: {deep}: {self.deep}", "depth")
        properties = payload.get("properties")
        if not isinstance(properties, dict):
            return refuse("message envelope: properties: expected an object")
        if not readable(properties.get("delivery_tag")):
            return refuse("message envelope: properties.delivery_tag: expected a string")
        info = properties.get("delivery_info")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("exchange"), str)
            and isinstance(info.get("routing_key"), str)
        ):
            return refuse(
                "message envelope: properties.delivery_info: expected an exchange and routing_key"
            )
        encoding = properties.get("body_encoding")
        if encoding is not None and encoding not in body_encodings:
            return refuse(f"message envelope: body_encoding: {encoding} is not supported")
        if not isinstance(payload.get("body"), str | None):
            return refuse("message envelope: body: expected a string")
        for key in ("content-type", "content-encoding"):
            if not isinstance(payload.get(key), str | None):
                return refuse(f"message envelope: {key}: expected a string")
        return None


# --- what a refusal does ----------------------------------------------------------------------


def report_refusal(
    task_id: str | None,
    task: str | None,
    reason: str,
    error: str,
    producer: str | None = None,
    detail: str | None = None,
) -> None:
    """Log one line, count, and send ``message_refused``."""
    refused_messages[reason] += 1
    why = f"{error} ({detail})" if detail else error
    log.warning("Refused message %s (task %s), %s: %s", task_id or "?", task or "?", reason, why)
    for receiver, response in message_refused.send(
        sender=None, task_id=task_id, task=task, reason=reason, error=error, producer=producer
    ):
        if isinstance(response, Exception):
            log.error("message_refused handler %r failed: %r", receiver, response)


def refuse(refusal: Refusal, backend: Any) -> None:
    """Report ``refusal`` and, if its task id is known, store its result (VALIDATION_ERROR, or
    UNAUTHORIZED)."""
    report_refusal(
        refusal.task_id,
        refusal.task,
        refusal.reason,
        refusal.error,
        refusal.producer,
        refusal.detail,
    )
    if refusal.task_id is None:
        return
    try:
        backend.store_result(refusal.task_id, refusal.result.model_dump(), states.SUCCESS)
    except Exception as exc:  # the refusal stands; only the answer is lost
        log.error("Could not store the refusal of %s: %r", refusal.task_id, exc)

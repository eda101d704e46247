"""Signing what a producer sends (contract v1.2, "Producers allowed to move money").

With ``TOKENS_PRODUCERS`` set on the worker, every message must carry the header
``tokens-signature: NAME:HEX``, HEX being the lowercase HMAC-SHA256, under the producer's key, of
the message body exactly as sent. :func:`sign_messages` makes one Celery app sign everything it
publishes.

It wraps the app's ``amqp.send_task_message``: the one call every publish of that app goes
through (``send_task``, ``apply_async``, a task's retry, a chord's parts, beat), with the
arguments Celery then hands to its ``before_task_publish`` signal. That signal is process-wide:
a handler there would sign every app's messages with one key. The body is serialized here as
kombu's ``Producer.publish`` serializes it (the same registry function, the same serializer
name); kombu's JSON encoding of one object is deterministic, so the bytes signed are the bytes
the consumer receives (tests/client/test_signing.py compares them).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.serialization import dumps

HEADER = "tokens-signature"


def signature(key: bytes, body: bytes) -> str:
    """The lowercase hex HMAC-SHA256 of ``body`` under ``key``."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def serialized(body: Any, serializer: str = "json") -> bytes:
    """``body`` as kombu's ``Producer.publish`` serializes it (uncompressed: the worker refuses
    compressed messages)."""
    _content_type, encoding, payload = dumps(body, serializer=serializer)  # type: ignore[no-untyped-call]
    return payload.encode(encoding) if isinstance(payload, str) else bytes(payload)


@dataclass(frozen=True)
class Signer:
    """A producer's name and the key it signs with (a key is used as its UTF-8 bytes)."""

    name: str
    key: bytes

    def __repr__(self) -> str:  # never the key
        return f"Signer({self.name!r})"

    def header(self, body: bytes) -> str:
        """The ``tokens-signature`` value for a message whose serialized body is ``body``."""
        return f"{self.name}:{signature(self.key, body)}"

    @classmethod
    def of(cls, name: str | None, key: str | bytes | None) -> Signer | None:
        """A signer, or None when neither is given; one without the other is a mistake."""
        if name is None and key is None:
            return None
        if not name or not key:
            raise ValueError("a producer needs both a name and a key to sign (or neither)")
        return cls(name, key.encode() if isinstance(key, str) else key)

    @classmethod
    def from_env(cls) -> Signer | None:
        """``TOKENS_PRODUCER_NAME`` and ``TOKENS_PRODUCER_KEY``, when a key is set (a worker's
        environment names its own producer, whose key is in ``TOKENS_PRODUCERS``)."""
        key = os.environ.get("TOKENS_PRODUCER_KEY")
        if not key:
            return None
        return cls.of(os.environ.get("TOKENS_PRODUCER_NAME") or None, key)


def sign_messages(app: Celery, signer: Signer) -> None:
    """Make ``app`` sign every task message it publishes with ``signer``."""
    send = app.amqp.send_task_message

    def send_signed(
        producer: Any,
        name: str,
        message: Any,
        *,
        headers: dict[str, Any] | None = None,
        serializer: str | None = None,
        **options: Any,
    ) -> Any:
        # Merged here rather than by Celery after us: a retry passes the request's headers,
        # which hold the signature of the message being retried.
        if headers:
            message.headers.update(headers)
        body = serialized(message.body, serializer or app.conf.task_serializer)
        message.headers[HEADER] = signer.header(body)
        return send(producer, name, message, serializer=serializer, **options)

    app.amqp.send_task_message = send_signed

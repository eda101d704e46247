"""kombu's Redis and AMQP transports, made to survive any envelope (``broker_transport`` of a
worker).

RabbitMQ: the AMQP client decodes the frames (headers are typed AMQP tables, the body is bytes),
so what reaches kombu is always a message, and worker/consumer.py checks it. One thing happens
before that check: kombu inflates a body whose ``compression`` header names a method, before
anything bounds its size. :class:`AmqpTransport` builds messages without inflating; the header
stays on the message and the consumer refuses it, as on Redis.

Redis:

Before Celery sees a message, kombu's Redis channel pops the raw envelope off the queue (here with
the script of worker/reliable.py, which records it in ``unacked`` in the same step),
parses it with ``json.loads`` and builds a message from it. An envelope that is not JSON, is
nested past the decoder's recursion limit, holds a ``{"__type__": ...}`` object kombu does not
know, is not an object, or lacks the properties kombu reads, raises there, in the event loop,
and stops the worker. The envelope was already popped, so it is lost either way: here it is
refused (worker/poison.py), answered when its task id can be read, and the loop goes on.
"""

from __future__ import annotations

import binascii
import logging
from typing import Any

import kombu.transport.pyamqp as kombu_amqp
import kombu.transport.redis as kombu_redis
from kombu.utils.json import loads as kombu_loads

from worker.poison import MessageCheck, Refusal, readable, refuse
from worker.reliable import ReliableChannel
from worker.settings import get_settings

log = logging.getLogger(__name__)


class Unreadable:
    """What the bounded ``loads`` returns in place of an envelope it could not read."""

    def __init__(self, reason: str, error: str) -> None:
        self.reason = reason
        self.error = error


def bounded_loads(max_chars: int) -> Any:
    """kombu's ``loads`` that never raises on what a queue holds: an oversized or unreadable
    document becomes an :class:`Unreadable` (refused by :meth:`Transport._deliver`)."""

    def loads(s: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(s, str | bytes) and len(s) > max_chars:
            return Unreadable("size", f"message envelope: {len(s)} bytes; at most {max_chars} read")
        try:
            return kombu_loads(s, *args, **kwargs)  # type: ignore[no-untyped-call]
        except RecursionError:
            return Unreadable("envelope", "message envelope: nested too deep to decode")
        except ValueError as exc:  # JSONDecodeError, or a {"__type__": ...} kombu does not know
            return Unreadable("envelope", f"message envelope: not readable ({str(exc)[:200]})")
        except TypeError as exc:
            return Unreadable("envelope", f"message envelope: not readable ({str(exc)[:200]})")

    loads.bounded = True  # type: ignore[attr-defined]  # (a mark, so it is installed once)
    return loads


def _install_bounded_loads(check: MessageCheck) -> None:
    # The channel calls the module's ``loads`` by name (in _brpop_read, _get, _receive_one and
    # the restore paths); a subclass cannot reach that call without copying kombu's code.
    if not getattr(kombu_redis.loads, "bounded", False):  # type: ignore[attr-defined]
        kombu_redis.loads = bounded_loads(check.max_envelope_chars)  # type: ignore[attr-defined]


class Transport(kombu_redis.Transport):
    # Pops a message and records it in ``unacked`` in one step (worker/reliable.py).
    Channel = ReliableChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.message_check = MessageCheck.from_settings(get_settings())
        _install_bounded_loads(self.message_check)

    def _deliver(self, message: Any, queue: Any) -> None:
        if isinstance(message, Unreadable):
            return self._refuse(Refusal(None, None, message.reason, message.error))
        refusal = self.message_check.envelope_problem(message, kombu_redis.Channel.codecs)
        if refusal is not None:
            return self._refuse(refusal)
        try:
            super()._deliver(message, queue)  # type: ignore[no-untyped-call]
        except binascii.Error:  # raised building the message, before it is held as unacked
            headers = message.get("headers") or {}
            self._refuse(
                Refusal(
                    readable(headers.get("id")),
                    readable(headers.get("task")),
                    "envelope",
                    "message envelope: body: not valid base64",
                )
            )
        return None

    def _refuse(self, refusal: Refusal) -> None:
        from worker.celery import app  # the app imports the config naming this class

        refuse(refusal, app.backend)


# --- RabbitMQ ---------------------------------------------------------------------------------


class AmqpMessage(kombu_amqp.Message):
    """kombu's AMQP message, minus inflating a compressed body (the consumer refuses it)."""

    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        headers = msg.properties.get("application_headers")
        compression = headers.pop("compression", None) if isinstance(headers, dict) else None
        super().__init__(msg, channel=channel, **kwargs)  # type: ignore[no-untyped-call]
        if compression is not None:
            self.headers["compression"] = compression


class AmqpChannel(kombu_amqp.Channel):
    Message = AmqpMessage


class AmqpConnection(kombu_amqp.Connection):
    Channel = AmqpChannel


class AmqpTransport(kombu_amqp.Transport):
    Connection = AmqpConnection

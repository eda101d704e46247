"""The worker's consumer (``worker_consumer``): every task message is checked where Celery decodes
it, in the main process, before a pool process sees it (worker/poison.py says why and what a
refusal does).

Celery's ``on_task_received`` stops the whole worker on what a message can carry: arguments
nested deeply enough that pickling them for the pool raises RecursionError, a body that is not
``[args, kwargs, embed]`` (ValueError while unpacking it), a ``task`` header that is not a
string, no ``id`` (KeyError, which kombu's Redis transport counts as a connection error, so the
consumer reconnects and gets the same message again, forever). The guard refuses such messages
first, and anything the original handler still raises refuses the message instead of the worker.

Gossip (other workers' events on the broadcast ``celeryev`` exchange) is guarded too: Celery's
handler reads a message's payload outside its ``try``, and the consumer takes what escapes as
unrecoverable, so one pickled message there stopped every worker that gossips at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer.consumer import Consumer
from celery.worker.consumer.gossip import Gossip

from worker.poison import MessageCheck, Refusal, readable, refuse
from worker.settings import get_settings

log = logging.getLogger(__name__)


def _ids(message: Any) -> tuple[str | None, str | None]:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return readable(headers.get("id")), readable(headers.get("task"))


class GuardedGossip(Gossip):  # type: ignore[misc]
    """Celery's gossip, but a message it cannot read is dropped, logged in one line and counted
    (gossip neither acknowledges nor redelivers: nothing else is lost)."""

    def on_message(self, prepare: Callable[[Any], Any], message: Any) -> Any:
        try:
            return super().on_message(prepare, message)
        except Exception as exc:
            error = f"gossip message: cannot be read ({type(exc).__name__})"
            refuse(Refusal(None, None, "decode", error), self.app.backend)
            return None


class GuardedConsumer(Consumer):  # type: ignore[misc]
    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps = tuple(
            "worker.consumer:GuardedGossip" if step.endswith(":Gossip") else step
            for step in Consumer.Blueprint.default_steps
        )

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        on_task_received = super().create_task_handler(*args, **kwargs)
        check = MessageCheck.from_settings(get_settings())
        known_tasks = self.strategies  # filled by update_strategies before messages arrive
        # Trouble reaching the broker must still reach Celery, which reconnects and redelivers;
        # but kombu's Redis transport lists KeyError among its connection errors, and here a
        # KeyError comes from a malformed message.
        infrastructure = tuple(
            e for e in (*self.connection_errors, *self.channel_errors) if e is not KeyError
        )

        def guarded_on_task_received(message: Any) -> Any:
            try:
                refusal = check.problem(message, known_tasks)
            except Exception as exc:
                task_id, task = _ids(message)
                refusal = Refusal(task_id, task, "error", f"message: could not be read ({exc!r})")
            if refusal is not None:
                return self.refuse_message(message, refusal)
            try:
                return on_task_received(message)
            except infrastructure:
                raise
            except Exception as exc:
                log.exception("Celery could not take a checked message")
                task_id, task = _ids(message)
                self.refuse_message(
                    message, Refusal(task_id, task, "error", f"message: {type(exc).__name__}")
                )
                return None

        return guarded_on_task_received

    def refuse_message(self, message: Any, refusal: Refusal) -> None:
        """Report the refusal, answer it when the task id is known, acknowledge the message."""
        refuse(refusal, self.app.backend)
        if not message.acknowledged:
            message.ack_log_error(log, self.connection_errors)

    # Celery's own handlers for messages it cannot use: the same refusal, so each is answered
    # and counted alike (the guard reaches most of these cases first).

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        task_id, task = _ids(message)
        self.refuse_message(
            message, Refusal(task_id, task, "decode", f"message body: cannot be read ({exc!r})")
        )

    def on_unknown_message(self, body: Any, message: Any) -> None:
        task_id, _task = _ids(message)
        self.refuse_message(message, Refusal(task_id, None, "headers", "headers.task: missing"))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        task_id, task = _ids(message)
        self.refuse_message(
            message, Refusal(task_id, task, "headers", f"headers.task: unknown task {task}")
        )

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        task_id, task = _ids(message)
        self.refuse_message(message, Refusal(task_id, task, "headers", f"headers: {exc}"))

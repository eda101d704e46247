"""The single-debit coalescer: ``tokens.debit`` messages collected for a few milliseconds and
applied in one transaction (``accounting.batches.debit_many``), for producers that cannot batch.

Opt-in: with ``TOKENS_COALESCE_MS`` above 0 a worker also consumes the queue ``tokens.debit``
(:data:`QUEUE`) with a thread of its main process and a connection of its own. Producers route
single debits there (``send_task("tokens.debit", kwargs=..., queue="tokens.debit")``); messages
on the other queues run as before.

What each message gets, whatever happens to the others:

- its own result, stored in the result backend under its own task id, what ``tokens.debit``
  would have returned (its key is its ``idempotency_key``, else its task id, as there);
- its acknowledgement only once its debit is committed and its result stored. A worker killed
  before that leaves the message unacknowledged: the broker delivers it again (after the
  visibility timeout on Redis), and its key makes it a replay if it had committed;
- if the transaction of the whole collection fails, each message is tried again alone, in a
  transaction of its own; one that still fails with a transient error (connection lost,
  deadlock) goes back to the queue, one that fails otherwise is answered with that failure, as
  a task's would be, and acknowledged;
- a message the coalescer cannot read (not JSON, pickle, not UTF-8, nested too deep, not
  ``[args, kwargs, embed]``, headers it cannot use), or reading which fails in any way, is
  refused as the other queues' consumer refuses one (worker/poison.py): acknowledged, logged,
  counted, ``message_refused``, and a VALIDATION_ERROR result when its task id can be read. It
  never stops the consumer nor the rest of its collection. Invalid arguments get the
  VALIDATION_ERROR ``tokens.debit`` would give;
- one whose task id was revoked (``celery control revoke``, kept by the worker's main process in
  ``celery.worker.state.revoked``, with ``--statedb`` across restarts) or whose ``expires`` has
  passed is discarded unapplied, as Celery's worker discards such a task: REVOKED is stored
  under its task id and the message acknowledged. Revoking by stamped headers is not honoured,
  nor is ``eta``/``countdown``: a debit with an eta is applied when it is collected.

A task's time limits do not reach the coalescer's thread, so it bounds itself: on PostgreSQL its
transactions wait at most :data:`LOCK_WAIT` (1 s) for a row lock, a collection starts its
transactions within half the tasks' soft time limit and each ends within the other half (below
the visibility timeout), and a message still untried then goes back to the queue. One account
locked for long (a stuck session) sends its own debits back; the other accounts' go on.

After a collection that sent a message back, the coalescer waits before it consumes again, with
the tasks' jittered exponential backoff (``TOKENS_RETRY_BACKOFF_MAX``): a database that is down
holds the debits back in the queue, unlike a task's there is no last retry, and the worker does
not spin on them (it took each back ~30 times a second, one warning each time, before).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import bootsteps, states
from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker import state as worker_state
from kombu import Exchange, Queue  # type: ignore[attr-defined]
from sqlalchemy.orm import Session

from accounting import batches
from models.schemas import DebitIn, Failure
from token_worker_client.errors import InvalidPayload
from token_worker_client.models import parse_payload
from worker.db import Timeouts, get_engine, session_scope
from worker.failures import failure_code, is_transient, one_line
from worker.limits import backoff
from worker.poison import MessageCheck, Refusal, refuse
from worker.queues import queue_arguments
from worker.settings import get_settings
from worker.signals import send_completed

log = logging.getLogger(__name__)

TASK = "tokens.debit"
QUEUE = "tokens.debit"


def queue(queue_type: str = "classic") -> Queue:
    """The coalescer's queue, declared as the worker's other queues are (``TOKENS_QUEUE_TYPE``):
    a producer with ``task_default_queue_type = "quorum"`` declares it quorum when it first
    sends there, and RabbitMQ refuses a declaration of another type."""
    return Queue(  # type: ignore[no-untyped-call]
        QUEUE,
        Exchange(QUEUE, type="direct"),  # type: ignore[no-untyped-call]
        routing_key=QUEUE,
        queue_arguments=queue_arguments(queue_type),
    )


@dataclass
class _Debit:
    message: Any
    task_id: str
    kwargs: dict[str, Any]
    payload: DebitIn

    @property
    def key(self) -> str:
        return self.payload.idempotency_key or self.task_id


def store_results(backend: Any, results: list[tuple[str, dict[str, Any]]]) -> None:
    """Store each (task id, result) as SUCCESS, as ``backend.store_result`` would (a task id
    whose SUCCESS is stored already keeps it), in two Redis round trips for them all."""
    client = getattr(backend, "client", None)
    if not isinstance(client, redis.Redis):
        for task_id, result in results:
            backend.store_result(task_id, result, states.SUCCESS)
        return
    keys = [backend.get_key_for_task(task_id) for task_id, _ in results]
    stored = client.mget(keys)
    with client.pipeline() as pipe:
        for key, (task_id, result), before in zip(keys, results, stored, strict=True):
            if before is not None and backend.decode_result(before)["status"] == states.SUCCESS:
                continue
            meta = backend._get_result_meta(
                result=result, state=states.SUCCESS, traceback=None, request=None
            )
            meta["task_id"] = task_id
            value = backend.encode(meta)
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.execute()


def _now() -> datetime:
    return datetime.now(UTC)


#: The longest a coalesced transaction waits for a row lock. A debit's own transaction holds
#: its account's row for milliseconds; one held longer (a stuck session, a long batch) sends the
#: coalesced debits of that account back to the queue instead of holding up every other.
LOCK_WAIT = 1.0


class Coalescer:
    """Collects messages (``add``) and applies them (``flush``); the thread is :class:`Step`.

    A flush takes at most ``limit`` seconds (the tasks' soft limit): its transactions start
    within the first half, on connections of their own whose statements end within the other
    half and wait at most :data:`LOCK_WAIT` for a lock (server settings sent when a connection
    starts: no round trip per transaction); a message left untried goes back to the queue."""

    def __init__(self, backend: Any, check: MessageCheck, limit: float) -> None:
        self.backend = backend
        self.check = check
        self.budget = limit / 2
        self.timeouts: Timeouts = (
            ("statement_timeout", max(1, round(self.budget * 1000))),
            ("lock_timeout", round(LOCK_WAIT * 1000)),
        )

    def _scope(self) -> AbstractContextManager[Session]:
        return session_scope(get_engine(self.timeouts))

    def flush(self, messages: list[Any]) -> bool:
        """Apply ``messages``; whether any went back to the queue (the database in trouble)."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.budget
        debits = [d for d in (self._read(m) for m in messages) if d is not None]
        if not debits:
            return False
        try:
            with self._scope() as session:
                out = batches.debit_many(
                    session, [d.payload for d in debits], [d.key for d in debits]
                )
        except Exception:
            log.warning("coalesced debits failed together; trying each alone", exc_info=True)
            sent_back: set[str] = set()  # accounts a debit of which went back to the queue
            return any([self._alone(debit, deadline, sent_back) for debit in debits])
        duration = time.perf_counter() - started
        outcomes = [r.model_dump(mode="json") for r in out.results]
        # Committed: store the answers, then acknowledge. A crash between the two redelivers
        # the messages, which replay (the first answer stored under a task id stands).
        store_results(self.backend, [(d.task_id, o) for d, o in zip(debits, outcomes, strict=True)])
        for debit, outcome in zip(debits, outcomes, strict=True):
            send_completed(TASK, debit.task_id, debit.kwargs, outcome, duration)
            debit.message.ack()
        return False

    def _read(self, message: Any) -> _Debit | None:
        """The message's debit, or None once it is answered (refused, revoked or invalid) and
        acknowledged. Nothing a message holds makes this raise: one it cannot read is refused,
        not left to stop the collection and, back at the head of the queue, the consumer."""
        try:
            refusal = self.check.problem(message, (TASK,))  # decodes the body, and keeps it
            if refusal is None:
                return self._debit(message)
        except Exception as exc:
            log.exception("%s: could not read a message", TASK)
            refusal = Refusal.of(message, "error", f"message: could not be read ({exc!r})")
        self._refuse(message, refusal)
        return None

    def _refuse(self, message: Any, refusal: Refusal) -> None:
        """Refuse ``message`` as the other queues' consumer does (worker/poison.py): reported,
        answered with VALIDATION_ERROR if its task id is known, acknowledged."""
        refuse(refusal, self.backend)
        if not message.acknowledged:
            message.ack()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """kombu's handler for a message it could not even build (the coalescer decodes the
        body itself, in :meth:`_read`): refused, as the other queues' consumer refuses it."""
        self._refuse(
            message, Refusal.of(message, "decode", f"message body: cannot be read ({exc!r})")
        )

    def _debit(self, message: Any) -> _Debit | None:
        """A checked message's debit, or None once it is answered (revoked, or invalid)."""
        task_id: str = message.headers["id"]
        if self._revoked(message, task_id):
            return None
        args, kwargs, _embed = message.decode()
        try:
            if args:
                raise InvalidPayload("Invalid arguments: send keyword arguments, not positional")
            payload = parse_payload(DebitIn, kwargs)
        except InvalidPayload as exc:  # as tokens.debit answers it (tasks/base.py validate)
            failure = Failure(error=str(exc), error_code="VALIDATION_ERROR")
            self._answer_failure(message, task_id, kwargs, failure)
            return None
        return _Debit(message, task_id, kwargs, payload)

    def _revoked(self, message: Any, task_id: str) -> bool:
        """Whether Celery's worker would discard this task unrun, as it does one whose id was
        revoked (``celery.worker.state.revoked``, which the main process's remote control keeps)
        or whose ``expires`` has passed; then, as there, its result is REVOKED and its message
        acknowledged."""
        expires = message.headers.get("expires")  # an ISO 8601 date (the check saw to it)
        # Naive: UTC, the worker's timezone (worker/config.py), as Celery reads it there.
        expired = expires is not None and maybe_make_aware(maybe_iso8601(expires)) < _now()
        if not expired and task_id not in worker_state.revoked:
            return False
        reason = "expired" if expired else "revoked"
        log.info("Discarding revoked task: %s[%s] (%s)", TASK, task_id, reason)
        self.backend.mark_as_revoked(task_id, reason)
        message.ack()
        return True

    def _answer_failure(
        self, message: Any, task_id: str, kwargs: dict[str, Any], failure: Failure
    ) -> None:
        self.backend.store_result(task_id, failure.model_dump(), states.SUCCESS)
        send_completed(TASK, task_id, kwargs, failure.model_dump(), 0.0)
        message.ack()

    def _alone(self, debit: _Debit, deadline: float, sent_back: set[str]) -> bool:
        """Apply ``debit`` in a transaction of its own; whether it went back to the queue. One
        whose account had a debit sent back already follows it untried (its row is likely still
        locked: another wait would only hold up the accounts after it)."""
        started = time.perf_counter()
        why = None
        if time.monotonic() >= deadline:
            why = f"out of time ({self.budget:g} s)"
        elif debit.payload.user_id in sent_back:
            why = "after its account's earlier debit"
        if why is not None:
            log.warning("%s[%s]: %s, back to the queue", TASK, debit.task_id, why)
            debit.message.requeue()
            return True
        try:
            with self._scope() as session:
                out = batches.debit_many(session, [debit.payload], [debit.key])
        except Exception as exc:
            if is_transient(exc):
                log.warning(
                    "%s[%s]: transient database error, back to the queue", TASK, debit.task_id
                )
                debit.message.requeue()
                sent_back.add(debit.payload.user_id)
                return True
            log.exception("%s[%s] failed", TASK, debit.task_id)
            self.backend.mark_as_failure(debit.task_id, exc)
            send_completed(
                TASK,
                debit.task_id,
                debit.kwargs,
                {},
                time.perf_counter() - started,
                error=one_line(exc),
                error_code=failure_code(exc),
            )
            debit.message.ack()
            return False
        self._answer(debit, out.results[0].model_dump(mode="json"), time.perf_counter() - started)
        return False

    def _answer(self, debit: _Debit, outcome: dict[str, Any], duration: float) -> None:
        # Committed: store the answer, then acknowledge. A crash between the two redelivers the
        # message, which replays and stores the same answer again.
        self.backend.store_result(debit.task_id, outcome, states.SUCCESS)
        send_completed(TASK, debit.task_id, debit.kwargs, outcome, duration)
        debit.message.ack()


class Step(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep running the coalescer's consumer thread (enabled by the setting)."""

    label = "coalescer"
    # After the pool and an embedded beat (-B) have forked their processes: the thread's
    # connections stay in this process, and no child is forked while the thread imports (a
    # child would inherit the module's import lock held, and hang on its first import of it).
    requires = ("celery.worker.components:Pool", "celery.worker.components:Beat")

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = get_settings()
        self.window = settings.coalesce_ms / 1000
        self.max = settings.coalesce_max
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def include_if(self, parent: Any) -> bool:
        return bool(self.window > 0)

    def start(self, parent: Any) -> None:
        # The result backend's module imported here, in the thread that forks, rather than
        # first in the coalescer's: a pool child forked later (a replacement) never inherits
        # its import half done.
        parent.app.backend  # noqa: B018
        self.thread = threading.Thread(
            target=self._run, args=(parent.app,), name="coalescer", daemon=True
        )
        self.thread.start()

    def stop(self, parent: Any) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)

    def _run(self, app: Any) -> None:
        # The app's backend is per thread: this thread's own.
        settings = get_settings()
        coalescer = Coalescer(
            app.backend, MessageCheck.from_settings(settings), settings.task_soft_time_limit
        )
        while not self.stopping.is_set():
            try:
                with app.connection_for_read() as conn:
                    self._consume(conn, coalescer)
            except Exception:
                log.exception("coalescer: consumer failed; reconnecting")
                self.stopping.wait(1)

    def _consume(self, conn: Any, coalescer: Coalescer) -> None:
        flush = coalescer.flush
        pending: list[Any] = []
        troubled = 0  # collections in a row that sent a message back to the queue
        # on_message: kombu hands the message over undecoded (with callbacks it decodes first,
        # and one it cannot decode raised out of drain_events, went back to the head of the
        # queue and came straight back: no debit was taken after it). The coalescer's check
        # decodes it and refuses what it cannot read; on_decode_error refuses what kombu could
        # not even build.
        with conn.Consumer(
            queue(get_settings().queue_type),
            on_message=pending.append,
            on_decode_error=coalescer.on_decode_error,
            accept=["json"],
            prefetch_count=self.max,
        ):
            first = 0.0
            while not self.stopping.is_set():
                wait = 1.0 if not pending else max(0.0, first + self.window - time.monotonic())
                had = len(pending)
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=wait)
                if pending and not had:
                    first = time.monotonic()
                if pending and (
                    len(pending) >= self.max or time.monotonic() >= first + self.window
                ):
                    batch, pending[:] = list(pending), []
                    if not flush(batch):
                        troubled = 0
                        continue
                    # Back in the queue, the messages would be handed straight back: wait, as
                    # a task waits to retry, rather than spin on a database that is down.
                    delay = backoff(troubled)
                    troubled += 1
                    log.warning("coalescer: database in trouble; consuming again in %.1f s", delay)
                    self.stopping.wait(delay)
            if pending:  # stopping: what was collected is applied, not left to the timeout
                flush(pending)

"""The events relay: inside every worker's main process, one active across all workers.

Each worker with a push channel configured (``TOKENS_EVENTS_TASK``, ``TOKENS_WEBHOOK_URL``) runs
this thread. It holds a dedicated database connection and tries a session advisory lock on it;
the one that gets it is the relay, the others try again every :data:`TAKEOVER_SECONDS`. The lock
lives as long as that connection: a relay whose worker dies (SIGKILL included) loses it when its
connection closes, and a standby takes over within about a second (keepalives bound a silent
network loss). All the relay's work goes through the same connection, so a relay that lost it
(and with it the lock) stops working at once.

Each round: give committed events their place (``tokens_events_number``), then
- the Celery task: publish every event after the channel's place, in order, as the task
  ``TOKENS_EVENTS_TASK`` on ``TOKENS_EVENTS_QUEUE`` (declared by the publish, never consumed: the
  publisher is an app of its own, so the worker's queues never include it), then record the
  place. Killed between the publish and the record, the relay's successor publishes them again
  with the same ``event_id`` (at least once);
- the webhook: per user, from the oldest undelivered event, POST one at a time; a user whose
  oldest is waiting for a retry waits (never a later ``seq`` first); several users at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, bootsteps
from celery.utils.dispatch import Signal
from kombu import Exchange, Queue  # type: ignore[attr-defined]
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from accounting import outbox
from worker import webhooks
from worker.failures import one_line
from worker.queues import queue_arguments
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The advisory lock of the one relay ("tokens-events" read as a number; per database).
LOCK_KEY = 0x746F6B2D657674
#: How often a standby tries the lock.
TAKEOVER_SECONDS = 1.0
#: Events one round publishes to the Celery channel, or looks at for the webhook.
BATCH = 500
WEBHOOK_THREADS = 8

#: ``delivered(channel, outcome, count)``: a round's deliveries (metrics).
delivered = Signal(name="events_delivered", providing_args={"channel", "outcome", "count"})


def _publisher(settings: Settings) -> tuple[Celery, Queue]:
    from worker.config import celery_config

    config = celery_config(settings)
    app = Celery("tokens-events", set_as_current=False)
    app.conf.update(
        broker_url=config["broker_url"],
        broker_transport=config.get("broker_transport"),
        broker_transport_options={
            **config["broker_transport_options"],
            **({"confirm_publish": True} if settings.broker_is_amqp else {}),
        },
        task_serializer="json",
        accept_content=["json"],
    )
    name = settings.events_queue
    queue = Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(name, type="direct"),  # type: ignore[no-untyped-call]
        routing_key=name,
        queue_arguments=queue_arguments(settings.queue_type),
    )
    return app, queue


class Relay:
    """One worker's relay thread: standby until it holds the lock, then the relay."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery, self.webhook = settings.push_channels
        self.stopping = threading.Event()
        self.active = threading.Event()
        self.publisher: tuple[Celery, Queue] | None = _publisher(settings) if self.celery else None
        self.pool = ThreadPoolExecutor(WEBHOOK_THREADS, thread_name_prefix="webhook")

    def run(self) -> None:
        engine = create_engine(
            self.settings.db_url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": 10,
                "application_name": f"tokens-events-relay-{os.getpid()}",
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 3,
                # The server's side too: a relay cut off by the network loses the lock (its
                # backend ends) within about 11 s, instead of holding it for the kernel's 2 h.
                "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
                " -c tcp_keepalives_count=3",
            },
        )
        while not self.stopping.is_set():
            try:
                with engine.connect() as conn, Session(bind=conn) as session:
                    if self._lock(session):
                        log.info("events relay: active")
                        self.active.set()
                        self._relay(session)
            except Exception as exc:
                log.warning("events relay: %s; again shortly", one_line(exc))
            finally:
                self.active.clear()
            self.stopping.wait(TAKEOVER_SECONDS)
        engine.dispose()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _lock(self, session: Session) -> bool:
        while not self.stopping.is_set():
            got = session.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}
            ).scalar_one()
            session.commit()
            if got:
                return True
            self.stopping.wait(TAKEOVER_SECONDS)
        return False

    def _relay(self, session: Session) -> None:
        while not self.stopping.is_set():
            busy = outbox.number(session) > 0
            if self.celery:
                busy |= self._publish(session) > 0
            if self.webhook:
                busy |= self._post(session) > 0
            if not busy:
                self.stopping.wait(self.settings.events_poll_seconds)

    # --- the Celery task ---------------------------------------------------------------------

    def _publish(self, session: Session) -> int:
        assert self.publisher is not None and self.settings.events_task is not None
        app, queue = self.publisher
        start = outbox.channel_pos(session, outbox.CELERY)
        page = outbox.after(session, start, BATCH)
        session.commit()
        if not page:
            return 0
        # kombu's publish batch: on Redis one pipeline for the page (one round trip, where a
        # publish each took one); elsewhere each message is published at once. A failure raises
        # before the place is recorded, and the page goes again.
        with app.producer_or_acquire() as producer, producer.batch():
            for stored in page:
                event = stored.event
                app.send_task(
                    self.settings.events_task,
                    kwargs=event.model_dump(mode="json"),
                    queue=queue,
                    declare=[queue],
                    task_id=f"tokens-event-{event.event_id}",
                    # What Celery logs of a task: given, so it does not build a repr of each.
                    argsrepr="()",
                    kwargsrepr=f"{{event {event.event_id}: {event.type} of {event.user_id}}}",
                    producer=producer,
                    retry=False,
                )
        _after_publish(page[-1].pos)
        outbox.channel_done(session, outbox.CELERY, page[-1].pos)
        delivered.send(sender=None, channel="celery", outcome="delivered", count=len(page))
        return len(page)

    # --- the webhook -------------------------------------------------------------------------

    def _post(self, session: Session) -> int:
        window = outbox.webhook_window(session, BATCH)
        session.commit()
        now = datetime.now(UTC)
        per_user: OrderedDict[str, list[outbox.Stored]] = OrderedDict()
        waiting: set[str] = set()
        for stored in window:
            user = stored.event.user_id
            if user in waiting:
                continue
            if user not in per_user and stored.retry_at is not None and stored.retry_at > now:
                waiting.add(user)  # its oldest waits for a retry: so does the rest
                continue
            per_user.setdefault(user, []).append(stored)
        if not per_user:
            return 0
        outcomes = list(self.pool.map(self._post_in_order, per_user.values()))
        done = [s.event.event_id for ok, _failed in outcomes for s in ok]
        if done:
            outbox.webhook_delivered(session, [int(i) for i in done])
            delivered.send(sender=None, channel="webhook", outcome="delivered", count=len(done))
        give_up = timedelta(hours=self.settings.webhook_give_up_hours)
        for _ok, failed in outcomes:
            if failed is None:
                continue
            stored, error = failed
            wait = webhooks.backoff(stored.attempts + 1, self.settings.webhook_backoff_max)
            dead = outbox.webhook_failed(session, int(stored.event.event_id), error, wait, give_up)
            outcome = "dead" if dead else "failed"
            delivered.send(sender=None, channel="webhook", outcome=outcome, count=1)
            log.warning("events relay: webhook %s for event %s: %s", outcome, stored.pos, error)
        return len(done)

    def _post_in_order(
        self, events: list[outbox.Stored]
    ) -> tuple[list[outbox.Stored], tuple[outbox.Stored, str] | None]:
        """POST one user's events in order, stopping at the first that fails."""
        assert self.settings.webhook_url is not None and self.settings.webhook_secret is not None
        secret = self.settings.webhook_secret.get_secret_value()
        ok: list[outbox.Stored] = []
        for stored in events:
            error = webhooks.post(
                self.settings.webhook_url, secret, stored.event, self.settings.webhook_timeout
            )
            if error is not None:
                return ok, (stored, error)
            ok.append(stored)
        return ok, None


def _after_publish(pos: int) -> None:
    """Between the publish and the record of it: a test's fault injection replaces this."""


class Step(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep running the relay thread when a push channel is configured."""

    label = "events-relay"
    # After the pool and an embedded beat (-B) have forked their processes: the thread's
    # connections stay in this process, and no child is forked while the thread imports (a
    # child would inherit the module's import lock held, and hang on its first import of it).
    requires = ("celery.worker.components:Pool", "celery.worker.components:Beat")

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.relay: Relay | None = None
        self.thread: threading.Thread | None = None

    def include_if(self, parent: Any) -> bool:
        return any(get_settings().push_channels)

    def start(self, parent: Any) -> None:
        self.relay = Relay(get_settings())
        self.thread = threading.Thread(target=self.relay.run, name="events-relay", daemon=True)
        self.thread.start()

    def stop(self, parent: Any) -> None:
        if self.relay is not None:
            self.relay.stopping.set()
        if self.thread is not None:
            self.thread.join(10)

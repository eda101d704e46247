"""The single-debit coalescer (worker/coalescer.py) through real worker processes and Redis:
concurrent producers' debits applied once each with their own results, a worker killed in the
middle of a coalesced transaction, a committed message delivered again.

Each worker consumes only the coalescer's queue (and a private one), so the session's workers
never take these messages, and these workers never take theirs.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy.engine import make_url

from accounting.accounts import open_account
from tests import dbstate
from tests.polling import wait_for
from tests.support import WorkerProcess, run_in_threads, running_workers
from tests.worker.tcp_proxy import TcpProxy
from tests.worker.test_faults import (
    FAST_REDELIVERY,
    backend_alive,
    lock_waiters,
    log_of,
    proxy,  # noqa: F401 (a fixture)
    row_locked,
)
from tests.worker.test_poison import broker_queue, envelope, headers, invalid
from worker.coalescer import QUEUE
from worker.db import session_scope
from worker.settings import get_settings

USERS = [f"c{i}" for i in range(5)]
COALESCE = {"TOKENS_COALESCE_MS": "30", **FAST_REDELIVERY}


@pytest.fixture
def accounts(clean_db: None) -> list[str]:
    with session_scope() as session:
        for user in USERS:
            open_account(session, user, initial_balance=1000)
    return USERS


def coalescing_worker(role: str, env: dict[str, str] | None = None) -> WorkerProcess:
    own = f"coalesce-own-{uuid.uuid4().hex[:8]}"
    return WorkerProcess(
        f"{role}-{os.getpid()}", concurrency=1, env={**COALESCE, **(env or {})}, queues=own
    )


def debit(app: Celery, user: str, amount: int, **kw: Any) -> AsyncResult:
    kwargs = {"user_id": user, "amount": amount, "operation_type": "image_generation"}
    return app.send_task(
        "tokens.debit", kwargs={**kwargs, **kw.pop("extra", {})}, queue=QUEUE, **kw
    )


def debits_of(user: str) -> list[dict[str, Any]]:
    return [e for e in dbstate.entries(user) if e["tokens_amount"] < 0]


def test_concurrent_producers_each_applied_once_with_their_own_result(
    app: Celery, accounts: list[str]
) -> None:
    producers, each = 4, 25

    def produce(i: int) -> list[tuple[str, AsyncResult]]:
        sent = []
        for n in range(each):
            user = USERS[(i + n) % len(USERS)]
            sent.append((user, debit(app, user, 1 + n % 3)))
        return sent

    w = coalescing_worker("coalesce-many")
    with running_workers(app, w):
        sent = [s for per in run_in_threads(producers, produce) for s in per]
        outs = {r.id: (user, r.get(timeout=60)) for user, r in sent}
        applied = {u: debits_of(u) for u in USERS}
        writers = {
            r["id"]: r["xid"]
            for r in dbstate.rows("SELECT id, xmin::text AS xid FROM ledger_entries")
        }
        balances = {u: dbstate.balance(u) for u in USERS}
        refused = debit(app, "c0", 5000).get(timeout=30)
        malformed = debit(app, "c0", 1, extra={"amount": "1"}).get(timeout=30)
        # A committed message delivered again (same task id): its key replays it.
        again_id = sent[0][1].id
        debit(app, sent[0][0], 1, task_id=again_id)
        # Celery keeps a task id's first SUCCESS; a debit sent after it shows it was consumed.
        after = debit(app, "c1", 1).get(timeout=30)

    assert all(o["success"] and not o["replayed"] for _, o in outs.values())
    for user in USERS:
        mine = sorted((o for u, o in outs.values() if u == user), key=lambda o: -o["new_balance"])
        entries = applied[user]
        assert len(entries) == len(mine)
        # Each result is its own entry, and the results chain from 1000 down.
        assert {o["ledger_entry_id"] for o in mine} == {str(e["id"]) for e in entries}
        balance = 1000
        for o in mine:
            assert (o["balance_before"], o["new_balance"]) == (balance, balance + o["amount"])
            balance = o["new_balance"]
        assert balances[user] == balance
        assert {e["idempotency_key"] for e in entries} == {
            tid for tid, (u, _) in outs.items() if u == user
        }
    # Coalesced: several debits were written by one transaction.
    assert max(Counter(writers.values()).values()) > 1
    assert (refused["success"], refused["error_code"]) == (False, "INSUFFICIENT_TOKENS")
    assert (malformed["success"], malformed["error_code"]) == (False, "VALIDATION_ERROR")
    assert [e["idempotency_key"] for e in debits_of(sent[0][0])].count(again_id) == 1
    assert after["success"]
    assert sum(len(debits_of(u)) for u in USERS) == producers * each + 1


def test_a_worker_killed_mid_batch_redelivers_and_nothing_applies_twice(
    app: Celery, accounts: list[str]
) -> None:
    first = coalescing_worker("coalesce-crash-a")
    with row_locked("c0"), running_workers(app, first):
        sent = [(user, debit(app, user, 10)) for user in USERS for _ in range(2)]
        [orphan] = wait_for(lock_waiters, 15, "the coalesced batch blocked on the row lock")
        first.kill()  # the whole process group, mid-transaction
    wait_for(lambda: not backend_alive(orphan), 10, "the orphaned backend to end")
    assert all(debits_of(u) == [] for u in USERS)

    second = coalescing_worker("coalesce-crash-b")
    with running_workers(app, second):
        outs = [(user, r.id, r.get(timeout=60)) for user, r in sent]
    for user in USERS:
        mine = [o for u, _, o in outs if u == user]
        assert sorted(o["new_balance"] for o in mine) == [980, 990]
        assert not any(o["replayed"] for o in mine)
        assert {e["idempotency_key"] for e in debits_of(user)} == {
            tid for u, tid, _ in outs if u == user
        }
        assert dbstate.balance(user) == 980


def test_a_database_outage_holds_coalesced_debits_back_without_spinning(
    app: Celery,
    accounts: list[str],
    proxy: TcpProxy,  # noqa: F811
) -> None:
    """While the database is down, a coalesced debit goes back to the queue and the coalescer
    waits before it takes it again, with the tasks' backoff; it does not loop on it as fast as
    the queue hands it back. When the database returns, the debit applies once."""
    through_proxy = make_url(get_settings().db_url).set(host="127.0.0.1", port=proxy.port)
    w = coalescing_worker(
        "coalesce-outage",
        {
            "TOKENS_DATABASE_URL": through_proxy.render_as_string(hide_password=False),
            "TOKENS_RETRY_BACKOFF_MAX": "1",
        },
    )
    proxy.open()  # a worker checks its database before it says ready
    with running_workers(app, w):
        proxy.shut()
        result = debit(app, "c0", 5)
        back = f"tokens.debit[{result.id}]: transient database error, back to the queue"
        wait_for(lambda: back in log_of(w), 15, "the debit back in the queue")
        time.sleep(4)
        # Backoff capped at 1 s: about one attempt a second (0-0.5, 0-1, 0-1 ... s of jitter).
        attempts = log_of(w).count(back)
        assert 2 <= attempts <= 12, attempts
        assert "coalescer: database in trouble; consuming again in" in log_of(w)
        proxy.open()
        out = result.get(timeout=30)
    assert (out["success"], out["new_balance"], out["replayed"]) == (True, 995, False)
    assert [e["idempotency_key"] for e in debits_of("c0")] == [result.id]
    assert dbstate.balance("c0") == 995


def test_a_coalesced_debit_waits_no_longer_than_a_task_may_run(
    app: Celery, accounts: list[str]
) -> None:
    """A task is bounded by its time limits, below the visibility timeout; the coalescer runs in
    the worker's main process, out of their reach, so it bounds its own transactions: a debit
    blocked on a row lock gives up (a second's wait, in the collection and then alone), goes back
    to the queue while the other accounts' debits go on, and applies once when the lock is gone.
    Unbounded, it waited as long as the lock was held, past the visibility timeout (10 s here),
    when Redis hands its message to another worker."""
    w = coalescing_worker("coalesce-bounded")

    def sent_back(task_id: str) -> bool:
        lines = log_of(w).splitlines()
        return any(f"tokens.debit[{task_id}]:" in n and "back to the queue" in n for n in lines)

    with running_workers(app, w):
        with row_locked("c0"):
            blocked = debit(app, "c0", 10)
            wait_for(lock_waiters, 15, "the coalesced debit blocked on the row lock")
            blocked_at = time.monotonic()
            wait_for(lambda: sent_back(blocked.id), 10, "the blocked debit back in the queue")
            gave_up_after = time.monotonic() - blocked_at
            free = debit(app, "c1", 10)  # the coalescer goes on with other accounts
            assert free.get(timeout=30)["new_balance"] == 990
        out = blocked.get(timeout=30)
    # A row lock is waited for a second, in the collection's transaction and then alone.
    assert gave_up_after < 5, gave_up_after
    assert (out["success"], out["new_balance"], out["replayed"]) == (True, 990, False)
    assert [e["idempotency_key"] for e in debits_of("c0")] == [blocked.id]


def raw_debit(body: bytes | str, content_type: str = "application/json", **hdrs: Any) -> Any:
    """A ``tokens.debit`` message as kombu keeps it on Redis, for the coalescer's queue (pushed
    as it is, or published to RabbitMQ, by tests/worker/test_poison.py's queues)."""
    task_id = hdrs.pop("task_id", str(uuid.uuid4()))
    route = {"exchange": QUEUE, "routing_key": QUEUE}
    hdrs = headers("tokens.debit", task_id, **hdrs)
    return task_id, envelope(body, hdrs, content_type, delivery_info=route)


def refusals_sink(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    sink = tmp_path / "signals.jsonl"
    env = {
        "TOKENS_TEST_SIGNAL_SINK": str(sink),
        "TOKENS_MESSAGE_REFUSED_HANDLERS": '["tests.worker.signal_sink:on_message_refused"]',
    }
    return sink, env


DEBIT_BODY = json.dumps([[], {"user_id": "c0", "amount": 1, "operation_type": "o"}, {}])


def test_a_message_the_coalescer_cannot_decode_is_refused_and_the_debits_after_it_go_on(
    app: Celery, accounts: list[str], tmp_path: Path
) -> None:
    """On the coalescer's queue as on the others (tests/worker/test_poison.py): a message that
    is not JSON, or not a debit, is refused once (a VALIDATION_ERROR result under its task id,
    one log line, one message_refused), acknowledged, and the debits after it are applied once
    each. Before, kombu decoded each message before the coalescer saw it, and one it could not
    decode raised out of the consumer, which reconnected and got the same message back: no
    debit was answered any more."""
    pickled = pickle.dumps(([], {"user_id": "c0", "amount": 1, "operation_type": "o"}, {}))
    poisons = [  # (message, reason, the error in the result; None: no task id to answer)
        (raw_debit(pickled, "application/x-python-serialize"), "content_type",
         "message body: content type application/x-python-serialize is not accepted (JSON only)"),
        (raw_debit(DEBIT_BODY[:-1]), "decode", "message body: not valid JSON"),
        (raw_debit(b'[[], {"user_id": "\xff"}, {}]'), "decode", "message body: not UTF-8"),
        (raw_debit("[" * 100_000 + "]" * 100_000), "depth",
         "message body: nested deeper than 32 levels"),
        (raw_debit('{"args": [], "kwargs": {}}'), "shape",
         "message body: expected [args, kwargs, embed]"),
        (raw_debit(pickled, "application/x-python-serialize", task_id=None), "headers", None),
    ]  # fmt: skip
    sink, env = refusals_sink(tmp_path)
    w = coalescing_worker("coalesce-poison", env)
    queue = broker_queue(QUEUE)
    with running_workers(app, w):
        sent: list[tuple[str, AsyncResult]] = []
        for (_task_id, message), _reason, _error in poisons:
            queue.push(message)
            sent.extend((user, debit(app, user, 1)) for user in USERS)
        outs = [(user, r.id, r.get(timeout=20)) for user, r in sent]
        answers = {
            task_id: app.AsyncResult(task_id).get(timeout=10)
            for (task_id, _), _, error in poisons
            if error is not None
        }
        wait_for(lambda: queue.waiting() + queue.unacked() == 0, 10, "every message acknowledged")
        log = log_of(w)
    assert all(o["success"] and not o["replayed"] for _, _, o in outs)
    for user in USERS:
        assert sorted(e["idempotency_key"] for e in debits_of(user)) == sorted(
            tid for u, tid, _ in outs if u == user
        )
        assert dbstate.balance(user) == 1000 - len(poisons)
    assert answers == {
        task_id: invalid(error) for (task_id, _), _, error in poisons if error is not None
    }
    refused = [ln for ln in log.splitlines() if "Refused message" in ln]
    assert len(refused) == len(poisons), refused
    signals = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(s["task_id"], s["task"], s["reason"]) for s in signals] == [
        (task_id, "tokens.debit", reason) for (task_id, _), reason, _ in poisons
    ]
    assert "consumer failed" not in log


def answered(app: Celery, task_id: str) -> str:
    """The state stored under ``task_id``, once there is one."""
    result = app.AsyncResult(task_id)
    return str(wait_for(lambda: result.state if result.state != "PENDING" else None, 10, "answer"))


def test_a_revoked_or_expired_debit_is_discarded_as_a_tasks_would_be(
    app: Celery, accounts: list[str]
) -> None:
    """Celery's worker does not run a task whose id was revoked (``control.revoke``) or whose
    ``expires`` has passed: it stores REVOKED under its id and acknowledges it. So does the
    coalescer; before, it applied them both."""
    w = coalescing_worker("coalesce-revoked")
    queue = broker_queue(QUEUE)
    with running_workers(app, w):
        revoked_id = str(uuid.uuid4())
        node = f"{w.name}@{socket.gethostname()}"
        assert app.control.revoke(revoked_id, destination=[node], reply=True, limit=1, timeout=5)
        revoked = debit(app, "c0", 7, task_id=revoked_id)
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        # Published as it is: Celery's producer would set the past expiry as RabbitMQ's message
        # TTL too, and RabbitMQ would drop the message itself.
        expired_id, expired = raw_debit(DEBIT_BODY.replace('"c0"', '"c1"'), expires=past)
        queue.push(expired)
        after = debit(app, "c2", 7)
        assert after.get(timeout=20)["success"]
        states = [answered(app, task_id) for task_id in (revoked.id, expired_id)]
        wait_for(lambda: queue.waiting() + queue.unacked() == 0, 10, "every message acknowledged")
    assert states == ["REVOKED", "REVOKED"]
    assert (debits_of("c0"), debits_of("c1"), len(debits_of("c2"))) == ([], [], 1)


# --- a failed transaction: each message alone ----------------------------------------------


class FakeMessage:
    """What the coalescer uses of a kombu message."""

    content_type = "application/json"

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.headers = {"id": str(uuid.uuid4()), "task": "tokens.debit"}
        self.body = json.dumps([[], kwargs, {}])
        self.state = "unacked"

    def decode(self) -> Any:
        return json.loads(self.body)

    @property
    def acknowledged(self) -> bool:
        return self.state != "unacked"

    def ack(self) -> None:
        self.state = "acked"

    def requeue(self) -> None:
        self.state = "requeued"


def debit_messages(*users: str) -> list[FakeMessage]:
    return [
        FakeMessage({"user_id": u, "amount": 5, "operation_type": "image_generation"})
        for u in users
    ]


def in_process(backend: Any, limit: float = 120) -> Any:
    """A coalescer flushed by the test itself (no consumer thread), ``limit`` s a flush."""
    from worker import coalescer
    from worker.poison import MessageCheck

    return coalescer.Coalescer(backend, MessageCheck(32, 2**20, 300), limit)


class FakeBackend:
    def __init__(self) -> None:
        self.results: dict[str, tuple[str, Any]] = {}

    def store_result(self, task_id: str, result: Any, state: str) -> None:
        self.results[task_id] = (state, result)

    def mark_as_failure(self, task_id: str, exc: BaseException) -> None:
        self.results[task_id] = ("FAILURE", exc)


def test_a_failed_transaction_tries_each_message_alone(
    accounts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from accounting import batches

    real = batches.debit_many
    calls: list[int] = []

    def flaky(session: Any, items: Any, keys: Any) -> Any:
        calls.append(len(items))
        if len(items) > 1:  # the whole collection fails...
            raise OperationalError("SELECT", {}, Exception("connection reset"))
        if items[0].user_id == "c1":  # ...and c1's debit fails alone too: back to the queue
            raise OperationalError("SELECT", {}, Exception("connection reset"))
        if items[0].user_id == "c2":  # a bug, not the database: answered as a failure
            raise RuntimeError("boom")
        return real(session, items, keys)

    monkeypatch.setattr(batches, "debit_many", flaky)
    backend = FakeBackend()
    messages = debit_messages("c0", "c1", "c2", "c3")
    bad = FakeMessage({"user_id": "c0", "amount": "1", "operation_type": "image_generation"})
    requeued = in_process(backend).flush([*messages, bad])
    assert requeued  # c1's: the consumer waits before it takes messages again

    assert calls == [4, 1, 1, 1, 1]
    assert [m.state for m in messages] == ["acked", "requeued", "acked", "acked"]
    ids = [m.headers["id"] for m in messages]
    assert backend.results[ids[0]][1]["new_balance"] == 995
    assert ids[1] not in backend.results
    assert backend.results[ids[2]][0] == "FAILURE"
    assert backend.results[ids[3]][1]["new_balance"] == 995
    assert [dbstate.balance(u) for u in USERS] == [995, 1000, 1000, 995, 1000]
    assert bad.state == "acked"
    assert backend.results[bad.headers["id"]][1]["error_code"] == "VALIDATION_ERROR"


def test_the_coalescer_queue_is_declared_as_the_worker_declares_its_others() -> None:
    # A quorum producer declares tokens.debit quorum when it first sends there; RabbitMQ then
    # refuses (406 PRECONDITION_FAILED) a consumer that declares it classic.
    from worker import coalescer
    from worker.queues import task_queues

    def arguments(queue: Any) -> Any:
        return queue.queue_arguments  # kombu's stubs do not declare the attribute

    for queue_type in ("classic", "quorum"):
        [expected, *_] = task_queues(queue_type)
        assert arguments(coalescer.queue(queue_type)) == arguments(expected)
    assert arguments(coalescer.queue("quorum")) == {"x-queue-type": "quorum"}


def test_a_collection_out_of_time_sends_what_is_left_back_untried(
    accounts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from accounting import batches

    calls: list[int] = []

    def slow_then_failed(session: Any, items: Any, keys: Any) -> Any:
        calls.append(len(items))
        raise OperationalError("SELECT", {}, Exception("canceling statement due to timeout"))

    monkeypatch.setattr(batches, "debit_many", slow_then_failed)
    messages = debit_messages("c0", "c1")
    # No time left once the collection's transaction failed: nothing is tried alone.
    flushed = in_process(FakeBackend(), limit=0).flush(messages)
    assert flushed
    assert calls == [2]
    assert [m.state for m in messages] == ["requeued", "requeued"]


def test_the_coalescers_transactions_are_bounded_on_connections_of_their_own(
    clean_db: None,
) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    bounded = in_process(FakeBackend(), limit=0.6)
    with bounded._scope() as session:
        assert session.execute(text("SHOW lock_timeout")).scalar() == "1s"
        assert session.execute(text("SHOW statement_timeout")).scalar() == "300ms"
    started = time.monotonic()
    with pytest.raises(OperationalError, match="statement timeout"), bounded._scope() as session:
        session.execute(text("SELECT pg_sleep(5)"))
    assert time.monotonic() - started < 2
    with session_scope() as session:  # the tasks' connections are not bounded so
        assert session.execute(text("SHOW statement_timeout")).scalar() == "0"
        assert session.execute(text("SHOW lock_timeout")).scalar() == "0"


def test_a_debit_sent_back_takes_its_accounts_later_debits_with_it(
    accounts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """c0's row is locked: its first debit waits the lock timeout alone and goes back; its second
    follows untried rather than wait again in front of c1's."""
    from sqlalchemy.exc import OperationalError

    from accounting import batches

    real = batches.debit_many
    calls: list[list[str]] = []

    def locked_c0(session: Any, items: Any, keys: Any) -> Any:
        calls.append([i.user_id for i in items])
        if any(i.user_id == "c0" for i in items):
            raise OperationalError("SELECT", {}, Exception("canceling statement: lock timeout"))
        return real(session, items, keys)

    monkeypatch.setattr(batches, "debit_many", locked_c0)
    messages = debit_messages("c0", "c0", "c1")
    backend = FakeBackend()
    assert in_process(backend).flush(messages)
    assert calls == [["c0", "c0", "c1"], ["c0"], ["c1"]]
    assert [m.state for m in messages] == ["requeued", "requeued", "acked"]
    assert backend.results[messages[2].headers["id"]][1]["new_balance"] == 995


def test_a_message_that_cannot_be_read_is_refused_and_the_rest_of_the_collection_applies(
    accounts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong reading one message (here the check itself raises, as a bug in it
    would), that message is refused and acknowledged and the others apply. Before, it raised out
    of the collection and of the consumer, which got the same message back at the head of the
    queue."""
    backend = FakeBackend()
    coalescer = in_process(backend)
    messages = debit_messages("c0", "c1")
    [unreadable] = debit_messages("c0")
    check = coalescer.check.problem

    def problem(message: Any, known_tasks: Any) -> Any:
        if message is unreadable:
            raise RuntimeError("boom")
        return check(message, known_tasks)

    monkeypatch.setattr(coalescer.check, "problem", problem)
    assert not coalescer.flush([unreadable, *messages])
    assert [m.state for m in (unreadable, *messages)] == ["acked", "acked", "acked"]
    error = "message: could not be read (RuntimeError('boom'))"
    assert backend.results[unreadable.headers["id"]] == ("SUCCESS", invalid(error))
    assert [dbstate.balance(u) for u in ("c0", "c1")] == [995, 995]

    # What kombu cannot even make a message of (its on_decode_error) is refused alike.
    [broken] = debit_messages("c2")
    coalescer.on_decode_error(broken, ValueError("bad"))
    error = "message body: cannot be read (ValueError('bad'))"
    assert (broken.state, backend.results[broken.headers["id"]]) == (
        "acked",
        ("SUCCESS", invalid(error)),
    )

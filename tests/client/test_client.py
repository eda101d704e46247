"""TokenClient through real workers: every method returns its exact model, refusals come back as
``Failure`` (or raise), and a call retried after a timeout applies once."""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from celery import Celery

from tests import dbstate
from tests.client.conftest import WORKERS, Held, urls
from tests.polling import wait_for
from tests.support import call
from token_worker_client import (
    AsyncTokenClient,
    BalanceOut,
    CanAffordOut,
    CaptureOut,
    DebitBatchOut,
    DebitIn,
    DeletedOut,
    DueOut,
    EligibilityOut,
    EntriesOut,
    EntryOut,
    ErrorCode,
    ExpireOut,
    ExtendOut,
    Failure,
    GrantOut,
    GrantsExpireOut,
    GrantsOut,
    InsufficientTokens,
    InvalidArguments,
    MovementOut,
    OpenAccountOut,
    PingOut,
    ReconcileOut,
    ReleaseOut,
    RenewOut,
    ReserveOut,
    StatisticsOut,
    SweepOut,
    TaskFailed,
    TokenClient,
    TokenRefused,
    TokenTimeout,
    TokenUnavailable,
    TotalOut,
    UserNotFound,
    contract,
)
from token_worker_client.contract import Key
from worker.celery import app as worker_app


def exactly(cls: type[T], value: object) -> T:
    """``value``, which is a ``cls`` and not a subclass of it."""
    assert type(value) is cls, value
    assert isinstance(value, cls)
    return value


T = TypeVar("T")


# --- the surface ----------------------------------------------------------------------------

PUBLIC = [
    name
    for name, _ in inspect.getmembers(TokenClient, inspect.isfunction)
    if not name.startswith("_") and name != "close"
]
INTERNAL = {
    "renewals.sweep_chunk",
    "renewals.sweep_totals",
    "idempotency.prune",
    "health.noop",
    "events.prune",
    "ledger.make_months",
}


def spec_of(method: str) -> contract.Spec[Any]:
    spec: contract.Spec[Any] = getattr(contract, method.upper())
    return spec


def test_one_method_per_contract_task_named_without_its_prefix() -> None:
    worker_app.loader.import_default_modules()  # registers the worker's tasks (TASK_MODULES)
    served = {
        name for name in worker_app.tasks if not name.startswith("celery.") and name not in INTERNAL
    }
    assert {spec_of(m).name for m in PUBLIC} == served
    for method in PUBLIC:
        name = spec_of(method).name
        special = {
            "reservations.expire": "expire_reservations",
            "grants.expire": "expire_grants",
            "events.list": "list_events",
        }
        expected = special.get(name, name.split(".")[1])
        assert method == expected


@pytest.mark.parametrize("method", PUBLIC)
def test_each_method_takes_the_contract_kwargs_with_the_contract_defaults(method: str) -> None:
    spec = spec_of(method)
    params = {
        name: p
        for name, p in inspect.signature(getattr(TokenClient, method)).parameters.items()
        if name not in contract.OPTIONS
    }
    fields = spec.payload.model_fields
    assert set(params) == set(fields)
    for name, p in params.items():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        if fields[name].is_required():
            assert p.default is inspect.Parameter.empty, name
        elif fields[name].default_factory is not None:
            assert p.default is None and fields[name].get_default(call_default_factory=True) == {}
        else:
            assert p.default == fields[name].default, name
    # the tasks keyed by their task id take it, so a caller can retry them later
    assert ("task_id" in inspect.signature(getattr(TokenClient, method)).parameters) == (
        spec.key is Key.TASK_ID
    )


@pytest.mark.parametrize("method", PUBLIC)
def test_the_async_client_has_the_same_methods(method: str) -> None:
    sync, coro = getattr(TokenClient, method), getattr(AsyncTokenClient, method)
    assert inspect.iscoroutinefunction(coro)
    assert inspect.signature(sync) == inspect.signature(coro)
    assert body(sync) == body(coro)  # the same spec, the same arguments


def body(function: Any) -> str:
    """The function's statements, an awaited call read as the call itself."""
    (tree,) = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    assert isinstance(tree, ast.FunctionDef | ast.AsyncFunctionDef)
    statements = [
        ast.Return(s.value.value) if isinstance(s, ast.Return) and isinstance(s.value, ast.Await)
        else s
        for s in tree.body
    ]  # fmt: skip
    return "\n".join(ast.dump(s) for s in statements)


# --- every method through a real worker -----------------------------------------------------


def test_every_method_returns_its_model(e2e: Celery, client: TokenClient) -> None:
    every_method(e2e, client)


def every_method(e2e: Celery, client: Any) -> None:
    """Each method once, through the worker, with its exact result type (``client``: a
    TokenClient, or tests/client/test_aio.py's blocking view of an AsyncTokenClient)."""
    assert exactly(PingOut, client.ping()).at.tzinfo is not None
    far = datetime(2999, 1, 1, tzinfo=UTC)
    opened = exactly(
        OpenAccountOut,
        client.open_account(user_id="u", tier="Professional", initial_balance=100,
                            subscription_expires_at=far),
    )  # fmt: skip
    assert (opened.created, opened.tokens_balance, opened.subscription_expires_at) == (
        True,
        100,
        far,
    )
    assert exactly(BalanceOut, client.set_tier(user_id="u", tier="Gift")).tier == "Gift"
    balance = exactly(BalanceOut, client.get_balance(user_id="u"))
    assert balance.model_dump(mode="json") == call(e2e, "tokens.get_balance", user_id="u")
    affordable = exactly(CanAffordOut, client.can_afford(user_id="u", operation_type="sora_image"))
    assert (affordable.can_afford, affordable.cost, affordable.deficit) == (True, 10, 0)

    debit = exactly(
        MovementOut,
        client.debit(user_id="u", amount=30, operation_type="image_generation",
                     metadata={"job": "j-1"}),
    )  # fmt: skip
    assert (debit.amount, debit.new_balance, debit.replayed) == (-30, 70, False)
    assert exactly(MovementOut, client.credit(user_id="u", amount=5)).new_balance == 75
    charge = exactly(MovementOut, client.charge(user_id="u", operation_type="chatgpt_message"))
    assert (charge.amount, charge.new_balance) == (-5, 70)
    refund = client.refund(user_id="u", amount=10, original_entry_id=debit.ledger_entry_id)
    assert exactly(MovementOut, refund).new_balance == 80
    reset = exactly(MovementOut, client.reset_balance(user_id="u", new_balance=200, reason="x"))
    assert (reset.amount, reset.new_balance) == (120, 200)

    held = exactly(ReserveOut, client.reserve(user_id="u", amount=50, ttl_seconds=60))
    captured = exactly(CaptureOut, client.capture(reservation_id=held.reservation_id, amount=20))
    assert (captured.amount, captured.new_balance) == (-20, 180)
    other = exactly(ReserveOut, client.reserve(user_id="u", operation_type="sora_image"))
    released = exactly(ReleaseOut, client.release(reservation_id=other.reservation_id))
    assert released.status == "released"
    assert exactly(ExpireOut, client.expire_reservations()).expired == 0
    estimate = exactly(ReserveOut, client.reserve(user_id="u", amount=5, overcapture_limit=5))
    grown = exactly(ExtendOut, client.extend(reservation_id=estimate.reservation_id, amount=5))
    assert (grown.amount, grown.tokens_available) == (10, 170)
    client.release(reservation_id=estimate.reservation_id).unwrap()
    listed = exactly(GrantsOut, client.grants(user_id="u", include_ended=True))
    assert (sum(g.remaining for g in listed.grants), listed.debt) == (180, 0)
    assert [type(g) for g in listed.grants] == [GrantOut] * len(listed.grants)
    assert exactly(GrantsExpireOut, client.expire_grants()).expired == 0

    batch = exactly(
        DebitBatchOut,
        client.debit_batch(debits=[
            DebitIn(user_id="u", amount=1, operation_type="adjustment"),
            {"user_id": "nobody", "amount": 1, "operation_type": "adjustment"},
        ]),
    )  # fmt: skip
    assert (batch.applied, batch.refused) == (1, 1)
    assert [type(r) for r in batch.results] == [MovementOut, Failure]

    entries = exactly(EntriesOut, client.user_entries(user_id="u", limit=3))
    assert [type(e) for e in entries.entries] == [EntryOut] * 3
    assert entries.entries[0].tokens_amount == -1
    by_type = exactly(EntriesOut, client.entries_by_type(operation_type="image_generation"))
    assert [e.id for e in by_type.entries] == [debit.ledger_entry_id]
    since = datetime.now(UTC) - timedelta(hours=1)
    assert exactly(TotalOut, client.total_spent(user_id="u", start_date=since)).total == 56
    assert exactly(TotalOut, client.total_earned(user_id="u", start_date=since)).total == 235
    stats = exactly(StatisticsOut, client.statistics(user_id="u", end_date="2999-01-01"))
    assert stats.net_change == 179 and stats.by_type["image_generation"].count == 1
    assert exactly(ReconcileOut, client.reconcile()).mismatches == []
    assert exactly(DeletedOut, client.delete_old_entries(older_than="2000-01-01")).deleted == 0

    eligible = exactly(EligibilityOut, client.check_eligibility(user_id="u"))
    assert (eligible.eligible, eligible.reason) == (True, "Never renewed")
    assert exactly(DueOut, client.due(tier="Gift")).user_ids == ["u"]
    dry = exactly(SweepOut, client.sweep(dry_run=True))
    assert (dry.total_processed, dry.successful) == (1, 1)
    renewed = exactly(RenewOut, client.renew_user(user_id="u"))
    assert (renewed.tokens_added, renewed.new_balance) == (100, 279)
    assert exactly(SweepOut, client.sweep()).total_processed == 0
    assert dbstate.balance("u") == 279


# --- refusals -------------------------------------------------------------------------------


def test_a_refusal_is_a_failure_with_a_typed_code_and_unwrap_raises_it(
    e2e: Celery, client: TokenClient
) -> None:
    missing = exactly(Failure, client.get_balance(user_id="ghost"))
    assert missing.error_code is ErrorCode.USER_NOT_FOUND
    assert missing.model_dump() == call(e2e, "tokens.get_balance", user_id="ghost")
    with pytest.raises(UserNotFound) as not_found:
        missing.unwrap()
    assert (not_found.value.code, not_found.value.message) == ("USER_NOT_FOUND", "User not found")
    assert not_found.value.result is missing

    client.open_account(user_id="u", initial_balance=5).unwrap()
    short = client.debit(user_id="u", amount=10, operation_type="image_generation")
    with pytest.raises(InsufficientTokens, match="Required: 10, Available: 5") as insufficient:
        short.unwrap()
    assert isinstance(insufficient.value, TokenRefused)
    assert insufficient.value.code is ErrorCode.INSUFFICIENT_TOKENS
    assert dbstate.balance("u") == 5
    # a success unwraps to itself
    ok = client.debit(user_id="u", amount=5, operation_type="image_generation")
    assert ok.unwrap() is ok


BAD = [
    ("debit", {"user_id": "u", "amount": True, "operation_type": "image_generation"}),
    ("debit", {"user_id": " ", "amount": 10**13, "operation_type": "x", "metadata": {"k": "\0"}}),
    ("user_entries", {"user_id": "u", "start_date": "2999-12-31T23:00:00-02:00", "limit": 0}),
    ("reserve", {"user_id": "u", "amount": 1, "ttl_seconds": 10**9}),
    ("refund", {"user_id": "u", "amount": 1, "original_entry_id": 0}),
    ("open_account", {"user_id": "u", "initial_balance": 1.5}),
]


@pytest.mark.parametrize(("method", "kwargs"), BAD)
def test_invalid_kwargs_are_refused_before_sending_exactly_as_the_worker_refuses_them(
    e2e: Celery, client: TokenClient, method: str, kwargs: dict[str, Any]
) -> None:
    """One definition: the client checks with the worker's own models, so its refusal is the
    one the worker sends back for the same kwargs, without the round trip."""
    mine = exactly(Failure, getattr(client, method)(**kwargs))
    assert mine.error_code is ErrorCode.VALIDATION_ERROR
    assert mine.model_dump() == call(e2e, spec_of(method).name, **kwargs)
    with pytest.raises(InvalidArguments):
        mine.unwrap()


def test_a_code_newer_than_the_client_still_parses_and_raises_the_base_refusal() -> None:
    newer = contract.DEBIT.parse(
        {"success": False, "error": "Later", "error_code": "SOMETHING_NEW", "hint": 1}
    )
    assert type(newer) is Failure and newer.error_code == "SOMETHING_NEW"
    assert newer.model_extra == {"hint": 1}
    with pytest.raises(TokenRefused) as refused:
        newer.unwrap()
    assert type(refused.value) is TokenRefused


# --- timeouts and retries -------------------------------------------------------------------


def credits_of(user_id: str) -> list[dict[str, Any]]:
    return [e for e in dbstate.entries(user_id) if e["operation_type"] == "purchase"]


def ran(app: Celery, task: str) -> int:
    """How many ``task`` messages the workers have run so far."""
    stats = app.control.inspect(timeout=5, limit=WORKERS).stats() or {}
    assert len(stats) == WORKERS
    return sum(s.get("total", {}).get(task, 0) for s in stats.values())


def idle(app: Celery) -> bool:
    active = app.control.inspect(timeout=5, limit=WORKERS).active() or {}
    return len(active) == WORKERS and not any(active.values())


def test_a_call_retried_after_a_timeout_applies_once(
    e2e: Celery, held: Held, client: TokenClient
) -> None:
    call(e2e, "tokens.open_account", user_id="u")
    before = ran(e2e, "tokens.credit")
    slow = held.client(timeout=1.0, retries=20)
    outcome: list[MovementOut | Failure] = []
    caller = threading.Thread(target=lambda: outcome.append(slow.credit(user_id="u", amount=7)))
    caller.start()
    # The first attempt timed out and the client sent the call again: two messages wait.
    wait_for(lambda: held.waiting() >= 2, 30, "a retry after the first timeout")
    held.release()
    caller.join(60)
    first = exactly(MovementOut, outcome[0])
    held.drained()
    wait_for(lambda: idle(e2e), 30, "every attempt to finish")

    assert ran(e2e, "tokens.credit") - before >= 2  # the retries reached the workers too...
    (entry,) = credits_of("u")  # ...and replayed the one that applied
    assert (str(entry["id"]), entry["tokens_amount"]) == (first.ledger_entry_id, 7)
    assert dbstate.balance("u") == 7
    again = exactly(
        MovementOut,
        client.credit(user_id="u", amount=7, idempotency_key=entry["idempotency_key"]),
    )
    assert again.replayed is True
    assert again.ledger_entry_id == first.ledger_entry_id
    assert len(credits_of("u")) == 1


def test_a_timed_out_call_carries_its_key_and_the_caller_retry_applies_once(
    e2e: Celery, held: Held, client: TokenClient
) -> None:
    """The issue's case: credits that timed out applied later. Two sent without a key both
    apply; the client's, retried by the caller with the key its TokenTimeout carries, once."""
    call(e2e, "tokens.open_account", user_id="u")
    with pytest.raises(TokenTimeout) as timed_out:
        held.client(timeout=0.3, retries=2).credit(user_id="u", amount=7)
    lost = timed_out.value
    assert (lost.task, lost.attempts) == ("tokens.credit", 3)
    assert lost.idempotency_key and f"idempotency_key={lost.idempotency_key!r}" in str(lost)
    assert held.waiting() == 3  # every attempt is still queued: it may still apply
    bare = [e2e.send_task("tokens.credit", kwargs={"user_id": "u", "amount": 7}, queue="held")]
    bare.append(e2e.send_task("tokens.credit", kwargs={"user_id": "u", "amount": 7}, queue="held"))

    retried = exactly(
        MovementOut, client.credit(user_id="u", amount=7, idempotency_key=lost.idempotency_key)
    )
    assert retried.replayed is False  # nothing had applied yet
    held.release()
    for r in bare:
        assert r.get(timeout=30)["success"] is True
    held.drained()
    wait_for(lambda: idle(e2e), 30, "every attempt to finish")

    keyed = [e for e in credits_of("u") if e["idempotency_key"] == lost.idempotency_key]
    assert [str(e["id"]) for e in keyed] == [retried.ledger_entry_id]  # 4 messages, 1 entry
    assert len(credits_of("u")) == 3  # and the two bare credits applied twice
    assert dbstate.balance("u") == 21


@pytest.mark.filterwarnings(
    "ignore:Call to deprecated setex:DeprecationWarning"
)  # celery's, in redis-py 8
def test_a_failed_task_raises_task_failed(e2e: Celery, held: Held) -> None:
    # What a task that failed for good leaves in the backend (the worker writes exactly this);
    # the held message itself never runs.
    e2e.backend.mark_as_failure("renew-1", RuntimeError("database unreachable"))
    with pytest.raises(TaskFailed) as failed:
        held.client(timeout=10).renew_user(user_id="u", task_id="renew-1")
    assert (failed.value.state, failed.value.error) == (
        "FAILURE",
        "RuntimeError: database unreachable",
    )
    assert failed.value.task_id == "renew-1"


def test_a_broker_that_is_down_raises_token_unavailable(e2e: Celery) -> None:
    with (
        TokenClient("redis://127.0.0.1:1/0", urls()[1]) as down,
        pytest.raises(TokenUnavailable) as unavailable,
    ):
        down.debit(user_id="u", amount=1, operation_type="x", idempotency_key="k-1")
    assert unavailable.value.idempotency_key == "k-1"
    assert "Retry with idempotency_key='k-1'" in str(unavailable.value)


def test_publishes_with_confirms_on_rabbitmq_and_retries_a_failed_publish() -> None:
    """issue 25, the producer's side: confirms where the broker offers them (RabbitMQ), and a
    publish that failed on the connection sent again (the same message) before giving up."""
    from token_worker_client.client import PUBLISH_RETRY, Transport

    amqp = Transport("amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/1")
    redis_broker = Transport("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/1")
    try:
        assert amqp.app.conf.broker_transport_options == {"confirm_publish": True}
        assert redis_broker.app.conf.broker_transport_options == {}
        for transport in (amqp, redis_broker):
            assert transport.app.conf.task_publish_retry is True
            assert transport.app.conf.task_publish_retry_policy == PUBLISH_RETRY
        custom = Transport(
            "amqp://guest:guest@127.0.0.1:5672//",
            "redis://127.0.0.1:6379/1",
            {"broker_transport_options": {"confirm_publish": False}},
        )
        assert custom.app.conf.broker_transport_options == {"confirm_publish": False}
        custom.close()
    finally:
        amqp.close()
        redis_broker.close()

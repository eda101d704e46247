"""AsyncTokenClient through real workers: every method, many calls at once, an event loop that
keeps running while calls wait, and a timed-out capture retried by its task id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from celery import Celery

from tests import dbstate
from tests.client.conftest import HELD, Held, urls
from tests.client.test_client import every_method, exactly, idle
from tests.polling import wait_for
from tests.support import call
from token_worker_client import (
    AsyncTokenClient,
    CaptureOut,
    ErrorCode,
    Failure,
    MovementOut,
    ReservationNotActive,
    TokenTimeout,
)


class Blocking:
    """An AsyncTokenClient's methods, each run to completion on one event loop."""

    def __init__(self, client: AsyncTokenClient, runner: asyncio.Runner) -> None:
        self.client = client
        self.runner = runner

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method: Callable[..., Coroutine[Any, Any, Any]] = getattr(self.client, name)
        return lambda **kwargs: self.runner.run(method(**kwargs))


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


def test_every_method_returns_its_model(e2e: Celery, runner: asyncio.Runner) -> None:
    client = AsyncTokenClient(*urls(), timeout=30)
    try:
        every_method(e2e, Blocking(client, runner))
    finally:
        runner.run(client.aclose())


def test_many_concurrent_calls(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="hot", initial_balance=1000)
    outcomes = asyncio.run(debits_and_reads())
    debits = [exactly(MovementOut, o) for o in outcomes[:60]]
    assert len({d.ledger_entry_id for d in debits}) == 60
    assert sorted(d.new_balance for d in debits) == list(range(400, 1000, 10))
    assert dbstate.balance("hot") == 400
    assert all(o.success for o in outcomes[60:])


async def debits_and_reads() -> list[Any]:
    async with AsyncTokenClient(*urls(), timeout=30, max_concurrency=8) as client:
        return await asyncio.gather(
            *(
                client.debit(user_id="hot", amount=10, operation_type="image_generation")
                for _ in range(60)
            ),
            *(client.get_balance(user_id="hot") for _ in range(20)),
        )


def test_the_event_loop_runs_while_a_call_waits(e2e: Celery, held: Held) -> None:
    asyncio.run(loop_runs_while_a_call_waits())


async def loop_runs_while_a_call_waits() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    async with AsyncTokenClient(*urls(), config={"task_default_queue": HELD}) as client:
        started = time.monotonic()
        with pytest.raises(TokenTimeout):
            await client.get_balance(user_id="u", timeout=1.0)
        waited = time.monotonic() - started
    ticker.cancel()
    assert waited >= 3.0  # three attempts of a second each (retries=2)...
    assert ticks >= 100  # ...during which the loop kept ticking every 10 ms


def test_a_timed_out_capture_is_retried_by_its_task_id(e2e: Celery, held: Held) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    reservation = call(e2e, "tokens.reserve", user_id="u", amount=40)["reservation_id"]
    retried = asyncio.run(capture_retried_by_task_id(e2e, held, reservation))
    captures = [e for e in dbstate.entries("u") if e["tokens_amount"] == -25]
    assert [str(e["id"]) for e in captures] == [retried.ledger_entry_id]
    assert dbstate.balance("u") == 75


async def capture_retried_by_task_id(e2e: Celery, held: Held, reservation: str) -> CaptureOut:
    async with AsyncTokenClient(*urls(), timeout=0.3, retries=1,
                                config={"task_default_queue": HELD}) as slow:  # fmt: skip
        with pytest.raises(TokenTimeout) as timed_out:
            await slow.capture(reservation_id=reservation, amount=25)
    lost = timed_out.value
    assert (lost.idempotency_key, lost.attempts) == (None, 2)
    assert f"task_id={lost.task_id!r}" in str(lost)

    async with AsyncTokenClient(*urls(), timeout=30) as client:
        retried = exactly(
            CaptureOut,
            await client.capture(reservation_id=reservation, amount=25, task_id=lost.task_id),
        )
        assert retried.new_balance == 75
        # the same capture under another task id is another request: refused, not replayed
        other = await client.capture(reservation_id=reservation, amount=25)
        assert isinstance(other, Failure)
        assert other.error_code is ErrorCode.RESERVATION_NOT_ACTIVE
        with pytest.raises(ReservationNotActive, match="Reservation is captured"):
            other.unwrap()
        held.release()  # the two timed-out attempts run now: they replay the capture
        held.drained()
        wait_for(lambda: idle(e2e), 30, "the held attempts to finish")
        again = await client.capture(reservation_id=reservation, amount=25, task_id=lost.task_id)
        assert exactly(CaptureOut, again).ledger_entry_id == retried.ledger_entry_id
    return retried

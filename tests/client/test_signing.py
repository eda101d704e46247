"""token_worker_client.signing: the signature a client puts on each message is the HMAC of the
body bytes a consumer receives (kombu's in-memory transport: no broker, nothing decoded on the
way), for every publish path of the app; the clients sign when given a producer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from celery import Celery

from token_worker_client import AsyncTokenClient, TokenClient
from token_worker_client.signing import HEADER, Signer, sign_messages, signature

KEY = b"k" * 32


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery(
        "signing-test", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    app.conf.task_serializer = "json"
    sign_messages(app, Signer("web", KEY))
    yield app
    app.close()


def received(app: Celery, queue: str = "signed") -> Any:
    with app.connection_for_read() as conn:
        return conn.SimpleQueue(queue).get(timeout=1)


def verified(message: Any) -> bool:
    return bool(message.headers[HEADER] == f"web:{signature(KEY, message.body)}")


def test_what_is_signed_is_the_body_the_consumer_receives(app: Celery) -> None:
    kwargs = {
        "user_id": "é ✓ \u2028 \U0001f600",
        "amount": 10,
        "metadata": {"z": [1.5, None, True], "a": {"nested": "x"}},
        "when": datetime(2026, 12, 1, tzinfo=UTC),  # kombu's {"__type__": ...} encodings
        "price": Decimal("1.10"),
        "ref": uuid.uuid4(),
    }
    app.send_task("tokens.debit", kwargs=kwargs, queue="signed")
    assert verified(received(app))


def test_options_and_headers_given_are_signed_over_too(app: Celery) -> None:
    app.send_task(
        "tokens.debit",
        args=[1],
        kwargs={"user_id": "u"},
        queue="signed",
        countdown=5,
        expires=60,
        # A retry passes the retried request's headers, its old signature among them.
        headers={HEADER: "web:" + "0" * 64, "x-other": "kept"},
        link=app.signature("tokens.get_balance", kwargs={"user_id": "u"}),
    )
    message = received(app)
    assert verified(message)
    assert message.headers["x-other"] == "kept"


def test_apply_async_through_a_task_and_a_group(app: Celery) -> None:
    @app.task(name="tokens.ping_me", shared=False)  # type: ignore[untyped-decorator]
    def ping_me(n: int) -> int:
        return n

    ping_me.apply_async((1,), queue="signed")
    assert verified(received(app))
    from celery import group

    group(ping_me.si(n).set(queue="signed") for n in range(3)).apply_async()
    assert all(verified(received(app)) for _ in range(3))


def test_another_app_in_the_process_is_not_signed(app: Celery) -> None:
    other = Celery("unsigned", broker="memory://", backend="cache+memory://", set_as_current=False)
    try:
        other.send_task("tokens.debit", kwargs={}, queue="unsigned")
        assert HEADER not in received(other, "unsigned").headers
    finally:
        other.close()


def test_signer_of() -> None:
    assert Signer.of(None, None) is None
    with pytest.raises(ValueError, match="both a name and a key"):
        Signer.of("web", None)
    assert repr(Signer.of("web", "s" * 32)) == "Signer('web')"  # never the key


def sent_by(client: TokenClient | AsyncTokenClient) -> Any:
    app = client.transport.app
    app.send_task("tokens.get_balance", kwargs={"user_id": "u"}, queue="signed")
    return received(app)


def test_the_clients_sign_when_given_a_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    urls = ("memory://", "cache+memory://")
    with TokenClient(*urls, producer="web", producer_key=KEY.decode()) as client:
        assert verified(sent_by(client))
    monkeypatch.setenv("TOKENS_PRODUCER_NAME", "web")
    monkeypatch.setenv("TOKENS_PRODUCER_KEY", KEY.decode())
    aio = AsyncTokenClient(*urls)
    try:
        assert verified(sent_by(aio))
    finally:
        asyncio.run(aio.aclose())
    # A worker's environment names its own producer, without a key: nothing is signed.
    monkeypatch.delenv("TOKENS_PRODUCER_KEY")
    with TokenClient(*urls) as unsigned:
        assert HEADER not in sent_by(unsigned).headers
    monkeypatch.setenv("TOKENS_PRODUCER_KEY", KEY.decode())
    monkeypatch.delenv("TOKENS_PRODUCER_NAME")
    with pytest.raises(ValueError, match="both a name and a key"):
        TokenClient(*urls)

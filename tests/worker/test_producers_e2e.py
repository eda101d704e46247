"""Producers allowed to move money (worker/producers.py), end to end: one real worker with
``TOKENS_PRODUCERS`` set, beat and the coalescer inside it, on a broker of its own (a private
Redis pair, or a private RabbitMQ virtual host), so the session's workers, which check nobody,
never take these messages, and its own fan-out and beat stay with it.

Producers: ``web`` (debit, reserve, capture, ``tokens.get_*``; two keys, as during a rotation),
``billing`` (everything), and ``worker``, the worker's own. What is refused must come back
``UNAUTHORIZED`` with nothing changed; what is signed and allowed must apply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish
from kombu.serialization import dumps

from tests import dbstate
from tests.devenv import Scratch
from tests.polling import wait_for
from tests.support import WorkerProcess, free_port, running_workers
from token_worker_client import TokenClient, Unauthorized
from token_worker_client.signing import HEADER, Signer, sign_messages
from worker.coalescer import QUEUE as COALESCED
from worker.settings import get_settings

WORKER_KEY = "w" * 40
WEB_KEY, WEB_OLD_KEY = "n" * 40, "o" * 40
BILLING_KEY = "b" * 40
PRODUCERS = {
    "worker": {"key": WORKER_KEY, "tasks": ["*"]},
    "web": {
        "keys": [WEB_KEY, WEB_OLD_KEY],
        "tasks": ["tokens.debit", "tokens.reserve", "tokens.capture", "tokens.get_*"],
    },
    "billing": {"key": BILLING_KEY, "tasks": ["*"]},
}
UNSIGNED = {"success": False, "error": "Unsigned message", "error_code": "UNAUTHORIZED"}
REFUSED = "unauthorized: "


def refusal(producer: str, task: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": f"Producer {producer} may not send {task}",
        "error_code": "UNAUTHORIZED",
    }


class Private:
    """The worker's broker and backend (and its RedBeat's Redis), apart from the session's."""

    def __init__(self) -> None:
        self.scratch = Scratch("tokens_auth")  # its database is made and dropped unused
        self.scratch.create()
        self.quorum = self.scratch.env.get("TOKENS_QUEUE_TYPE") == "quorum"

    @property
    def config(self) -> dict[str, Any]:
        """What a producer of this broker needs beyond its URLs."""
        if not self.quorum:
            return {}
        return {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"}

    def app(self, signer: Signer | None = None) -> Celery:
        app = Celery(
            "auth-producer",
            broker=self.scratch.broker_url,
            backend=self.scratch.backend_url,
            set_as_current=False,
        )
        app.conf.update(self.config)
        if signer is not None:
            sign_messages(app, signer)
        return app

    def client(self, producer: str, key: str, **config: Any) -> TokenClient:
        return TokenClient(
            self.scratch.broker_url,
            self.scratch.backend_url,
            timeout=20,
            retries=0,
            config={**self.config, **config},
            producer=producer,
            producer_key=key,
        )


@pytest.fixture(scope="module")
def private() -> Iterator[Private]:
    broker = Private()
    try:
        yield broker
    finally:
        broker.scratch.destroy()


@pytest.fixture(scope="module")
def guarded(private: Private, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    env = {
        **private.scratch.env,
        "TOKENS_DATABASE_URL": get_settings().db_url,  # the session's database
        "TOKENS_PRODUCERS": json.dumps(PRODUCERS),
        "TOKENS_COALESCE_MS": "20",
        "TOKENS_RESERVATION_EXPIRY_SECONDS": "3",  # each run lives 3 s
        # RedBeat's schedule and lock in this broker's own results database, flushed when it was
        # made: on the broker's slot database a beat of an earlier module (the same slot, or
        # RabbitMQ's runs sharing it) could still hold the lock, and this beat never ticked.
        "TOKENS_REDBEAT_REDIS_URL": private.scratch.backend_url,
        "TOKENS_METRICS_PORT": str(free_port()),
        "TOKENS_METRICS_DIR": str(tmp_path_factory.mktemp("auth-metrics")),
    }
    w = WorkerProcess(f"auth-{os.getpid()}", env=env)
    w.argv += ["-B"]  # beat inside: its messages are the worker's own, signed as `worker`
    with running_workers(private.app(), w):
        yield w


@pytest.fixture
def web(private: Private, guarded: WorkerProcess, clean_db: None) -> Iterator[TokenClient]:
    with private.client("web", WEB_KEY) as client:
        yield client


@pytest.fixture
def alice() -> str:
    """A user of one test's own (its name unique, whatever other tables keep between tests)."""
    return f"alice-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def billing(
    private: Private, guarded: WorkerProcess, clean_db: None, alice: str
) -> Iterator[TokenClient]:
    with private.client("billing", BILLING_KEY) as client:
        client.open_account(user_id=alice, initial_balance=100).unwrap()
        yield client


def unchanged(user_id: str) -> None:
    """Nothing but the opening credit: the refused messages moved nothing."""
    assert dbstate.balance(user_id) == 100
    assert [e["operation_type"] for e in dbstate.entries(user_id)] == ["adjustment"]


def refusals_logged(worker: WorkerProcess, task_id: str) -> list[str]:
    return [
        line
        for line in worker.log_path.read_text(errors="replace").splitlines()
        if REFUSED in line and task_id in line
    ]


def send(app: Celery, task: str, queue: str | None = None, **kwargs: Any) -> Any:
    return app.send_task(task, kwargs=kwargs, queue=queue)


def debit(user_id: str, amount: int = 10) -> dict[str, Any]:
    return {"user_id": user_id, "amount": amount, "operation_type": "image_generation"}


def test_a_signed_allowed_debit_applies(web: TokenClient, billing: TokenClient, alice: str) -> None:
    spent = web.debit(**debit(alice)).unwrap()
    assert spent.new_balance == 90
    assert dbstate.balance(alice) == 90


def test_unsigned_forged_and_unknown_producers_are_refused_and_change_nothing(
    private: Private, guarded: WorkerProcess, billing: TokenClient, alice: str
) -> None:
    sent = {
        "unsigned": send(private.app(), "tokens.debit", **debit(alice)),
        "forged": send(private.app(Signer("web", b"x" * 40)), "tokens.debit", **debit(alice)),
        "unknown": send(
            private.app(Signer("mallory", WEB_KEY.encode())), "tokens.debit", **debit(alice)
        ),
        # The worker's own name with another's key is forged too.
        "as_worker": send(private.app(Signer("worker", BILLING_KEY.encode())), "tokens.credit",
                          user_id=alice, amount=1000),
    }  # fmt: skip
    results = {name: r.get(timeout=20) for name, r in sent.items()}
    assert results == {
        "unsigned": UNSIGNED,
        "forged": refusal("web", "tokens.debit"),
        "unknown": UNSIGNED,
        "as_worker": refusal("worker", "tokens.credit"),
    }
    assert all(private.app().AsyncResult(r.id).state == "SUCCESS" for r in sent.values())
    unchanged(alice)
    # One line each, saying which check failed.
    whys = {name: refusals_logged(guarded, r.id) for name, r in sent.items()}
    assert all(len(lines) == 1 for lines in whys.values()), whys
    assert "no tokens-signature header" in whys["unsigned"][0]
    assert "matches no key of web" in whys["forged"][0]
    assert "names no producer this worker knows" in whys["unknown"][0]
    assert WEB_KEY not in guarded.log_path.read_text()


def test_a_task_outside_the_producers_patterns_is_refused_naming_it(
    web: TokenClient, billing: TokenClient, guarded: WorkerProcess, alice: str
) -> None:
    refused = web.credit(user_id=alice, amount=1000)
    assert refused.model_dump() == refusal("web", "tokens.credit")
    with pytest.raises(Unauthorized, match=r"Producer web may not send tokens\.reset_balance"):
        web.reset_balance(user_id=alice, new_balance=10**6).unwrap()
    unchanged(alice)
    # billing may send anything.
    assert billing.credit(user_id=alice, amount=5).unwrap().new_balance == 105
    port = guarded.env["TOKENS_METRICS_PORT"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    counted = re.search(
        rb'tokens_unauthorized_total\{producer="web",task="tokens.credit"\} ([0-9.]+)', metrics
    )
    assert counted is not None and float(counted.group(1)) >= 1


def test_a_wildcard_pattern_and_a_second_key(
    private: Private, web: TokenClient, billing: TokenClient, alice: str
) -> None:
    assert web.get_balance(user_id=alice).unwrap().tokens_balance == 100  # tokens.get_*
    refused = web.user_entries(user_id=alice)  # ledger.*: not web's
    assert refused.model_dump() == refusal("web", "ledger.user_entries")
    # Rotation: the second key still verifies.
    with private.client("web", WEB_OLD_KEY) as old:
        assert old.debit(**debit(alice)).unwrap().new_balance == 90


def test_the_workers_own_fan_out_and_beat_are_signed(
    billing: TokenClient, alice: str, guarded: WorkerProcess
) -> None:
    # A sweep fans out into chunks and a totals task, published by the worker itself: with
    # them refused the sweep would never finish, nor anyone renew.
    lapsed = datetime.now(UTC) - timedelta(days=45)
    for n in range(3):
        billing.open_account(user_id=f"{alice}-due{n}", last_renewal_at=lapsed).unwrap()
    swept = billing.sweep(timeout=60).unwrap()
    assert swept.successful >= 3  # alice too, never renewed
    assert all(dbstate.balance(f"{alice}-due{n}") == 100 for n in range(3))
    # Beat sends reservations.expire every 3 s here: a reservation past its end is released.
    hold = billing.reserve(user_id=alice, amount=30, ttl_seconds=1).unwrap()
    wait_for(
        lambda: (
            dbstate.rows("SELECT status FROM reservations WHERE id = :id", id=hold.reservation_id)[
                0
            ]["status"]
            == "expired"
        ),
        45,
        f"beat's reservations.expire (the worker's log: {guarded.log_path})",
    )
    # Beat inside the worker once closed a socket of its own on its first send: its metric
    # handler closed files the worker had open, whose numbers beat's connections had taken.
    log = guarded.log_path.read_text(errors="replace")
    assert "Signal handler" not in log, [line for line in log.splitlines() if "raised" in line]


def test_the_coalescer_is_guarded(private: Private, billing: TokenClient, alice: str) -> None:
    unsigned = send(private.app(), "tokens.debit", COALESCED, **debit(alice))
    assert unsigned.get(timeout=20) == UNSIGNED
    unchanged(alice)
    with private.client("web", WEB_KEY, task_routes={"tokens.debit": {"queue": COALESCED}}) as web:
        assert web.debit(**debit(alice)).unwrap().new_balance == 90
        assert web.credit(user_id=alice, amount=1).model_dump() == refusal("web", "tokens.credit")


# --- a producer with none of this project's code (docs/operators.md) ----------------------------


def sign_with_celery_signal(name: str, key: bytes) -> Any:
    """The operator guide's example: sign in Celery's ``before_task_publish``."""

    def sign(body: Any = None, headers: Any = None, **_: Any) -> None:
        _type, encoding, payload = dumps(body, serializer="json")  # type: ignore[no-untyped-call]
        raw = payload.encode(encoding) if isinstance(payload, str) else payload
        headers[HEADER] = f"{name}:" + hmac.new(key, raw, hashlib.sha256).hexdigest()

    return sign


def test_a_producer_signing_by_hand(private: Private, billing: TokenClient, alice: str) -> None:
    sign = sign_with_celery_signal("web", WEB_KEY.encode())
    before_task_publish.connect(sign, weak=False)
    try:
        app = private.app()
        spent = send(app, "tokens.debit", user_id=alice, amount=7,
                     operation_type="image_generation", metadata={
            "note": "é ✓ \u2028", "nested": [1.5, {"a": None}]})  # fmt: skip
        assert spent.get(timeout=20)["success"] is True
    finally:
        before_task_publish.disconnect(sign)
    assert dbstate.balance(alice) == 93

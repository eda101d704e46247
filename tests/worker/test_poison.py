"""Poison messages, through the real broker (Redis; or RabbitMQ with TOKENS_TEST_BROKER=amqp or
quorum) to a real prefork worker.

Whatever arrives (any nesting depth in the body or the headers, any size, encoding, content type or
body shape, any task name, malformed headers, an envelope the transport cannot read), the worker
stays up, the message is acknowledged once and never comes back, one line is logged and one
``message_refused`` sent, and where the task id can be read the producer gets the contract's
``VALIDATION_ERROR`` result. The next ordinary ``tokens.debit`` is served.

Messages Celery's producer would refuse to build are written to Redis as kombu would (the same
JSON envelope, ``LPUSH`` on the queue's list), or published to RabbitMQ as they are (headers,
properties and body as AMQP carries them). Redis's JSON envelope has no counterpart on RabbitMQ,
whose frames the AMQP client decodes: the cases of a malformed envelope are Redis's only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection  # type: ignore[attr-defined]
from kombu.message import Message

from accounting.accounts import open_account
from tests import dbstate
from tests.polling import wait_for
from tests.support import WorkerProcess, running_workers
from worker.db import session_scope

QUEUE = f"poison-{os.getpid()}"
MAX_BYTES = 64 * 1024  # the poison worker's TOKENS_MAX_MESSAGE_BYTES, so "oversized" stays cheap
DEEP = "nested deeper than 32 levels"
REFUSED = "Refused message"
DEBIT = {"user_id": "u", "amount": 1, "operation_type": "chatgpt_message"}


def deep_list(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def deep_dict(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def invalid(error: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": f"Invalid arguments: {error}",
        "error_code": "VALIDATION_ERROR",
    }


def headers(task: Any = "tokens.get_balance", task_id: Any = None, **extra: Any) -> dict[str, Any]:
    """Protocol 2 headers as Celery's producer writes them."""
    h: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test_poison",
        "ignore_result": False,
    }
    return h | extra


def envelope(
    body: bytes | str,
    hdrs: Any,
    content_type: Any = "application/json",
    **properties: Any,
) -> dict[str, Any]:
    """The JSON document kombu's Redis transport keeps in the queue's list."""
    raw = body.encode() if isinstance(body, str) else body
    return {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": hdrs,
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": QUEUE, "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        | properties,
    }


BODY = json.dumps([[], {"user_id": "u"}, {"callbacks": None, "errbacks": None, "chain": None}])


# --- the poison worker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("poison") / "signals.jsonl"


@pytest.fixture(scope="module")
def poison_worker(app: Celery, sink: Path) -> Iterator[WorkerProcess]:
    env = {
        "TOKENS_MAX_MESSAGE_BYTES": str(MAX_BYTES),
        "TOKENS_TEST_SIGNAL_SINK": str(sink),
        "TOKENS_MESSAGE_REFUSED_HANDLERS": '["tests.worker.signal_sink:on_message_refused"]',
    }
    w = WorkerProcess(f"poison-{os.getpid()}", concurrency=1, env=env, queues=QUEUE)
    w.start()
    try:
        w.wait_ready(app)
        yield w
    finally:
        w.stop()


class RedisQueue:
    """A queue (QUEUE unless named) on Redis: kombu's list, and its ``unacked`` hash."""

    amqp = False

    def __init__(self, url: str, queue: str = QUEUE) -> None:
        self.client = redis.Redis.from_url(url)
        self.queue = queue

    def push(self, message: dict[str, Any] | str) -> None:
        raw = message if isinstance(message, str) else json.dumps(message)
        self.client.lpush(self.queue, raw)

    def waiting(self) -> int:
        return int(self.client.llen(self.queue))

    def unacked(self) -> int:
        """Messages of the queue delivered and not yet acknowledged (kombu's ``unacked`` hash)."""
        return len(self._unacked())

    def _unacked(self) -> list[Any]:
        held = []
        for raw in self.client.hvals("unacked"):
            try:
                _message, _exchange, routing_key = json.loads(raw)
            except ValueError:
                continue
            if routing_key == self.queue:
                held.append(raw)
        return held

    def empty(self) -> None:
        self.client.delete(self.queue)
        held = self._unacked()
        for tag, raw in self.client.hgetall("unacked").items():
            if raw in held:
                self.client.hdel("unacked", tag)


class AmqpQueue:
    """A queue (QUEUE unless named) on RabbitMQ, bound to the exchange of its name: published
    to as a producer would, counted by RabbitMQ itself."""

    amqp = True

    def __init__(self, url: str, queue: str = QUEUE) -> None:
        self.url = url
        self.vhost = url.rsplit("/", 1)[1] or "/"
        self.queue = queue

    def push(self, message: dict[str, Any] | str) -> None:
        assert isinstance(message, dict), "a raw Redis envelope: not for RabbitMQ"
        props = message["properties"]
        with Connection(self.url) as conn:  # type: ignore[no-untyped-call]
            channel = conn.channel()
            channel.basic_publish(
                channel.prepare_message(
                    base64.b64decode(message["body"]),
                    content_type=message["content-type"],
                    content_encoding=message["content-encoding"],
                    headers=message["headers"],
                    properties={
                        k: props[k] for k in ("correlation_id", "reply_to", "delivery_mode")
                    },
                ),
                exchange=self.queue,
                routing_key=self.queue,
            )

    def _counts(self) -> tuple[int, int]:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "-p", self.vhost, "--no-table-headers",
             "name", "messages_ready", "messages_unacknowledged"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        for line in done.stdout.splitlines():
            name, ready, unacked = line.split()
            if name == self.queue:
                return int(ready), int(unacked)
        return 0, 0

    def waiting(self) -> int:
        return self._counts()[0]

    def unacked(self) -> int:
        return self._counts()[1]

    def empty(self) -> None:
        conn = Connection(self.url)  # type: ignore[no-untyped-call]
        with conn, contextlib.suppress(*conn.channel_errors):  # not declared yet
            conn.default_channel.queue_purge(self.queue)  # type: ignore[no-untyped-call]


BrokerQueue = RedisQueue | AmqpQueue

#: Cases about Redis's JSON envelope, which RabbitMQ's messages do not have.
REDIS_ONLY = {"header_nested_beyond_what_json_decodes", "headers_not_an_object"}


def broker_queue(queue: str = QUEUE) -> BrokerQueue:
    """``queue`` on the session's broker."""
    url = os.environ["TOKENS_BROKER_URL"]
    return AmqpQueue(url, queue) if url.startswith("amqp") else RedisQueue(url, queue)


@pytest.fixture(scope="module")
def broker() -> BrokerQueue:
    return broker_queue()


@dataclass
class Harness:
    app: Celery
    worker: WorkerProcess
    broker: BrokerQueue
    sink: Path
    refused_before: int = 0
    signals_before: int = 0
    sent: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.worker.log_path.read_text(errors="replace")

    def signals(self) -> list[dict[str, Any]]:
        if not self.sink.exists():
            return []
        lines = [json.loads(line) for line in self.sink.read_text().splitlines()]
        return [e for e in lines if e["signal"] == "message_refused"]

    def push(self, message: dict[str, Any] | str) -> None:
        self.broker.push(message)

    def send(self, name: str, **options: Any) -> str:
        return str(self.app.send_task(name, queue=QUEUE, **options).id)

    def debit_served(self) -> None:
        """An ordinary debit sent after the poison comes back: the poison was handled (one
        consumer, one message at a time, in order) and the worker is up."""
        result = self.app.send_task("tokens.debit", kwargs=DEBIT, queue=QUEUE)
        deadline = time.monotonic() + 30
        while not result.ready():
            assert self.worker.proc is not None
            if self.worker.proc.poll() is not None:
                crit = [ln for ln in self.log().splitlines() if "CRITICAL" in ln]
                raise AssertionError(f"the worker died: {crit[-1:] or self.worker.log_path}")
            assert time.monotonic() < deadline, "the debit after the poison was not served"
            time.sleep(0.05)
        assert result.get()["success"] is True

    def assert_refused(
        self, task_id: str | None, task: str | None, reason: str, result: dict[str, Any] | None
    ) -> None:
        self.debit_served()
        if task_id is not None:
            assert result is not None
            stored = self.app.AsyncResult(task_id)
            assert stored.get(timeout=10) == result
            assert stored.state == "SUCCESS"
        # Acknowledged: neither waiting in the queue nor held to come back after the timeout.
        # (The debit just served is acknowledged a moment after its result is stored.)
        assert self.broker.waiting() == 0
        wait_for(lambda: self.broker.unacked() == 0, 10, "every message acknowledged")
        lines = [ln for ln in self.log().splitlines() if REFUSED in ln][self.refused_before :]
        assert len(lines) == 1, lines
        if task_id is not None:
            assert task_id in lines[0]
        [signal] = self.signals()[self.signals_before :]
        assert (signal["task_id"], signal["task"], signal["reason"]) == (task_id, task, reason)
        assert dbstate.balance("u") == 999  # the poison changed nothing; the debit applied once


@pytest.fixture
def poison(
    app: Celery, poison_worker: WorkerProcess, broker: BrokerQueue, sink: Path, clean_db: None
) -> Harness:
    # A poison message that killed the worker (as it did before the guard) went back on the
    # queue: empty it and start the worker again, so each case shows its own outcome.
    broker.empty()
    assert poison_worker.proc is not None
    if poison_worker.proc.poll() is not None:
        poison_worker.start()
        poison_worker.wait_ready(app)
    with session_scope() as session:
        open_account(session, "u", initial_balance=1000)
    h = Harness(app, poison_worker, broker, sink)
    h.refused_before = h.log().count(REFUSED)
    h.signals_before = len(h.signals())
    return h


# --- cases: each sends one poison message and says what must come of it ---------------------

Case = Callable[[Harness], tuple[str | None, str | None, str, dict[str, Any] | None]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@case
def credit_metadata_nested_500_deep(h: Harness) -> Any:
    kwargs = {"user_id": "u", "amount": 1, "metadata": deep_dict(500)}
    tid = h.send("tokens.credit", kwargs=kwargs)
    return tid, "tokens.credit", "depth", invalid(f"kwargs.metadata: {DEEP}")


@case
def positional_argument_nested_deep(h: Harness) -> Any:
    tid = h.send("tokens.debit", args=[deep_list(200)])
    return tid, "tokens.debit", "depth", invalid(f"args.0: {DEEP}")


@case
def get_balance_user_id_a_nested_list(h: Harness) -> Any:
    tid = h.send("tokens.get_balance", kwargs={"user_id": deep_list(33)})
    return tid, "tokens.get_balance", "depth", invalid(f"kwargs.user_id: {DEEP}")


@case
def embed_nested_deep(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    body = [[], {"user_id": "u"}, {"callbacks": None, "errbacks": None, "chain": deep_list(500)}]
    h.push(envelope(json.dumps(body), headers(task_id=tid)))
    return tid, "tokens.get_balance", "depth", invalid(f"embed.chain: {DEEP}")


@case
def header_nested_deep(h: Harness) -> Any:
    # The AMQP client encodes a header table recursively: 500 levels do not leave the producer.
    levels = 100 if h.broker.amqp else 500
    tid = h.send(
        "tokens.get_balance", kwargs={"user_id": "u"}, headers={"x-deep": deep_list(levels)}
    )
    return tid, "tokens.get_balance", "depth", invalid(f"headers.x-deep: {DEEP}")


@case
def header_nested_beyond_what_json_decodes(h: Harness) -> Any:
    message = json.dumps(envelope(BODY, headers(task_id=str(uuid.uuid4()), x=None)))
    h.push(message.replace('"x": null', '"x": ' + "[" * 100_000 + "]" * 100_000))
    return None, None, "envelope", None


def body_shape(
    name: str, body: str, error: str = "message body: expected [args, kwargs, embed]"
) -> None:
    def send(h: Harness) -> Any:
        tid = str(uuid.uuid4())
        h.push(envelope(body, headers(task_id=tid)))
        return tid, "tokens.get_balance", "shape", invalid(error)

    CASES[name] = send


body_shape("body_a_json_object", '{"args": [], "kwargs": {"user_id": "u"}}')
body_shape("body_a_number", "5")
body_shape("body_a_string", '"[[], {}, {}]"')
body_shape("body_a_two_element_list", '[[], {"user_id": "u"}]')
body_shape("body_null", "null")
body_shape("body_empty", "")
body_shape("body_args_not_a_list", '[{}, {"user_id": "u"}, {}]', "args: expected a list")
body_shape(
    "body_kwargs_not_an_object", '[[], [["user_id", "u"]], {}]', "kwargs: expected an object"
)
body_shape(
    "body_embed_not_an_object", '[[], {"user_id": "u"}, "args"]', "embed: expected an object"
)


@case
def body_not_json(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope('[[], {"user_id": "u"}, {}', headers(task_id=tid)))
    return tid, "tokens.get_balance", "decode", invalid("message body: not valid JSON")


@case
def body_not_utf8(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(b'[[], {"user_id": "\xff\xfe"}, {}]', headers(task_id=tid)))
    return tid, "tokens.get_balance", "decode", invalid("message body: not UTF-8")


@case
def body_pickled(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    body = pickle.dumps(([], {"user_id": "u"}, {}))
    h.push(envelope(body, headers(task_id=tid), "application/x-python-serialize"))
    error = "message body: content type application/x-python-serialize is not accepted (JSON only)"
    return tid, "tokens.get_balance", "content_type", invalid(error)


@case
def body_of_unknown_content_type(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(task_id=tid), "application/x-nope"))
    error = "message body: content type application/x-nope is not accepted (JSON only)"
    return tid, "tokens.get_balance", "content_type", invalid(error)


@case
def body_of_trusted_raw_content_type(h: Harness) -> Any:
    # kombu hands application/data through undecoded, whatever accept_content says.
    tid = str(uuid.uuid4())
    h.push(envelope(b"abc", headers(task_id=tid), "application/data"))
    error = "message body: content type application/data is not accepted (JSON only)"
    return tid, "tokens.get_balance", "content_type", invalid(error)


@case
def body_compressed(h: Harness) -> Any:
    # kombu would decompress it before anything could look at its size: refused unread.
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(task_id=tid, compression="application/x-gzip")))
    error = "headers.compression: compressed messages are not accepted"
    return tid, "tokens.get_balance", "headers", invalid(error)


@case
def body_compressed_with_an_unknown_method(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(task_id=tid, compression="application/x-nope")))
    error = "headers.compression: compressed messages are not accepted"
    return tid, "tokens.get_balance", "headers", invalid(error)


@case
def body_oversized(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    body = json.dumps([[], {"user_id": "u" * MAX_BYTES}, {}])
    h.push(envelope(body, headers(task_id=tid)))
    error = f"message body: {len(body)} bytes; at most {MAX_BYTES} allowed"
    return tid, "tokens.get_balance", "size", invalid(error)


@case
def envelope_oversized(h: Harness) -> Any:
    # Far past the bound: dropped unread by the transport, so no id to answer.
    body = json.dumps([[], {"user_id": "u" * (4 * 1024 * 1024)}, {}])
    h.push(envelope(body, headers(task_id=str(uuid.uuid4()))))
    return None, None, "size", None


@case
def unknown_task_name(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers("tokens.nope", tid)))
    return tid, "tokens.nope", "headers", invalid("headers.task: unknown task tokens.nope")


@case
def task_header_a_list(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(["tokens.debit"], tid)))
    return tid, None, "headers", invalid("headers.task: expected a string")


@case
def task_header_missing(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    hdrs = headers(task_id=tid)
    del hdrs["task"]
    h.push(envelope(BODY, hdrs))
    return tid, None, "headers", invalid("headers.task: missing")


@case
def id_missing(h: Harness) -> Any:
    hdrs = headers("tokens.get_balance")
    del hdrs["id"]
    h.push(envelope(BODY, hdrs))
    return None, "tokens.get_balance", "headers", None


@case
def id_not_a_string(h: Harness) -> Any:
    h.push(envelope(BODY, headers("tokens.get_balance", 12345)))
    return None, "tokens.get_balance", "headers", None


@case
def eta_not_a_date(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(task_id=tid, eta="tomorrow")))
    return tid, "tokens.get_balance", "headers", invalid("headers.eta: not an ISO 8601 date")


@case
def time_limit_past_the_visibility_timeout(h: Harness) -> Any:
    tid = h.send("tokens.get_balance", kwargs={"user_id": "u"}, time_limit=3600)
    error = "headers.timelimit: must be below the visibility timeout (300 s)"
    return tid, "tokens.get_balance", "headers", invalid(error)


@case
def headers_not_an_object(h: Harness) -> Any:
    h.push(envelope(BODY, ["tokens.get_balance", str(uuid.uuid4())]))
    return None, None, "envelope", None


@case
def envelope_not_json(h: Harness) -> Any:
    h.push('{"body": "W10=", "headers": {')
    return None, None, "envelope", None


@case
def envelope_a_list(h: Harness) -> Any:
    h.push(json.dumps([1, 2, 3]))
    return None, None, "envelope", None


@case
def envelope_a_number(h: Harness) -> Any:
    h.push("5")
    return None, None, "envelope", None


@case
def envelope_with_an_unknown_kombu_type(h: Harness) -> Any:
    # kombu's JSON decoder turns {"__type__": ..., "__value__": ...} into objects, and raises on
    # a type it does not know: the whole envelope is unreadable.
    h.push(
        envelope(BODY, headers(task_id=str(uuid.uuid4()), x={"__type__": "nope", "__value__": 1}))
    )
    return None, None, "envelope", None


@case
def envelope_without_properties(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    message = envelope(BODY, headers(task_id=tid))
    del message["properties"]
    h.push(message)
    return (
        tid,
        "tokens.get_balance",
        "envelope",
        invalid("message envelope: properties: expected an object"),
    )


@case
def envelope_with_an_unknown_body_encoding(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    h.push(envelope(BODY, headers(task_id=tid), body_encoding="rot13"))
    error = "message envelope: body_encoding: rot13 is not supported"
    return tid, "tokens.get_balance", "envelope", invalid(error)


@case
def envelope_body_not_base64(h: Harness) -> Any:
    tid = str(uuid.uuid4())
    message = envelope(BODY, headers(task_id=tid))
    message["body"] = "abc"
    h.push(message)
    return (
        tid,
        "tokens.get_balance",
        "envelope",
        invalid("message envelope: body: not valid base64"),
    )


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(CASES))
def test_poison_message_is_refused_once_and_the_worker_stays_up(poison: Harness, name: str) -> None:
    if poison.broker.amqp and (name.startswith("envelope_") or name in REDIS_ONLY):
        pytest.skip("Redis's JSON envelope: RabbitMQ's frames have none")
    task_id, task, reason, result = CASES[name](poison)
    poison.assert_refused(task_id, task, reason, result)


@pytest.mark.e2e
def test_nesting_up_to_the_limit_reaches_the_task(poison: Harness) -> None:
    out = poison.app.send_task(
        "tokens.get_balance", kwargs={"user_id": deep_list(32)}, queue=QUEUE
    ).get(timeout=30)
    assert out == invalid("user_id: Input should be a valid string")
    poison.debit_served()
    assert poison.log().count(REFUSED) == poison.refused_before


@pytest.mark.e2e
def test_a_batch_of_1000_debits_passes_the_checks(e2e: Celery) -> None:
    # The session's workers, with the default bounds: a full batch is many brackets (so its
    # arguments are walked) and ~100 KB, far below the size bound.
    with session_scope() as session:
        open_account(session, "u", initial_balance=1000)
    items = [{**DEBIT, "metadata": {"n": i, "tags": [[i]]}} for i in range(1000)]
    out = e2e.send_task("tokens.debit_batch", kwargs={"debits": items}).get(timeout=60)
    assert (out["success"], out["applied"], out["refused"]) == (True, 1000, 0)
    assert dbstate.balance("u") == 0


# --- the checks themselves, without a worker ------------------------------------------------


def test_default_size_admits_the_largest_valid_batch() -> None:
    from kombu.utils.json import dumps

    from models.schemas import MAX_BATCH, MAX_METADATA_BYTES
    from worker.settings import Settings

    # Every item at every bound: the longest user id and key, the largest amount, and metadata of
    # 8 KiB in characters JSON escapes the most (4 UTF-8 bytes, 12 escaped).
    metadata = {"m": "\U0001f600" * ((MAX_METADATA_BYTES - 8) // 4)}
    item = {
        "user_id": "u" * 128,
        "amount": 10**12,
        "operation_type": "o" * 64,
        "allow_overdraft": False,
        "metadata": metadata,
        "idempotency_key": "k" * 255,
    }
    kwargs = {"debits": [item] * MAX_BATCH}
    body = dumps([[], kwargs, {"callbacks": None, "errbacks": None}])  # type: ignore[no-untyped-call]
    assert len(body.encode()) <= Settings().max_message_bytes


def kombu_message(body: bytes, hdrs: dict[str, Any], content_type: str = "application/json") -> Any:
    return Message(  # type: ignore[no-untyped-call]
        body=body, headers=hdrs, content_type=content_type, content_encoding="utf-8"
    )


def test_checks_pass_an_ordinary_debit() -> None:
    from worker.poison import MessageCheck

    check = MessageCheck(max_depth=32, max_bytes=MAX_BYTES, visibility_timeout=300)
    body = json.dumps([[], DEBIT | {"metadata": {"a": [1, {"b": 2}]}}, {"callbacks": None}])
    message = kombu_message(body.encode(), headers("tokens.debit", "id-1"))
    assert check.problem(message, known_tasks={"tokens.debit"}) is None
    assert message.decode() == json.loads(body)  # decoded once, and kept for Celery


@pytest.mark.parametrize(
    ("levels", "refused"), [(32, False), (33, True)], ids=["at-limit", "past-limit"]
)
def test_depth_limit_counts_levels_of_each_argument(levels: int, refused: bool) -> None:
    from worker.poison import MessageCheck

    check = MessageCheck(max_depth=32, max_bytes=MAX_BYTES, visibility_timeout=300)
    for body in (
        [[deep_list(levels)], {}, {}],
        [[], {"metadata": deep_dict(levels)}, {}],
        [[], {}, {"chain": deep_list(levels)}],
    ):
        message = kombu_message(json.dumps(body).encode(), headers("tokens.debit", "id-1"))
        problem = check.problem(message, known_tasks={"tokens.debit"})
        assert (problem is not None) is refused, body
        if problem is not None:
            assert (problem.reason, problem.error.endswith(DEEP)) == ("depth", True)
    hdrs = headers("tokens.debit", "id-1", x=deep_list(levels))
    problem = check.problem(kombu_message(BODY.encode(), hdrs), known_tasks={"tokens.debit"})
    assert (problem is not None) is refused


def test_refusals_are_counted_by_reason() -> None:
    from worker.poison import refused_messages, report_refusal
    from worker.signals import message_refused

    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kw: Any) -> None:
        seen.append(kw)

    before = refused_messages["depth"]
    message_refused.connect(receiver, weak=False)
    try:
        report_refusal(None, "tokens.debit", "depth", "args.0: nested deeper than 32 levels")
    finally:
        message_refused.disconnect(receiver)
    assert refused_messages["depth"] == before + 1
    assert [(e["task_id"], e["task"], e["reason"]) for e in seen] == [
        (None, "tokens.debit", "depth")
    ]


@pytest.mark.parametrize("routing_key", ["worker.elect", "worker.online"])
def test_a_gossip_message_the_worker_cannot_read_is_dropped(app: Celery, routing_key: str) -> None:
    """Issue 20: gossip (on by default: compose and the image run it) read the payload of what
    arrived on the broadcast celeryev exchange outside any guard, and the consumer took the
    error as unrecoverable: one pickled message there stopped every worker that gossips."""
    from celery.events.event import get_exchange
    from kombu import Producer  # type: ignore[attr-defined]

    w = WorkerProcess(f"gossip-{os.getpid()}", concurrency=1, queues=QUEUE)
    w.argv.remove("--without-gossip")
    with running_workers(app, w):
        # Gossip has bound its queue to the exchange once the worker answers pings.
        with Connection(os.environ["TOKENS_BROKER_URL"]) as conn:  # type: ignore[no-untyped-call]
            events = get_exchange(conn)  # fanout on Redis, topic on RabbitMQ, as Celery has it
            Producer(conn).publish(  # type: ignore[no-untyped-call]
                pickle.dumps({"hostname": "elsewhere"}),
                exchange=events,
                declare=[events],
                routing_key=routing_key,
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )
        assert w.proc is not None
        proc = w.proc
        dropped = "gossip message: cannot be read"
        wait_for(lambda: proc.poll() is not None or dropped in w.log_path.read_text(), 10, "drop")
        assert proc.poll() is None, f"the worker stopped; see {w.log_path}"
        out = app.send_task("health.ping", queue=QUEUE).get(timeout=20)
        assert out["success"] is True
    assert "Unrecoverable error" not in w.log_path.read_text()

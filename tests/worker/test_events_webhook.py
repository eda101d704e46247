"""Events as webhooks through a real worker: a local receiver that checks each signature, answers
500 to an event's first delivery, hangs on one, and accepts the rest. Every event arrives,
signed, per user in seq order, each retried with the same event_id."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from accounting import accounts, movements, outbox
from tests.polling import wait_for
from tests.support import WorkerProcess, free_port, running_workers
from token_worker_client.events import SIGNATURE_HEADER, verify_webhook
from worker.db import get_engine, session_scope

SECRET = "whsec-test"


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.accepted: list[dict[str, Any]] = []
        self.forged = 0
        self.hung = False


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not verify_webhook(body, self.headers.get(SIGNATURE_HEADER), SECRET):
            with self.server.lock:
                self.server.forged += 1
            self._answer(400)
            return
        event = json.loads(body)
        with self.server.lock:
            n = self.server.attempts.get(event["event_id"], 0) + 1
            self.server.attempts[event["event_id"]] = n
            hang = not self.server.hung and event["seq"] == 3
            self.server.hung |= hang
        if hang:
            time.sleep(5)  # past the worker's timeout: it gives up on this attempt
        if n == 1:
            self._answer(500)
            return
        with self.server.lock:
            self.server.accepted.append(event)
        self._answer(200)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhooks_arrive_signed_in_order_through_500s_and_a_hang(
    clean_db: None, receiver: Receiver, app: Any
) -> None:
    users = ["a", "b"]
    for user in users:
        with session_scope() as session:
            accounts.open_account(session, user, initial_balance=100)
    port = receiver.server_address[1]
    relay = WorkerProcess(
        f"webhook-{os.getpid()}",
        concurrency=1,
        queues=f"idle-{uuid.uuid4().hex[:8]}",
        env={
            "TOKENS_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks",
            "TOKENS_WEBHOOK_SECRET": SECRET,
            "TOKENS_WEBHOOK_TIMEOUT": "1",
            "TOKENS_WEBHOOK_BACKOFF_MAX": "1",
        },
    )
    with running_workers(app, relay):
        for n in range(4):
            for user in users:
                with session_scope() as session:
                    movements.debit(session, user, 1 + n, "image_generation")
        with get_engine().connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM events")).scalar_one()
        wait_for(lambda: len(receiver.accepted) >= total, 60, "every event accepted")
    assert receiver.forged == 0
    assert receiver.hung
    ids = [e["event_id"] for e in receiver.accepted]
    assert len(ids) == len(set(ids)) == total
    assert all(n >= 2 for n in receiver.attempts.values())  # each was retried, same id
    for user in users:
        seqs = [e["seq"] for e in receiver.accepted if e["user_id"] == user]
        assert seqs == list(range(1, len(seqs) + 1))
    with session_scope() as session:
        assert outbox.backlog(session, celery=False, webhook=True).pending == 0

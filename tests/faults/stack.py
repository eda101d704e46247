"""A whole private deployment a fault may be injected into: a Redis (broker db 0, results db 1)
and a PostgreSQL of its own (tests/servers.py), migrated, with worker processes pointed at them,
directly or through a proxy (tests/worker/tcp_proxy.py) whose links the fault cuts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.devenv import ROOT, WorkerProcess
from tests.servers import PrivatePostgres, PrivateRedis
from tests.worker.tcp_proxy import TcpProxy

DATABASE = "tokens"
#: Redelivery of what a killed worker held within the test (300 s by default); the time limits
#: must stay below it.
FAST_REDELIVERY = {
    "TOKENS_VISIBILITY_TIMEOUT": "20",
    "TOKENS_TASK_SOFT_TIME_LIMIT": "10",
    "TOKENS_TASK_TIME_LIMIT": "15",
}


class Stack:
    def __init__(self, fsync: str = "always") -> None:
        self.redis = PrivateRedis(fsync)
        self.pg = PrivatePostgres()
        self.proxies: list[TcpProxy] = []
        self.workers: list[WorkerProcess] = []
        self.logs = ROOT / "var" / "faults" / f"run-{os.getpid()}-{int(time.time())}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._engine: Engine | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Stack:
        from worker.migrate import upgrade

        self.redis.start()
        self.pg.init()
        self.pg.create_database(DATABASE)
        upgrade(self.pg.url(DATABASE))
        return self

    def stop(self) -> None:
        for w in self.workers:
            with suppress(Exception):
                w.kill()
        for p in self.proxies:
            p.close()
        if self._engine is not None:
            self._engine.dispose()
        self.pg.destroy()
        self.redis.destroy()

    # --- URLs -------------------------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        return f"{self.redis.url}/0"

    @property
    def backend_url(self) -> str:
        return f"{self.redis.url}/1"

    def proxy_to_postgres(self) -> TcpProxy:
        proxy = TcpProxy(("127.0.0.1", self.pg.port))
        proxy.open()
        self.proxies.append(proxy)
        return proxy

    def proxy_to_redis(self) -> TcpProxy:
        proxy = TcpProxy(("127.0.0.1", self.redis.port))
        proxy.open()
        self.proxies.append(proxy)
        return proxy

    def env(
        self, db_proxy: TcpProxy | None = None, broker_proxy: TcpProxy | None = None
    ) -> dict[str, str]:
        """The TOKENS_* variables of a worker of this stack (optionally through proxies)."""
        db_port = db_proxy.port if db_proxy else self.pg.port
        broker = f"redis://127.0.0.1:{broker_proxy.port}/0" if broker_proxy else self.broker_url
        return {
            "TOKENS_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{db_port}/{DATABASE}",
            "TOKENS_BROKER_URL": broker,
            "TOKENS_RESULT_BACKEND": self.backend_url,
            "TOKENS_REDBEAT_REDIS_URL": f"{self.redis.url}/2",
            "TOKENS_LOG_FORMAT": "text",
        }

    # --- workers ----------------------------------------------------------------------------

    def worker(self, name: str, env: dict[str, str], concurrency: int = 2) -> WorkerProcess:
        bare = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
        w = WorkerProcess(name, concurrency=concurrency, log_path=self.logs / f"{name}.log", env={})
        w.env = {**bare, **env}
        self.workers.append(w)
        return w

    def control_app(self, broker_url: str | None = None) -> Celery:
        broker = broker_url or self.broker_url
        return Celery("faults-control", broker=broker, backend=self.backend_url)

    @contextmanager
    def running(
        self, *workers: WorkerProcess, broker_url: str | None = None
    ) -> Iterator[tuple[WorkerProcess, ...]]:
        for w in workers:
            w.start()
        try:
            for w in workers:
                self.wait_ready(w, broker_url)
            yield workers
        finally:
            for w in workers:
                w.stop()

    def wait_ready(
        self, w: WorkerProcess, broker_url: str | None = None, timeout: float = 90
    ) -> None:
        """Until ``w`` answers a ping; a broker connection lost to an earlier fault is only
        a reason to ask again, on a fresh connection."""
        deadline = time.monotonic() + timeout
        while True:
            app = self.control_app(broker_url)
            try:
                w.wait_ready(app, timeout=max(1.0, deadline - time.monotonic()))
                return
            except Exception:
                if time.monotonic() > deadline or (w.proc and w.proc.poll() is not None):
                    raise
            finally:
                app.close()

    # --- reading the database directly -------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.pg.url(DATABASE), pool_pre_ping=True)
        return self._engine

    def scalar(self, sql: str, **params: Any) -> Any:
        for attempt in range(30):  # the fault may have the database restarting
            try:
                with self.engine.connect() as conn:
                    return conn.execute(text(sql), params).scalar()
            except Exception:
                if attempt == 29:
                    raise
                time.sleep(1)
        return None

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def broker_backlog(self) -> int:
        """Messages queued or held (unacknowledged) in the broker."""
        client = self.redis.client()
        queued = sum(int(client.llen(q)) for q in ("celery", "renewals", "tokens.debit"))
        return queued + int(client.hlen("unacked"))

    def log_text(self) -> str:
        return "".join(Path(w.log_path).read_text(errors="replace") for w in self.workers)

"""worker/listener.py: the metrics listener answers as prometheus_client's own server does, within
its bounds (connections, the time and size of a request). A worker serving it, under 300 idle
connections: tests/worker/test_metrics.py."""

from __future__ import annotations

import gzip
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.polling import wait_for
from tests.support import free_port
from worker import listener
from worker.listener import MAX_CONNECTIONS, MetricsServer, serve


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("things", "Things done.", ["kind"], registry=registry)
    counter.labels("a").inc(3)
    counter.labels("b").inc()
    return registry


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    server = serve("127.0.0.1", free_port(), registry)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str = "/metrics", **headers: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def port_of(server: MetricsServer) -> int:
    port: int = server.server_address[1]
    return port


def connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=5)


def answers(server: MetricsServer) -> bool:
    try:
        return get(port_of(server))[0] == 200
    except OSError:
        return False


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``conn`` within ``seconds`` (whatever it sent before)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            if conn.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def test_answers_as_prometheus_client_does(
    server: MetricsServer, registry: CollectorRegistry
) -> None:
    theirs, _thread = start_http_server(free_port(), addr="127.0.0.1", registry=registry)
    try:
        asked = [
            ("/metrics", {}),
            ("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}),
            ("/metrics", {"Accept-Encoding": "gzip"}),
            ("/metrics?name[]=things_total", {}),
        ]
        for path, headers in asked:
            ours = get(port_of(server), path, **headers)
            assert ours == get(theirs.server_address[1], path, **headers), (path, headers)
        status, kind, body = get(port_of(server), **{"Accept-Encoding": "gzip"})
        assert (status, kind) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert b'things_total{kind="a"} 3.0' in gzip.decompress(body)
    finally:
        theirs.shutdown()
        theirs.server_close()


def test_connections_beyond_the_bound_are_closed_at_once(server: MetricsServer) -> None:
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # accepted
    try:
        beyond = connect(server)
        assert closed_within(beyond, 1)
        beyond.close()
    finally:
        for conn in idle:
            conn.close()
    # Their slots come back when they go: the next scrape answers.
    wait_for(lambda: answers(server), 5, "a scrape once the idle connections left")


@pytest.mark.parametrize("trickle", [b"", b"X-Slow: 1\r\n"], ids=["idle", "line-by-line"])
def test_a_request_not_sent_in_time_is_cut_off(
    monkeypatch: pytest.MonkeyPatch, server: MetricsServer, trickle: bytes
) -> None:
    # Nothing, or a header line every 0.3 s (no read waits long): the deadline is the request's.
    monkeypatch.setattr(listener, "REQUEST_TIMEOUT", 1.0)
    conn = connect(server)
    started = time.monotonic()
    try:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n" if trickle else b"")
        while not closed_within(conn, 0.3) and time.monotonic() - started < 5:
            conn.sendall(trickle)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert 1.0 <= time.monotonic() - started < 2.5
    conn.close()


def test_an_oversized_request_is_not_answered(server: MetricsServer) -> None:
    conn = connect(server)
    received = b""
    try:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n")
        for _ in range(64):  # 64 KB of headers, never ended
            conn.sendall(b"X-Big: " + b"x" * 1000 + b"\r\n")
        conn.settimeout(3)
        while chunk := conn.recv(65536):
            received += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert b"200 OK" not in received
    conn.close()
    assert answers(server)  # and the slot came back

"""The metrics listener: prometheus_client's exposition (its handler: the same output, content
negotiation and compression) behind a small HTTP server of our own, bounded.

It runs in a worker's main process, whose descriptors are the coalescer's, the consumer's and the
scrape's too. prometheus_client's own server takes a thread and a descriptor per connection for
as long as the client keeps it open: a few hundred idle connections left the process none, and
everything in it that needed one (the listener too) stopped answering until they closed. This one,
whatever connects:

- holds at most :data:`MAX_CONNECTIONS` connections (so at most that many descriptors and
  threads, plus its listening socket); one beyond them is closed at once, never queued;
- gives each connection :data:`REQUEST_TIMEOUT` seconds in all to send its request (a client
  that sends nothing, or a byte at a time, is closed then) and :data:`MAX_REQUEST_BYTES` of it;
- answers one request per connection (HTTP/1.0), and gives the answer
  :data:`RESPONSE_TIMEOUT` seconds to be sent;
- leaves at most :data:`BACKLOG` connections waiting in the kernel to be accepted.

What a scrape reads is bounded apart (``worker.metrics.SCRAPE_TIMEOUT``).
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import sys
import threading
import time
from typing import Any

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from worker.failures import one_line

log = logging.getLogger(__name__)

# A Prometheus server scrapes a target one request at a time: 8 leaves room for a pair of them, a
# person with curl and a retry or two.
MAX_CONNECTIONS = 8
REQUEST_TIMEOUT = 5.0  # seconds, from accepting a connection to the end of its request
RESPONSE_TIMEOUT = 10.0  # seconds to send the answer (Prometheus's default scrape timeout)
MAX_REQUEST_BYTES = 16 * 1024  # a scrape's request is a few hundred
BACKLOG = 64


class _RequestReader(io.RawIOBase):
    """A connection's request, read before a deadline and up to a size."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.left = MAX_REQUEST_BYTES

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            raise ConnectionAbortedError(f"request longer than {MAX_REQUEST_BYTES} bytes")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no request within {REQUEST_TIMEOUT:g} s")
        self.connection.settimeout(remaining)
        received = self.connection.recv_into(memoryview(buffer).cast("B")[: self.left])
        self.left -= received
        return received


class _Handler(MetricsHandler):
    """prometheus_client's handler, reading its request through :class:`_RequestReader`.
    (Its ``registry`` is set by :meth:`MetricsHandler.factory`.)"""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the unbounded reader (the connection stays open)
        self.rfile = io.BufferedReader(_RequestReader(self.connection))

    def do_GET(self) -> None:
        self.connection.settimeout(RESPONSE_TIMEOUT)
        super().do_GET()


class MetricsServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Serves ``registry`` on ``addr:port`` (``serve_forever``, in a thread of its own) within
    the bounds above."""

    allow_reuse_address = True  # as prometheus_client's: a restart binds past TIME_WAIT
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, addr: str, port: int, registry: Collector) -> None:
        # IPv4 or IPv6, as the address says (an unknown name raises socket.gaierror, an OSError).
        info = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        self.address_family = info[0][0]
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((addr, port), _Handler.factory(registry))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # False: socketserver closes the connection at once.
        return self.slots.acquire(blocking=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the slot back
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that sent too much or went away: not the worker's problem (the default
        # prints a traceback to stderr).
        exc = sys.exc_info()[1]
        log.debug("metrics: connection from %s: %s", client_address, exc and one_line(exc))


def serve(addr: str, port: int, registry: Collector) -> MetricsServer:
    """Bind ``addr:port`` (raises OSError if it cannot) and serve in a daemon thread."""
    server = MetricsServer(addr, port, registry)
    threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True).start()
    return server

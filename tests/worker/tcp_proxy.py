"""A TCP proxy a test can shut and open, to make a server unreachable for real."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpProxy:
    """Listens on 127.0.0.1:``port``. Open: forwards each connection to ``upstream``. Shut:
    accepts and at once resets it, as a server that is down or restarting would. :meth:`cut`
    also resets the connections already open (both ends see them end); :meth:`drop` forgets
    them instead (neither end is told: a silent partition)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self.refused = 0
        self._open = threading.Event()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._dropped: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def open(self) -> None:
        self._open.set()

    def shut(self) -> None:
        self._open.clear()

    def cut(self) -> None:
        """Shut, and reset every connection open through the proxy: both ends see it end."""
        self.shut()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked reading it
                s.close()

    def drop(self) -> None:
        """Shut, and forget every connection open through the proxy without telling either end
        (a middlebox that lost its state): what they send is never delivered, nothing answers,
        and they learn it only from their own timeouts."""
        self.shut()
        with self._lock:
            self._dropped.update(self._sockets)
            self._sockets = []

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._server.close()
        with self._lock:
            for s in [*self._sockets, *self._dropped]:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            if not self._open.is_set():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                self.refused += 1
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # the server itself is down: the client sees a reset
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src in self._dropped or dst in self._dropped:
                    continue  # a forgotten connection: swallowed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

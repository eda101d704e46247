"""A Redis channel that never holds a message outside Redis's own lists (``worker.transport``).

kombu's Redis channel takes a message off its queue with ``BRPOP`` and only later, with a second
command on another connection (``QoS.append``), records it in ``unacked``, where the visibility
timeout finds it again if the worker dies. A Redis crash, or a connection lost, between the two
left the message in no list: popped, unrecorded, and dropped with the worker's connection
(kombu #305; measured here: 1 acknowledged debit in ~3,000 lost when Redis was killed under
load). Here the pop and the record are one Lua script, so Redis executes (and its AOF logs) both
or neither: at every moment the message is in its queue or in ``unacked``.

A script cannot block, so the channel waits with ``BLMOVE key key RIGHT RIGHT``, which returns
when the list has a message and moves nothing (the last element back to the end: the order is
kept), and then pops with the script. Under load the script finds a message every time: one
round trip per message where kombu spent two (BRPOP, then the ``unacked`` pipeline). ``BLMOVE``
waits on one list: the queue that last delivered. With several queues it waits at most
:data:`SHORT_WAIT` before the script looks at the others; the priority sub-queues of one queue
(only a producer that sets a priority uses them) are looked at every ``brpop_timeout`` (1 s).

Recovery: what a channel held when its connection broke is put back at once if Redis answers,
as kombu does when a channel closes; if Redis is down then, the tags are kept and put back by
the next channel of the process as soon as it connects (kombu dumped them to stderr and left
them to the visibility timeout, 300 s). What a dead worker held comes back with the visibility
timeout, as before.

Surviving the reconnect: after a connection loss Celery's ``collect()`` drops the transport's
connection details before the channel closes; kombu then raised AttributeError putting back what
the channel held, or acknowledging a task that finished after the reconnect, and Celery took it
for an unrecoverable error: the worker exited, its queue filling (issue 25's 2,771 debits left
unapplied; reproduced here with kombu's channel, 3,090 of 3,499). The channel keeps its own
connection details, and a late acknowledgement settles the message on them.

Leaving the event loop before closing: the channel's two long-lived connections (the wait for a
message, and the subscriber of remote control) are watched by the worker's epoll. kombu took a
socket out of it only after redis-py had shut it down and closed it, so the removal failed
(EBADF) and was ignored. A prefork pool process forked while the socket was open still holds it,
so epoll keeps the entry (epoll(7): an entry goes only when every descriptor of the file is
closed) and reports the shut-down socket readable on every poll, under its old number, which
the replacement connection takes. kombu then read the replacement subscriber, which had nothing
to say, and redis-py (8.1) reads a subscriber with no timeout: the worker's loop waited there
for good (issue 25, the worker-broker link silently dropped for 10 s: py-spy showed the read,
the poll's events the old number twice, and the epoll's fdinfo two entries for it, the old
socket's open only in a pool process). :func:`_leaves_the_loop_first` takes the socket out
while it is still open.

A settling that fails (an acknowledgement timed out on that silent link) still frees the
message's place in the prefetch window (:meth:`ReliableQoS._settle`): kombu kept it taken, and
two such failures left a worker of two processes connected and idle for good.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from queue import Empty
from time import monotonic, time
from typing import Any

import kombu.transport.redis as kombu_redis_module
from kombu.transport import virtual as virtual_module
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)
# kombu is untyped: reached through Any, as the classes below extend it.
kombu_redis: Any = kombu_redis_module
virtual: Any = virtual_module

#: Seconds ``BLMOVE`` waits on one queue before the script looks at the worker's other queues.
SHORT_WAIT = 0.1

# KEYS: unacked hash, unacked index, then the queues' lists in the order to take from.
# ARGV: the time to score the message with (the client's, as kombu's restore_visible reads it).
# Returns {index of the list, envelope, its delivery tag if recorded else false}, or false when
# every list is empty.
# An envelope without a delivery tag, exchange and routing key is popped unrecorded, as before:
# the transport refuses it (worker/poison.py).
POP_AND_RECORD = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, env = pcall(cjson.decode, item)
    local recorded = false
    if ok and type(env) == 'table' and type(env['properties']) == 'table' then
      local p = env['properties']
      local info = p['delivery_info']
      if type(p['delivery_tag']) == 'string' and type(info) == 'table'
          and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
        redis.call('ZADD', KEYS[2], ARGV[1], p['delivery_tag'])
        redis.call('HSET', KEYS[1], p['delivery_tag'], '[' .. item .. ','
          .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
        recorded = p['delivery_tag']
      end
    end
    return {i - 2, item, recorded}
  end
end
return false
"""

_pending_lock = threading.Lock()
#: Delivery tags a closing channel could not put back (Redis was down), per unacked key.
_pending_restore: dict[tuple[str, str], set[str]] = {}


def _leaves_the_loop_first(connection_class: type, channel: Any) -> type:
    """``connection_class`` whose ``disconnect`` takes its socket out of the event loop's epoll
    (the one ``channel``'s transport registers it with) before redis-py shuts it down and closes
    it; the module's docstring says why. Not through ``get_event_loop()``: Celery's hub forgets
    it is the current loop at its first reset (a consumer reconnect). Only in the process that
    opened it: a pool process shares the worker's epoll, and a removal there would take the
    worker's own entry away."""

    class Connection(connection_class):  # type: ignore[misc]
        def disconnect(self, *args: Any, **kwargs: Any) -> None:
            sock = self._sock
            poller = getattr(getattr(channel.connection, "cycle", None), "poller", None)
            if sock is not None and poller is not None and os.getpid() == self.pid:
                with contextlib.suppress(Exception):
                    poller.unregister(sock.fileno())
            super().disconnect(*args, **kwargs)

    return Connection


class ReliableQoS(kombu_redis.QoS):  # type: ignore[misc]
    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if channel._recorded_tag is not None and channel._recorded_tag == delivery_tag:
            channel._recorded_tag = None  # recorded by the script: only held in memory here
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not self.channel.closed:
            return self._settle(delivery_tag, super().ack, delivery_tag)
        self._late(delivery_tag, super().ack, delivery_tag)
        return None

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not self.channel.closed:
            return self._settle(delivery_tag, super().reject, delivery_tag, requeue=requeue)
        self._late(delivery_tag, super().reject, delivery_tag, requeue=requeue)
        return None

    def _settle(self, delivery_tag: str, settle: Any, *args: Any, **kwargs: Any) -> None:
        """kombu's settling, which frees the message's place in the prefetch window only once
        Redis answered. On a link gone silent it times out; Celery logs "Couldn't ack" and goes
        on, but the place stayed taken for the channel's life, and once as many settlings had
        failed as the window holds (two for a worker of two processes) the channel asked for no
        message again: the worker idled, connected, for good (issue 25, the broker link dropped
        for 10 s). The place is freed either way; the message stays in ``unacked`` and the
        visibility timeout brings it back (the task replays under its key)."""
        try:
            settle(*args, **kwargs)
        except Exception:
            virtual.QoS.ack(self, delivery_tag)  # out of the window only, not out of Redis
            raise

    def _late(self, delivery_tag: str, settle: Any, *args: Any, **kwargs: Any) -> None:
        """Settle a message whose channel closed meanwhile (its connection was lost: a task
        running then finished after the reconnect). It is no longer for the next channel to
        put back; if Redis cannot be reached now, it is again, and the error goes no further
        (Celery takes any but a connection error for an unrecoverable one)."""
        key = self.channel.restore_key
        with _pending_lock:
            _pending_restore.get(key, set()).discard(delivery_tag)
        try:
            settle(*args, **kwargs)
        except Exception as exc:
            with _pending_lock:
                _pending_restore.setdefault(key, set()).add(delivery_tag)
            log.warning("Late settling of %s failed (%r): put back later", delivery_tag, exc)

    def restore_unacked(self, client: Any = None) -> list[Any]:
        """Put back what this channel holds; a tag Redis cannot take now is kept for the next
        channel (:func:`restore_pending`) instead of dumped: it stays in ``unacked`` meanwhile."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        left: set[str] = set()
        for tag in tags:
            try:
                self.restore_by_tag(tag, client=client)
            except Exception:
                left.add(tag)
        if left:
            with _pending_lock:
                _pending_restore.setdefault(self.channel.restore_key, set()).update(left)
            log.warning("Redis unreachable: %d unacknowledged message(s) to put back", len(left))
        return []


class ReliableChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = ReliableQoS

    _recorded_tag: str | None = None
    _brpop_sent_at: float | None = None
    _in_poll: Any = None
    _waiting = False  # the pending reply is BLMOVE's (a wait), not the script's (a pop)
    _wait_queue: str | None = None
    _pop_sha: str | None = None
    _in_poll_queues: tuple[str, ...] = ()
    #: False on a server without BLMOVE (before Redis 6.2): kombu's BRPOP, and its window.
    reliable = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # How to reach Redis once the transport let go of its connection details.
        connparams = self._connparams
        self._params = {False: connparams(asynchronous=False), True: connparams(asynchronous=True)}
        self.restore_key = self._restore_key()
        version = str(self.client.info("server").get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (6, 2):
            self.reliable = False
            log.warning("Redis %s has no BLMOVE: messages are popped as kombu pops them", version)
        restore_pending(self)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """kombu's, or when the transport no longer has its connection details (Celery's
        ``collect()`` after a connection loss drops them before the channel closes), the
        channel's own from when it opened. kombu raised AttributeError there, putting back
        what the channel held or acknowledging late, and Celery took it for an unrecoverable
        error: the worker stopped, the queue filled (issue 25: 2,771 debits left unapplied)."""
        if getattr(self.connection, "client", None) is None and hasattr(self, "_params"):
            return dict(self._params[asynchronous])
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        if asynchronous:  # the connections the event loop watches
            params["connection_class"] = _leaves_the_loop_first(params["connection_class"], self)
        return params

    def _restore_key(self) -> tuple[str, str]:
        params = self._params[False]
        where = f"{params.get('host')}:{params.get('port')}/{params.get('db')}"
        return where, self.global_keyprefix + self.unacked_key

    def _keys(self, queues: list[str]) -> list[str]:
        prefix = self.global_keyprefix
        return [prefix + self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.reliable:
            return super()._brpop_start(timeout)  # type: ignore[no-any-return]
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._pop_sha is None:
            self._pop_sha = self.client.script_load(POP_AND_RECORD)
        connection = self.client.connection
        if self._waiting:
            wait_on = self._wait_queue if self._wait_queue in queues else queues[0]
            key = self.global_keyprefix + str(wait_on)
            wait = timeout if len(queues) == 1 else min(timeout or SHORT_WAIT, SHORT_WAIT)
            command: list[Any] = ["BLMOVE", key, key, "RIGHT", "RIGHT", wait or 0]
        else:
            prefix = self.global_keyprefix
            keys = [prefix + self.unacked_key, prefix + self.unacked_index_key]
            keys += self._keys(queues)
            command = ["EVALSHA", self._pop_sha, len(keys), *keys, repr(time())]
        self._in_poll_queues = tuple(queues)
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        if not self.reliable:
            return super()._brpop_read(**options)  # type: ignore[no-any-return]
        waiting, self._waiting = self._waiting, False
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BLMOVE" if waiting else "EVALSHA", **options
                )
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except ResponseError as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
                self._pop_sha = None  # Redis restarted without the script: load it again
                raise Empty() from None
            if waiting or not reply:
                # A wait ended (a message came, or the time ran out): pop next; an empty pop
                # waits next.
                self._waiting = not waiting
                raise Empty()
            index, item, tag = reply
            queues = self._in_poll_queues
            dest = queues[(int(index) - 1) % len(queues)]
            self._queue_cycle.rotate(dest)
            self._wait_queue = dest
            envelope = item.decode() if isinstance(item, bytes) else item
            payload = kombu_redis.loads(envelope)  # the bounded loads (worker/transport.py)
            self._deliver_recorded(payload, dest, tag.decode() if tag else None)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_recorded(self, payload: Any, queue: str, tag: str | None) -> None:
        self._recorded_tag = tag
        self.connection._deliver(payload, queue)
        if self._recorded_tag is not None:
            # Never held (refused before it became a message): its refusal is final, as an
            # acknowledgement is, so it leaves unacked too.
            self._recorded_tag = None
            self.qos._remove_from_indices(tag).execute()


def restore_pending(channel: ReliableChannel) -> None:
    """Put back what an earlier channel of this process could not (Redis was down then). A tag
    acknowledged or restored meanwhile is no longer in ``unacked``: nothing happens to it."""
    with _pending_lock:
        tags = _pending_restore.pop(channel.restore_key, set())
    if not tags:
        return
    left = set()
    for tag in tags:
        try:
            channel.qos.restore_by_tag(tag)
        except Exception:
            left.add(tag)
    if left:
        with _pending_lock:
            _pending_restore.setdefault(channel.restore_key, set()).update(left)
    log.info("Put back %d unacknowledged message(s) held before a reconnect", len(tags) - len(left))

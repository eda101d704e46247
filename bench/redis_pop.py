"""What the reliable pop costs (worker/reliable.py), and what ``appendfsync always`` costs.

    python -m bench.redis_pop [--messages 5000] [--rounds 3]

A private Redis (tests/servers.py) with AOF ``appendfsync always``, then one with ``everysec``;
on each, rounds interleave kombu's Redis transport (BRPOP, then the ``unacked`` pipeline) and
ours (one script pops and records): ``--messages`` messages published, then consumed and
acknowledged one at a time, as a worker with prefetch 1 does. Prints the median consume rate
and microseconds per message of each, and each ratio to kombu's on ``always``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import kombu as kombu_module
import kombu.transport.redis as kombu_redis

from tests.servers import PrivateRedis

kombu: Any = kombu_module  # untyped

QUEUE = "bench-pop"


def consume(url: str, transport: type, messages: int) -> float:
    """Publish ``messages``, then consume and acknowledge them all; the consume rate."""
    with kombu.Connection(url) as conn:
        producer = conn.Producer()
        for i in range(messages):
            producer.publish({"i": i}, routing_key=QUEUE, declare=[kombu.Queue(QUEUE)])
    got = 0

    def on_message(body: object, message: Any) -> None:
        nonlocal got
        got += 1
        message.ack()

    with kombu.Connection(url, transport=transport) as conn:
        consumer = conn.Consumer(kombu.Queue(QUEUE), callbacks=[on_message])
        consumer.qos(prefetch_count=1)
        with consumer:
            start = time.perf_counter()
            while got < messages:
                conn.drain_events(timeout=5)
            return messages / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from worker.transport import Transport  # after the scratch settings (it reads them)

    transports = {"kombu BRPOP": kombu_redis.Transport, "reliable pop": Transport}
    rates: dict[tuple[str, str], list[float]] = {}
    for fsync in ("always", "everysec"):
        server = PrivateRedis(fsync).start()
        try:
            for _ in range(args.rounds):
                for name, transport in transports.items():
                    rate = consume(f"{server.url}/0", transport, args.messages)
                    rates.setdefault((fsync, name), []).append(rate)
        finally:
            server.destroy()
    base = statistics.median(rates[("always", "kombu BRPOP")])
    print(f"{args.messages} messages consumed one at a time, median of {args.rounds} rounds")
    print("| appendfsync | pop | messages/s | µs per message | vs kombu on always |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (fsync, name), values in rates.items():
        rate = statistics.median(values)
        print(f"| {fsync} | {name} | {rate:,.0f} | {1e6 / rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()

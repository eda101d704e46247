"""A debit's round trip through ``TokenClient()`` on the embedded default, as a producer sees it.

    python -m bench.embedded_roundtrip [--calls 50] [--broker auto|valkey|sql]

Starts ``python -m worker.embedded run`` (what ``make run`` runs) in a fresh directory on free
ports, then sends ``tokens.debit`` one at a time through ``TokenClient()`` given no URL (it finds
the embedded servers itself) and prints the median and the 90th percentile. ``--broker sql``
forces the SQLAlchemy transport, the fallback where no Valkey wheel exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.devenv import EmbeddedRun, free_port
from token_worker_client import TokenClient


def round_trips(client: TokenClient, calls: int) -> list[float]:
    """Seconds per ``tokens.debit`` round trip, after a warm-up."""
    client.open_account(user_id="bench-roundtrip", initial_balance=10**9).unwrap()
    client.ping()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.debit(
            user_id="bench-roundtrip", amount=1, operation_type="image_generation"
        ).unwrap()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(len(ordered) * 0.9)]
    return f"median {statistics.median(times) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--broker", choices=["auto", "valkey", "sql"], default="auto")
    args = parser.parse_args()
    env = {
        "TOKENS_EMBEDDED_PG_PORT": str(free_port()),
        "TOKENS_EMBEDDED_VALKEY_PORT": str(free_port()),
        "TOKENS_EMBEDDED_BROKER": args.broker,
    }
    with tempfile.TemporaryDirectory(prefix="tokens-embedded-") as tmp:
        Path(tmp).chmod(0o755)  # reachable by nobody, who runs PostgreSQL under root
        run = EmbeddedRun(Path(tmp), env)
        try:
            run.wait_ready()
            for key in [k for k in os.environ if k.startswith("TOKENS_")]:
                del os.environ[key]
            os.environ.update(env)
            with TokenClient(timeout=30) as client:
                broker = client.transport.app.conf.broker_url
                times = round_trips(client, args.calls)
        finally:
            run.stop()
    scheme = broker.split("://")[0]
    print(f"tokens.debit through TokenClient(), {scheme}, {args.calls} calls: {summary(times)}")


if __name__ == "__main__":
    main()

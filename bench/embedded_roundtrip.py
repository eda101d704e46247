"""One task's round trip on the embedded default (SQLite broker, database and results).

    python -m bench.embedded_roundtrip [--pings 20]

Migrates and starts ``celery -A worker worker`` in a fresh directory with no ``TOKENS_*``
variable (as ``make run`` does), then sends ``health.ping`` one at a time through the project's
own app and waits with a plain ``.get(timeout=…)``, as the README's first example does. Prints
the median and the slowest round trip.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def bare_env(var_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
    return {**env, "TOKENS_VAR_DIR": str(var_dir)}


def round_trips(pings: int) -> list[float]:
    """Seconds per ``health.ping`` round trip through the app in this process (its settings
    must already point at the running embedded worker's var directory)."""
    from worker.celery import app

    app.send_task("health.ping").get(timeout=60)  # warm-up: connections, tables, the pool
    times = []
    for _ in range(pings):
        start = time.perf_counter()
        out = app.send_task("health.ping").get(timeout=30)
        times.append(time.perf_counter() - start)
        assert out["success"], out
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pings", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokens-embedded-") as tmp:
        env = bare_env(Path(tmp) / "var")
        subprocess.run([str(BIN / "tokens"), "migrate"], cwd=tmp, env=env, check=True)
        worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker", "worker", "-l", "WARNING"],
            cwd=tmp,
            env=env,
            start_new_session=True,
        )
        try:
            for key in [k for k in os.environ if k.startswith("TOKENS_")]:
                del os.environ[key]
            os.environ["TOKENS_VAR_DIR"] = env["TOKENS_VAR_DIR"]
            times = round_trips(args.pings)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
    print(
        f"health.ping round trip, embedded default, {len(times)} pings: "
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()

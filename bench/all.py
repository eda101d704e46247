"""Every benchmark of issue 12 in one command, then one table of its goals.

    python -m bench.all [--quick] [--echo] [--only MODULE ...]

Runs each benchmark module as a subprocess, one after another, with the arguments ``make bench``
has always given it (``--quick``: small sizes and one round each, so the whole run takes a few
minutes: for checking the plumbing, not for figures). Their output goes to
``var/bench/bench-<UTC time>.log`` (``--echo``: to this terminal too). Each benchmark appends
its goals to a summary file through ``bench.summary.record``; at the end this prints one
Markdown table (goal | figure | baseline | ratio | target | met) headed by the date, the
machine (CPU, cores, RAM, PostgreSQL and Redis versions) and the load average at the start and
the end, and writes it to ``var/bench/summary-<UTC date>.md`` (``summary-<date>-quick.md`` for
``--quick``). A benchmark that fails shows as failed in the table, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from bench import summary

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"


@dataclass(frozen=True)
class Bench:
    module: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()

    def command(self, quick: bool) -> list[str]:
        return ["-m", f"bench.{self.module}", *(self.quick if quick else self.args)]


# In the order, and with the arguments, `make bench` ran them one by one.
BENCHES = (
    Bench("debits", quick=("--tasks", "200")),
    Bench("transport", quick=("--tasks", "200", "--rounds", "1", "--latency-samples", "100")),
    Bench("grant_debits", quick=("--debits", "200", "--rounds", "1")),
    Bench("grant_expiry", ("--users", "100000"), ("--users", "10000")),
    Bench("domain_debit", quick=("--seconds", "2", "--runs", "1")),
    Bench("debit_batches", quick=("--items", "1000", "--rounds", "1", "--pgbench-seconds", "2")),
    Bench("coalescer", quick=("--debits", "400", "--rounds", "1")),
    Bench("brokers", quick=("--tasks", "200", "--rounds", "1")),
    Bench("ledger_reads", quick=("--users", "10000", "--reps", "300")),
    Bench("ledger_prune", quick=("--users", "10000")),
)


def _first(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def _postgres_version() -> str:
    try:
        import psycopg

        from tests.devenv import PG_ADMIN_URL

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0].split()[0]}" if row else "PostgreSQL ?"
    except Exception as e:
        return f"PostgreSQL unknown ({type(e).__name__})"


def _redis_version() -> str:
    try:
        import redis

        from tests.devenv import REDIS_URL

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            return f"Redis {client.info('server')['redis_version']}"
        finally:
            client.close()
    except Exception as e:
        return f"Redis unknown ({type(e).__name__})"


def machine() -> str:
    """CPU model, cores, RAM and the server versions, on one line."""
    cpu = _first("/proc/cpuinfo", "model name") or "unknown CPU"
    mem = _first("/proc/meminfo", "MemTotal")
    ram = f"{int(mem.split()[0]) / 1024**2:.1f} GiB RAM" if mem else "RAM unknown"
    cores = f"{os.cpu_count()} cores"
    return ", ".join([cpu, cores, ram, _postgres_version(), _redis_version()])


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def heading(
    started: datetime, quick: bool, machine: str, load_start: str, load_end: str
) -> list[str]:
    mode = " (--quick: small sizes, plumbing check, not figures)" if quick else ""
    return [
        f"`make bench`, {started:%Y-%m-%d %H:%M} UTC{mode}",
        "",
        f"- machine: {machine}",
        f"- load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end",
    ]


def run(
    bench: Bench, quick: bool, summary_file: Path, log: IO[str], echo: bool
) -> tuple[list[summary.Row], float]:
    """Run one benchmark; returns the rows it recorded (and a failure row if it failed)."""
    argv = bench.command(quick)
    shown = "python " + " ".join(argv)
    before = len(summary.read(summary_file))
    log.write(f"\n===== {shown}  (load {load()}) {datetime.now(UTC):%H:%M:%S} UTC =====\n")
    log.flush()
    env = {**os.environ, summary.ENV: str(summary_file), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        if echo:
            sys.stdout.write(line)
    code = proc.wait()
    seconds = time.perf_counter() - started
    log.write(f"===== exit {code} after {seconds:.0f} s =====\n")
    log.flush()
    rows = summary.read(summary_file)[before:]
    if code != 0:
        rows.append(summary.failure(shown, f"exit {code}"))
    elif not rows:
        rows.append(summary.failure(shown, "recorded nothing"))
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a plumbing check")
    parser.add_argument("--echo", action="store_true", help="also print each benchmark's output")
    parser.add_argument(
        "--only", action="append", metavar="MODULE", help="run these bench modules only"
    )
    args = parser.parse_args(argv)
    benches = [b for b in BENCHES if not args.only or b.module in args.only]

    OUT.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    stamp = f"{started:%Y%m%dT%H%M%SZ}" + ("-quick" if args.quick else "")
    log_path, summary_file = OUT / f"bench-{stamp}.log", OUT / f"bench-{stamp}.jsonl"
    where = machine()
    load_start = load()
    print(f"{where}; load {load_start}")
    print(f"output of each benchmark: {_shown(log_path)}")
    rows: list[summary.Row] = []
    with log_path.open("w", encoding="utf-8") as log:
        for i, bench in enumerate(benches, 1):
            print(f"[{i}/{len(benches)}] bench.{bench.module} ...", end=" ", flush=True)
            got, seconds = run(bench, args.quick, summary_file, log, args.echo)
            failed = any(r.failed for r in got)
            print(f"{'FAILED' if failed else 'ok'} ({seconds:.0f} s)", flush=True)
            rows += got
    table = summary.render(rows, heading(started, args.quick, where, load_start, load()))
    md = OUT / f"summary-{started:%Y-%m-%d}{'-quick' if args.quick else ''}.md"
    md.write_text(table, encoding="utf-8")
    print()
    print(table)
    print(f"written to {_shown(md)}; output in {_shown(log_path)}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

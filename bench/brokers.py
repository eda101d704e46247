"""``tokens.debit`` end to end over Redis against RabbitMQ (classic and quorum queues), same run.

    python -m bench.brokers [--tasks 1000] [--rounds 3] [--concurrency 2] [--users 100]

One database and one Redis result backend; three brokers: Redis (the baseline), RabbitMQ with
classic queues and RabbitMQ with quorum queues (a virtual host each, deleted at the end). One
worker per broker (same concurrency, settings and code) runs the whole time; the rounds
interleave the brokers, so a burst of load on this shared machine hits each alike. Each round
sends ``--tasks`` ``health.ping`` (the transport baseline) and ``--tasks`` ``tokens.debit``
round trips (send all, then wait for every result). Prints the median rate of each and its
ratio to Redis, and to the same broker's ping.
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from typing import Any

from celery import Celery

from bench import summary
from bench.debits import _round_trips
from tests.devenv import AMQP_URL, Scratch, WorkerProcess, _rabbitmqctl

BROKERS = ("redis", "rabbitmq classic", "rabbitmq quorum")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--users", type=int, default=100)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_brokers", broker="redis")
    scratch.export()
    scratch.create()
    vhosts = {
        "rabbitmq classic": f"tokens_bench_classic_{uuid.uuid4().hex[:6]}",
        "rabbitmq quorum": f"tokens_bench_quorum_{uuid.uuid4().hex[:6]}",
    }
    for vhost in vhosts.values():
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        _run(scratch, vhosts, args.tasks, args.rounds, args.concurrency, args.users)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        for vhost in vhosts.values():
            _rabbitmqctl("delete_vhost", vhost)
        scratch.destroy()


def _run(
    scratch: Scratch, vhosts: dict[str, str], n: int, rounds: int, concurrency: int, users: int
) -> None:
    from accounting import accounts
    from worker.db import session_scope
    from worker.migrate import upgrade

    upgrade()
    with session_scope() as s:
        for u in range(users):
            accounts.open_account(s, f"user-{u}", initial_balance=10**9)

    envs: dict[str, dict[str, str]] = {"redis": {}}
    for name, vhost in vhosts.items():
        envs[name] = {"TOKENS_BROKER_URL": f"{AMQP_URL}/{vhost}"}
    envs["rabbitmq quorum"]["TOKENS_QUEUE_TYPE"] = "quorum"
    apps: dict[str, Celery] = {}
    workers: dict[str, WorkerProcess] = {}
    for name in BROKERS:
        url = envs[name].get("TOKENS_BROKER_URL", scratch.broker_url)
        app = Celery("producer", broker=url, backend=scratch.backend_url)
        if name == "rabbitmq quorum":
            app.conf.task_default_queue_type = "quorum"  # every producer declares them alike
        apps[name] = app
        workers[name] = WorkerProcess(
            f"bench-{name.split()[-1]}",
            concurrency=concurrency,
            env=envs[name],
            loglevel="WARNING",
        ).start()
    seq = iter(range(10**9))

    def debit(i: int) -> dict[str, Any]:
        return {
            "user_id": f"user-{i % users}",
            "amount": 1,
            "operation_type": "chatgpt_message",
            "idempotency_key": f"b{next(seq)}",
        }

    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for name in BROKERS:
            workers[name].wait_ready(apps[name])
            _round_trips(apps[name], "health.ping", lambda i: {}, 50)  # warm up
        for r in range(rounds):
            for name in BROKERS:
                for task, kwargs in (("health.ping", lambda i: {}), ("tokens.debit", debit)):
                    seconds = _round_trips(apps[name], task, kwargs, n)
                    rates.setdefault((name, task), []).append(n / seconds)
                    print(f"  round {r + 1} {name:17} {task:13} {n / seconds:7.0f}/s")
    finally:
        for w in workers.values():
            w.stop()

    with session_scope() as s:
        from accounting.ledger import reconcile

        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"

    med = {key: statistics.median(v) for key, v in rates.items()}
    print(f"\n{n} round trips per round, {rounds} rounds (medians), concurrency {concurrency}")
    print(f"| {'broker':17} | {'ping/s':>7} | {'debit/s':>7} | {'debit vs Redis':>14} | debit/ping")
    print(f"| {'-' * 17} | {'-' * 7} | {'-' * 7} | {'-' * 14} | ----------")
    base = med[("redis", "tokens.debit")]
    for name in BROKERS:
        ping, deb = med[(name, "health.ping")], med[(name, "tokens.debit")]
        print(f"| {name:17} | {ping:7.0f} | {deb:7.0f} | {deb / base:13.2f}x | {deb / ping:10.2f}")
    for name in BROKERS[1:]:
        for task, what in (("tokens.debit", "debit"), ("health.ping", "ping")):
            rate, redis_rate = med[(name, task)], med[("redis", task)]
            summary.record(
                f"{task} over {name} vs Redis",
                f"{rate:.0f} {what}/s",
                f"Redis {redis_rate:.0f}/s",
                rate / redis_rate,
                "(no goal)",
                None,
            )


if __name__ == "__main__":
    main()

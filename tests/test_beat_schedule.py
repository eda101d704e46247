"""beat_schedule.py and its wiring: what beat sends and when, and ``celery -A worker beat``
really running with RedBeat against Redis (two beats: one holds the lock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

from beat_schedule import (
    EXPIRE_GRANTS,
    EXPIRE_RESERVATIONS,
    MAKE_MONTHS,
    PRUNE_EVENTS,
    PRUNE_IDEMPOTENCY,
    RECONCILE,
    SWEEP,
    VERIFY,
    beat_schedule,
    cron,
)
from tests.polling import wait_for
from tests.support import ROOT
from worker.config import celery_config
from worker.queues import RENEWALS_QUEUE
from worker.settings import Settings, get_settings

EMBEDDED = {"database_url": None, "broker_url": None, "result_backend": None}


def test_default_schedule() -> None:
    schedule = beat_schedule(Settings(**EMBEDDED))
    assert {name: entry["task"] for name, entry in schedule.items()} == {
        SWEEP: "renewals.sweep",
        EXPIRE_RESERVATIONS: "reservations.expire",
        EXPIRE_GRANTS: "grants.expire",
        RECONCILE: "ledger.reconcile",
        VERIFY: "ledger.verify",
        PRUNE_IDEMPOTENCY: "idempotency.prune",
        PRUNE_EVENTS: "events.prune",
        MAKE_MONTHS: "ledger.make_months",
    }
    sweep, reconcile = schedule[SWEEP]["schedule"], schedule[RECONCILE]["schedule"]
    prune = schedule[PRUNE_IDEMPOTENCY]["schedule"]
    assert (prune.minute, prune.hour) == ({45}, {3})
    assert (sweep.minute, sweep.hour) == ({0}, {2})
    assert (sweep.day_of_month, sweep.month_of_year) == (set(range(1, 32)), set(range(1, 13)))
    assert sweep.day_of_week == set(range(7))
    assert (reconcile.minute, reconcile.hour) == ({30}, {3})
    assert schedule[EXPIRE_RESERVATIONS]["schedule"] == timedelta(seconds=60)
    assert schedule[EXPIRE_RESERVATIONS]["options"] == {"expires": 60}
    assert schedule[EXPIRE_GRANTS]["schedule"] == timedelta(seconds=60)
    assert schedule[EXPIRE_GRANTS]["options"] == {"expires": 60}


def test_the_sweep_fires_at_two_utc() -> None:
    app = Celery(set_as_current=False)
    app.conf.update(timezone="UTC", enable_utc=True)
    sweep = beat_schedule(Settings(**EMBEDDED))[SWEEP]["schedule"]
    sweep.app = app
    yesterday = datetime(2026, 11, 23, 2, 0, 5, tzinfo=UTC)
    sweep.nowfun = lambda: datetime(2026, 11, 24, 1, 59, tzinfo=UTC)
    assert tuple(sweep.is_due(yesterday)) == (False, 60.0)
    sweep.nowfun = lambda: datetime(2026, 11, 24, 2, 0, 1, tzinfo=UTC)
    assert sweep.is_due(yesterday).is_due


def test_times_are_configurable_and_checked() -> None:
    settings = Settings(
        **EMBEDDED,
        renewal_cron="15 4 * * 1",
        reconcile_cron="0 */6 * * *",
        reservation_expiry_seconds=15,
    )
    schedule = beat_schedule(settings)
    sweep = schedule[SWEEP]["schedule"]
    assert (sweep.minute, sweep.hour, sweep.day_of_week) == ({15}, {4}, {1})
    assert schedule[RECONCILE]["schedule"].hour == {0, 6, 12, 18}
    assert schedule[EXPIRE_RESERVATIONS]["schedule"] == timedelta(seconds=15)
    for bad in ("0 2 * *", "0 2 * * * *", "61 2 * * *", "0 2 31 2 *"):
        with pytest.raises(ValueError):
            cron(bad)


def test_config_uses_redbeat_with_redis_and_celerys_scheduler_embedded() -> None:
    # Explicit, so a TOKENS_REDBEAT_REDIS_URL in the environment (a RabbitMQ run) does not apply.
    on_redis = Settings(broker_url="redis://127.0.0.1:6379/5", redbeat_redis_url=None)
    redis_config = celery_config(on_redis)
    assert redis_config["beat_schedule"].keys() == {
        SWEEP,
        EXPIRE_RESERVATIONS,
        EXPIRE_GRANTS,
        RECONCILE,
        VERIFY,
        PRUNE_IDEMPOTENCY,
        PRUNE_EVENTS,
        MAKE_MONTHS,
    }
    assert redis_config["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert redis_config["redbeat_redis_url"] == "redis://127.0.0.1:6379/5"
    assert "redbeat_redis_options" in redis_config  # no deprecated broker-options fallback
    assert redis_config["redbeat_lock_timeout"] >= 5 * redis_config["beat_max_loop_interval"]
    assert (redis_config["timezone"], redis_config["enable_utc"]) == ("UTC", True)

    # The embedded default: RedBeat on its Valkey; on the SQLAlchemy transport (no Valkey wheel)
    # Celery's own PersistentScheduler.
    embedded = celery_config(Settings(**EMBEDDED, embedded_broker="valkey", redbeat_redis_url=None))
    assert embedded["beat_schedule"].keys() == redis_config["beat_schedule"].keys()
    assert embedded["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert embedded["redbeat_redis_url"] == "redis://127.0.0.1:63790/0"
    embedded = celery_config(Settings(**EMBEDDED, embedded_broker="sql"))
    assert embedded["beat_schedule"].keys() == redis_config["beat_schedule"].keys()
    assert "beat_scheduler" not in embedded
    assert embedded["beat_schedule_filename"].endswith("celerybeat-schedule")


def test_scheduled_sweeps_go_to_the_renewals_queue() -> None:
    from worker.celery import app

    def queue(task: str) -> str:
        return str(app.amqp.router.route({}, task)["queue"].name)

    assert queue("renewals.sweep") == RENEWALS_QUEUE
    assert queue("reservations.expire") == queue("ledger.reconcile") == "celery"
    assert queue("grants.expire") == "celery"


# --- celery -A worker beat, for real ----------------------------------------------------------


class Beat:
    def __init__(self, name: str) -> None:
        self.log_path = ROOT / "var" / "test-logs" / f"{name}-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "INFO"],
                cwd=ROOT,
                env=dict(os.environ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def redbeat() -> Iterator[tuple[redis.Redis, str]]:
    """The test's Redis database (RedBeat falls back to the broker's) and the key prefix, with
    every RedBeat key removed before and after."""
    config = celery_config(get_settings())
    client = redis.Redis.from_url(config["redbeat_redis_url"], decode_responses=True)
    prefix: str = config["redbeat_key_prefix"]

    def clear() -> None:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)

    clear()
    try:
        yield client, prefix
    finally:
        clear()


def test_two_beats_start_with_redbeat_and_one_holds_the_lock(
    redbeat: tuple[redis.Redis, str],
) -> None:
    client, prefix = redbeat
    lock_key, schedule_key = f"{prefix}:lock", f"{prefix}:schedule"
    beats = [Beat("beat-a"), Beat("beat-b")]
    try:
        wait_for(
            lambda: (
                all("beat: Starting..." in b.log() for b in beats)
                and any("beat: Acquired lock" in b.log() for b in beats)
                and client.zcard(schedule_key) == len(beat_schedule(get_settings()))
            ),
            60,
            "both beats started, one with the lock, the schedule in Redis",
        )
        holders = [b for b in beats if "beat: Acquired lock" in b.log()]
        assert len(holders) == 1
        assert all(b.running() for b in beats)  # the other waits for the lock
        assert "RedBeatScheduler" in holders[0].log()
        assert client.exists(lock_key)
        assert 0 < client.ttl(lock_key) <= celery_config(get_settings())["redbeat_lock_timeout"]

        scheduled = set(client.zrange(schedule_key, 0, -1))
        entries = (
            SWEEP,
            EXPIRE_RESERVATIONS,
            EXPIRE_GRANTS,
            RECONCILE,
            VERIFY,
            PRUNE_IDEMPOTENCY,
            PRUNE_EVENTS,
            MAKE_MONTHS,
        )
        assert scheduled == {f"{prefix}{name}" for name in entries}
        definition = json.loads(str(client.hget(f"{prefix}{SWEEP}", "definition")))
        assert definition["task"] == "renewals.sweep"
        assert (definition["schedule"]["minute"], definition["schedule"]["hour"]) == ("0", "2")
        assert "deprecat" not in "".join(b.log() for b in beats).lower()
    finally:
        standby = [b for b in beats if "beat: Acquired lock" not in b.log()]
        for beat in standby + [b for b in beats if b not in standby]:
            beat.stop()
    # The holder gives the lock back when it stops, so a standby can take over at once.
    assert not client.exists(lock_key)

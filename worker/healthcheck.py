"""Health checks for the compose stack's containers: ``python -m worker.healthcheck beat|flower``
exits 0 when healthy, else prints one line saying what is wrong and exits 1.

A worker's check is Celery's own (``celery -A worker inspect ping -d <its node>``, in
docker-compose.yml). Beat has nothing to ask, so its check looks at what beat keeps in Redis:
the schedule, and the RedBeat lock, which the beat that sends extends every loop and which
expires ``redbeat_lock_timeout`` after that beat stops extending it. A standby beat is as
healthy as the stack's scheduling: when no beat holds the lock, nothing is being sent.
"""

from __future__ import annotations

import os
import sys
import urllib.request

import redis

from worker.config import celery_config
from worker.settings import get_settings


def beat_problem() -> str | None:
    settings = get_settings()
    if settings.redbeat_url is None:
        return "beat: no RedBeat to check (no Redis for it: TOKENS_REDBEAT_REDIS_URL)"
    config = celery_config(settings)
    prefix = config["redbeat_key_prefix"]
    client = redis.Redis.from_url(config["redbeat_redis_url"], socket_timeout=5)
    try:
        if not client.exists(f"{prefix}:schedule"):
            return "beat: no schedule in Redis (has a beat started?)"
        if not client.exists(f"{prefix}:lock"):
            return "beat: no beat holds the RedBeat lock, so none is sending"
    except redis.RedisError as exc:
        return f"beat: Redis unreachable ({exc})"
    finally:
        client.close()
    return None


def flower_problem() -> str | None:
    # Flower reads its port from FLOWER_PORT as well as --port.
    url = f"http://127.0.0.1:{os.environ.get('FLOWER_PORT', '5555')}/healthcheck"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except OSError as exc:
        return f"flower: {url} unreachable ({exc})"
    return None if body == b"OK" else f"flower: {url} answered {body[:100]!r}"


CHECKS = {"beat": beat_problem, "flower": flower_problem}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: python -m worker.healthcheck {'|'.join(CHECKS)}", file=sys.stderr)
        return 2
    problem = CHECKS[argv[0]]()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""No task may outlive the visibility timeout: Redis would deliver it a second time while the
first still runs. Checked for every registered task when a worker starts (worker/celery.py).
The backoff between attempts on a database in trouble stays within it too."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from worker.settings import get_settings


def time_limit_problems(tasks: Iterable[Any], visibility_timeout: float) -> list[str]:
    """One line for each time limit at or past ``visibility_timeout``, and for each task with no
    hard limit at all (Celery fills a task's limits from the global ones)."""
    problems = []
    timeout = f"the visibility timeout ({visibility_timeout:g} s)"
    for task in tasks:
        for attr in ("soft_time_limit", "time_limit"):
            limit = getattr(task, attr, None)
            if limit is not None and limit >= visibility_timeout:
                problems.append(f"{task.name}: {attr} {limit:g} s is not below {timeout}")
        if getattr(task, "time_limit", None) is None:
            problems.append(f"{task.name}: no time_limit; it must end before {timeout}")
    return problems


def backoff_cap() -> float:
    """The longest retry delay. A retried message waits unacknowledged for its countdown and
    then runs up to the hard time limit: both together stay below the visibility timeout, or
    the broker would deliver it a second time while it still waits or runs."""
    settings = get_settings()
    room = settings.visibility_timeout - settings.task_time_limit
    return min(settings.retry_backoff_max, room / 2)


def backoff(retries: int) -> float:
    """Exponential backoff with full jitter, capped by :func:`backoff_cap`."""
    return random.uniform(0, min(backoff_cap(), 0.5 * 2**retries))

"""No task may outlive the visibility timeout: Redis would deliver it a second time while the
first still runs. Checked for every registered task when a worker starts (worker/celery.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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

"""A task for the benchmarks only: it waits, as a debit waits for its statement, and does nothing
else. ``bench.transport`` starts its worker with ``-I bench.waiting``; the worker ``make run``
starts never registers it.

``bench.wait(seconds=...)`` sleeps (at most 50 ms) and answers ``{"success": true}``: the no-op's
reply after the debit's wait, which tells the transport's cost of a task that waits from the
cost of what the debit does.
"""

from __future__ import annotations

import time
from typing import Any

from worker.celery import app

WAIT = "bench.wait"
LONGEST = 0.05


@app.task(name=WAIT)  # type: ignore[untyped-decorator]
def wait(*_args: Any, seconds: float = 0.0, **_kwargs: Any) -> dict[str, bool]:
    time.sleep(min(max(float(seconds), 0.0), LONGEST))
    return {"success": True}

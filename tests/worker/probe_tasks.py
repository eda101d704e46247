"""Loaded into a test worker with ``-I``: a task that reports on the pool process it runs in."""

from __future__ import annotations

import gc
import os

from worker.celery import app


@app.task(name="test.pool_process")  # type: ignore[untyped-decorator]
def pool_process() -> dict[str, int]:
    """This pool process's pid and how many objects its garbage collector has frozen."""
    return {"pid": os.getpid(), "frozen": gc.get_freeze_count()}

"""Loaded into a test worker through a handler setting: registers a task whose time limits are
past the visibility timeout, so the start-up check has something to refuse."""

from __future__ import annotations

from typing import Any

from worker.celery import app


@app.task(name="test.too_long", soft_time_limit=370, time_limit=400)  # type: ignore[untyped-decorator]
def too_long() -> None:
    """Never sent."""


def on_completed(**_: Any) -> None:
    """The handler whose import registers ``too_long``."""

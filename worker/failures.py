"""What a failure is: retried or final, its ``error_code``, its one-line text. The tasks
(tasks/base.py) and the coalescer (worker/coalescer.py) both decide by these."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

TIME_LIMITS = (SoftTimeLimitExceeded, TimeLimitExceeded)


def caused_by_time_limit(exc: BaseException) -> bool:
    """Whether a time limit is ``exc`` or anywhere in its chain (``__cause__``/``__context__``):
    say, the rollback that failed on the connection the soft limit interrupted."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, TIME_LIMITS):
            return True
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return False


def is_transient(exc: BaseException) -> bool:
    """Connection lost, server restarting, serialization failure, deadlock, lock or statement
    timeout, SQLite busy; never anything a time limit caused (the task ran out of time: running
    it again would not help, and it must end before the visibility timeout)."""
    if caused_by_time_limit(exc):
        return False
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def failure_code(exc: BaseException) -> str:
    """The ``error_code`` operation_completed reports for a task that failed."""
    if caused_by_time_limit(exc):
        return "TIME_LIMIT_EXCEEDED"
    if isinstance(exc, SQLAlchemyError):
        return "DATABASE_ERROR"
    return "INTERNAL_ERROR"


def one_line(exc: BaseException) -> str:
    """``Type: first line`` (at most 300 characters of it): SQLAlchemy's text spans lines, and
    a log line or a signal's ``error`` must not."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__

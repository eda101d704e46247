"""The ``tokens`` group, how a command reports, and how it runs the domain.

Exit status: 0 done; 1 a refusal (the contract's failure JSON on stdout) or, for ``reconcile``
and ``doctor``, something found wrong; 2 a usage error or a bad setting; 3 the database (or
another server) unreachable, or not migrated. Any problem but a refusal is one line on stderr.

Only click is imported here: Celery, SQLAlchemy, pydantic and the domain are imported inside the
commands that use them, so ``tokens --help`` answers at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from pydantic import BaseModel

    from accounting.errors import DomainError

DISTRIBUTION = "token-worker"


class Problem(click.ClickException):
    """Anything but a refusal: one line on stderr."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"tokens: {self.message}", err=True)


def problem_of(exc: Exception) -> Problem | None:
    """A bad setting or an unreachable database as one line and its exit status; None for
    anything else (a traceback is left for what is a bug). Imports the exception classes only
    now: a command that failed before loading them cannot have raised them."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from worker.preflight import Unavailable, reason
    from worker.settings import ConfigurationError, get_settings, masked

    if isinstance(exc, ConfigurationError):
        return Problem(f"configuration error: {exc}", 2)
    if isinstance(exc, Unavailable):
        return Problem(str(exc), 3)
    if isinstance(exc, OperationalError | InterfaceError):
        url = masked(get_settings().db_url)
        return Problem(f"database {url} unreachable: {reason(exc)}", 3)
    return None


class TokensGroup(click.Group):
    """Turns a bad setting or an unreachable database into one line and a non-zero exit, for
    every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            problem = problem_of(exc)
            if problem is None:
                raise
            raise problem from None


@click.group(cls=TokensGroup)
@click.version_option(package_name=DISTRIBUTION, prog_name="tokens")
def main() -> None:
    """Operate the token ledger. Every command prints JSON (doctor and migrate: lines of text)."""


def emit(data: BaseModel | dict[str, Any]) -> None:
    """A result on stdout, as the task would return it."""
    if not isinstance(data, dict):
        data = data.model_dump(mode="json")
    click.echo(json.dumps(data, indent=2))


def refuse(exc: DomainError) -> NoReturn:
    """A domain refusal: the contract's failure JSON on stdout, exit 1."""
    from models.schemas import Failure

    emit(Failure(error=exc.message, error_code=exc.code, **exc.fields))
    raise SystemExit(1) from None


def ready(schema: bool = True) -> None:
    """Before a command's work: the settings (one line if bad), the signal handlers they name
    (so they fire for CLI movements as in the worker), and the schema at head."""
    from worker.preflight import Unavailable, database_problem
    from worker.settings import get_settings
    from worker.signals import connect_configured_handlers

    get_settings()
    connect_configured_handlers()
    if schema:
        problem = database_problem()
        if problem:
            raise Unavailable(problem)


def since(started: float) -> float:
    return time.perf_counter() - started


def run_task(operation: str | None, action: Callable[..., BaseModel], **kwargs: Any) -> None:
    """``action(session, **kwargs)`` in one transaction, printed and reported through
    ``operation_completed`` as the task ``operation`` would be (``task_id`` None)."""
    from accounting.errors import DomainError, LimitExceeded
    from models.schemas import Failure
    from worker.db import session_scope
    from worker.refusals import note_refused
    from worker.signals import send_completed

    ready()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            out = action(session, **kwargs)
    except DomainError as exc:
        if isinstance(exc, LimitExceeded):
            note_refused(exc)
        if operation is not None:
            failure = Failure(error=exc.message, error_code=exc.code, **exc.fields).model_dump(
                mode="json"
            )
            send_completed(operation, None, kwargs, failure, since(started))
        refuse(exc)
    result = out.model_dump(mode="json")
    if operation is not None:
        send_completed(operation, None, kwargs, result, since(started))
    emit(result)

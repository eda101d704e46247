"""What every contract task shares: validate kwargs, run a domain function in one transaction,
shape the result, retry only transient database trouble, report through signals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Ignore, Retry, TimeLimitExceeded
from pydantic import BaseModel
from sqlalchemy.orm import Session

from accounting.errors import DomainError, LimitExceeded, validation_error
from models.schemas import Failure, Payload
from token_worker_client.errors import InvalidPayload
from token_worker_client.models import describe as describe  # re-exported for the tests
from token_worker_client.models import parse_payload
from worker.celery import app
from worker.db import session_scope, statement_scope
from worker.failures import failure_code, is_transient, one_line
from worker.limits import backoff
from worker.refusals import note_refused
from worker.settings import get_settings
from worker.signals import operation_retried, send_completed

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Payload)
Handler = Callable[[Session, P, str | None], BaseModel]
Scope = Callable[[], AbstractContextManager[Session]]


def validate(schema: type[P], kwargs: dict[str, Any]) -> P:
    # JSON mode is what producers send: strict ints, ISO 8601 strings for dates. The rules and
    # the message are the contract's (token_worker_client.models), as a producer's client sees.
    try:
        return parse_payload(schema, kwargs)
    except InvalidPayload as exc:
        raise validation_error(str(exc)) from None


class ContractTask(Task):  # type: ignore[misc]
    """Base of the contract's tasks: each body is a domain function over a session."""

    typing = False  # kwargs are checked by the schema, so bad ones get VALIDATION_ERROR

    def execute(
        self,
        schema: type[P],
        handler: Handler[P],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        then: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        scope: Scope = session_scope,
    ) -> dict[str, Any]:
        """Run the task and report its outcome: one ``operation_completed`` for a success, a
        refusal or a final failure; ``operation_retried`` for an attempt that will run again;
        nothing for a task replaced by another (``Task.replace`` raises Ignore), since the
        replacement finishes under the same task id and reports.

        ``then`` continues with the committed outcome (a sweep publishing its chunks), inside
        the same reporting: it may replace the task. ``scope`` gives the session the handler
        runs in."""
        started = time.perf_counter()
        try:
            outcome = self._execute(schema, handler, args, kwargs, scope)
            if then is not None:
                outcome = then(outcome)
        except Retry as retry:
            operation_retried.send(
                sender=self.name,
                operation=self.name,
                task_id=self.request.id,
                attempt=self.request.retries + 1,
                error=one_line(retry.exc) if isinstance(retry.exc, BaseException) else None,
            )
            raise
        except Ignore:
            raise
        except BaseException as exc:
            self._completed(kwargs, {}, time.perf_counter() - started, exc)
            raise
        self._completed(kwargs, outcome, time.perf_counter() - started)
        return outcome

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        # A hard time limit kills the pool process before ``execute`` can report; Celery then
        # calls on_failure in the worker's main process. Every other failure was reported where
        # it happened.
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args and isinstance(exc.args[0], int | float) else 0.0
            self._completed(kwargs if isinstance(kwargs, dict) else {}, {}, float(limit), exc)

    def _completed(
        self,
        kwargs: dict[str, Any],
        outcome: dict[str, Any],
        duration: float,
        failure: BaseException | None = None,
    ) -> None:
        send_completed(
            self.name,
            self.request.id,
            kwargs,
            outcome,
            duration,
            error=one_line(failure) if failure is not None else None,
            error_code=failure_code(failure) if failure is not None else None,
        )

    def _execute(
        self,
        schema: type[P],
        handler: Handler[P],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: Scope,
    ) -> dict[str, Any]:
        try:
            if args:
                raise validation_error("Invalid arguments: send keyword arguments, not positional")
            payload = validate(schema, kwargs)
            with scope() as session:
                result = handler(session, payload, self.request.id)
            return result.model_dump(mode="json")
        except DomainError as exc:
            if isinstance(exc, LimitExceeded):
                note_refused(exc)
            failure = Failure(error=exc.message, error_code=exc.code, **exc.fields)
            return failure.model_dump(mode="json")
        except Exception as exc:
            if not is_transient(exc):
                raise
            retries = self.request.retries
            if retries >= get_settings().task_max_retries:
                log.error("%s[%s]: giving up after %d retries", self.name, self.request.id, retries)
                raise
            log.warning(
                "%s[%s]: transient database error, retry %d: %s",
                self.name,
                self.request.id,
                retries + 1,
                one_line(exc),  # SQLAlchemy's text spans lines: a log line must not
            )
            # Celery stops at its own max_retries (3 by default, also when None is passed here):
            # give it ours, which the check above applies.
            raise self.retry(
                exc=exc, countdown=backoff(retries), max_retries=get_settings().task_max_retries
            ) from exc


def contract_task(
    name: str, schema: type[P], alone: bool = False, **options: Any
) -> Callable[[Handler[P]], Any]:
    """Register ``handler(session, payload, task_id)`` as the contract task ``name``
    (``options``: Celery task options, such as time limits). ``alone``: the handler's movement is
    one statement on PostgreSQL, which runs as its own transaction (``statement_scope``)."""

    def register(handler: Handler[P]) -> Any:
        @app.task(name=name, bind=True, base=ContractTask, **options)  # type: ignore[untyped-decorator]
        def run(self: ContractTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
            scope = statement_scope if alone else session_scope
            return self.execute(schema, handler, args, kwargs, scope=scope)

        return run

    return register

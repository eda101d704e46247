"""Domain events, sent after the transaction that made them has committed, never for one that
rolled back:

- ``balance_changed(user_id, balance, tokens_reserved, operation)``: a balance changed.
- ``renewals_counted(renewed, tokens, skipped, failed, tier)``: renewals were written (a sweep
  chunk's tally, or one ``renew_user``): ``renewed`` and ``tokens`` map each tier to the users
  renewed and the tokens they were given; ``skipped`` and ``failed`` count the chunk's users not
  renewed (their tier is not looked up: ``tier`` is the sweep's one tier, or None when it
  covered several). A chunk that replays its stored tally sends nothing.
- ``grants_expired(grants, tokens)``: grants' unheld remaining left balances through ``expiry``
  entries (a ``grants.expire`` chunk's total, or one grant a movement or read expired).

The domain's own seam: the worker (metrics, caches) connects to it; the domain never imports the
worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.dispatch import Signal
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger(__name__)

balance_changed = Signal(
    name="balance_changed", providing_args={"user_id", "balance", "tokens_reserved", "operation"}
)
renewals_counted = Signal(
    name="renewals_counted", providing_args={"renewed", "tokens", "skipped", "failed", "tier"}
)
grants_expired = Signal(name="grants_expired", providing_args={"grants", "tokens"})

_PENDING = "pending_domain_events"


def note_balance_change(
    session: Session, *, user_id: str, balance: int, tokens_reserved: int, operation: str
) -> None:
    """Queue a ``balance_changed`` to be sent once ``session`` commits; dropped if the transaction
    or savepoint it was noted in rolls back."""
    _note(
        session,
        balance_changed,
        user_id=user_id,
        balance=balance,
        tokens_reserved=tokens_reserved,
        operation=operation,
    )


def note_renewals(
    session: Session,
    *,
    renewed: dict[str, int],
    tokens: dict[str, int],
    skipped: int = 0,
    failed: int = 0,
    tier: str | None = None,
) -> None:
    """Queue a ``renewals_counted`` to be sent once ``session`` commits (nothing if all zero)."""
    if any(renewed.values()) or skipped or failed:
        _note(
            session,
            renewals_counted,
            renewed=renewed,
            tokens=tokens,
            skipped=skipped,
            failed=failed,
            tier=tier,
        )


def note_grants_expired(session: Session, *, grants: int, tokens: int) -> None:
    """Queue a ``grants_expired`` to be sent once ``session`` commits (nothing if none)."""
    if grants:
        _note(session, grants_expired, grants=grants, tokens=tokens)


def _note(session: Session, signal: Signal, **fields: Any) -> None:
    noted_in = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_PENDING, []).append((noted_in, signal, fields))


def send_noted(session: Session) -> None:
    """Send now what was noted on ``session``: for a session that never began a transaction
    because its statements each committed alone (``worker.db.statement_scope``)."""
    for _noted_in, signal, fields in session.info.pop(_PENDING, []):
        # A broken handler must not turn a committed movement into a failed task.
        for _receiver, response in signal.send(sender=None, **fields):
            if isinstance(response, Exception):
                log.error("%s handler failed: %r", signal.name, response)


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    # SQLAlchemy sends after_commit when a savepoint is released too; nothing is committed yet.
    if not session.in_nested_transaction():
        send_noted(session)


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    # A savepoint's rollback drops only what was noted inside it; the rest may still commit.
    pending = session.info.get(_PENDING)
    if pending:
        session.info[_PENDING] = [p for p in pending if not _within(p[0], previous_transaction)]


@event.listens_for(Session, "after_transaction_end")
def _forget_uncommitted(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended without a commit (say, the session was closed).
    if transaction.parent is None:
        session.info.pop(_PENDING, None)

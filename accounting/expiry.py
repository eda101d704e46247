"""``grants.expire``: write the expiry of every due grant, in chunks, across all users.

A due grant (``expires_at`` passed) already counts as expired for every read and movement of its
user (``grants.settle_reads``, ``grants.lock_current``); this sweep writes what nobody touched:
for each due grant what is left of it, less what reservations hold, leaves through one ``expiry``
entry. One transaction per chunk, so a backlog of any size is worked off in bounded memory and
short locks.

Concurrency: a chunk locks the accounts of a chunk of due grants with ``FOR UPDATE SKIP
LOCKED``, in ``user_id`` order; an account a movement holds is skipped (that movement expires
the user's due grants itself, before anything else), and so is one a concurrent sweep holds.
Each locked user then goes through ``tokens_lock``, as a movement does: its statements read the
grants after the lock was granted, and ``tokens_expire_due``, the one definition of the rule,
expires those still due: nothing is expired twice. The sweep never waits for a lock, so it
cannot deadlock with a movement or with itself, and needs no advisory lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import statements

EXPIRE_CHUNK = 5000


@dataclass(frozen=True)
class Chunk:
    """What one chunk did: accounts it locked, grants it expired, tokens they took."""

    users: int
    grants: int
    tokens: int


def expire_all(sessions: Callable[[], Session], chunk_size: int = EXPIRE_CHUNK) -> tuple[int, int]:
    """Expire every grant due now, one transaction per chunk of ``chunk_size`` due grants;
    returns (grants expired, tokens expired). Stops when a chunk finds no account to lock:
    nothing is due, or what is due belongs to accounts others hold right now (a movement
    expires them itself; the next run takes the rest)."""
    expired = tokens = 0
    while True:
        with sessions() as session, session.begin():
            chunk = expire_chunk(session, chunk_size)
        expired += chunk.grants
        tokens += chunk.tokens
        if chunk.users == 0:
            return expired, tokens


# The accounts of a chunk of due grants (through the partial index ix_grants_active_expiry),
# locked in user order, those others hold skipped, not waited for; then each user's due grants
# leave through tokens_lock, as before any movement.
_CHUNK = text(
    """
    WITH locked AS (
        SELECT a.user_id FROM accounts a
        WHERE a.user_id IN (
            SELECT g.user_id FROM grants g
            WHERE tokens_grant_due(g, statement_timestamp())
            ORDER BY g.expires_at
            LIMIT :limit
        )
        ORDER BY a.user_id
        FOR UPDATE OF a SKIP LOCKED
    )
    SELECT l.user_id, x.reserved, x.expired_tokens, x.expired_balances
    FROM locked l CROSS JOIN LATERAL tokens_lock(l.user_id) x
    """
)


def expire_chunk(session: Session, limit: int = EXPIRE_CHUNK) -> Chunk:
    """Expire the due grants of the users of (up to) ``limit`` due grants. Nothing committed;
    the events are sent once the caller commits."""
    users = expired = tokens = 0
    for user_id, reserved, gone, balances in session.execute(_CHUNK, {"limit": limit}):
        users += 1
        expired += len(gone)
        tokens += sum(gone)
        statements.note_expiries(session, user_id, int(reserved), gone, balances)
    return Chunk(users, expired, tokens)

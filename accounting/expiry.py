"""``grants.expire``: write the expiry of every due grant, in chunks, across all users.

A due grant (``expires_at`` passed) already counts as expired for every read and movement of its
user (``grants.settle_reads``, ``grants.lock_current``); this sweep writes what nobody touched:
for each due grant what is left of it, less what reservations hold, leaves through one ``expiry``
entry. One transaction per chunk, so a backlog of any size is worked off in bounded memory and
short locks.

Concurrency (PostgreSQL): a chunk first locks the accounts of a chunk of due grants with
``FOR UPDATE SKIP LOCKED``, in ``user_id`` order, in a statement of its own; an account a
movement holds is skipped (that movement expires the user's due grants itself, before anything
else), and so is one a concurrent sweep holds. Then one data-modifying statement, whose snapshot
is taken after the locks were granted, re-reads which grants of those users are still due and
expires them: nothing is expired twice. The sweep never waits for a lock, so it cannot deadlock
with a movement or with itself, and needs no advisory lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.types import String

from accounting import grants
from accounting.events import note_balance_change, note_grants_expired
from models.tables import UTCDateTime, grant_table

EXPIRE_CHUNK = 5000


@dataclass(frozen=True)
class Chunk:
    """What one chunk did: accounts it locked, grants it expired, tokens they took."""

    users: int
    grants: int
    tokens: int


def expire_all(
    sessions: Callable[[], Session],
    now: datetime | None = None,
    chunk_size: int = EXPIRE_CHUNK,
) -> tuple[int, int]:
    """Expire every grant due at ``now``, one transaction per chunk of ``chunk_size`` due
    grants; returns (grants expired, tokens expired). Stops when a chunk finds no account to
    lock: nothing is due, or what is due belongs to accounts others hold right now (a movement
    expires them itself; the next run takes the rest). ``now`` simulates a moment (tests); by
    default each chunk reads the database's clock."""
    expired = tokens = 0
    while True:
        with sessions() as session, session.begin():
            chunk = expire_chunk(session, chunk_size, now)
        expired += chunk.grants
        tokens += chunk.tokens
        if chunk.users == 0:
            return expired, tokens


def expire_chunk(session: Session, limit: int = EXPIRE_CHUNK, now: datetime | None = None) -> Chunk:
    """Expire the due grants of the users of (up to) ``limit`` due grants. Nothing committed;
    the events are sent once the caller commits."""
    return _chunk_postgresql(session, limit, now)


# The accounts of a chunk of due grants (through the partial index ix_grants_active_expiry),
# locked in user order; those others hold are skipped, not waited for.
_LOCK = text(
    """
    SELECT a.user_id FROM accounts a
    WHERE a.user_id IN (
        SELECT g.user_id FROM grants g
        WHERE g.status = 'active' AND g.expires_at IS NOT NULL
          AND g.expires_at <= COALESCE(:now, statement_timestamp())
          AND g.remaining > g.held
        ORDER BY g.expires_at
        LIMIT :limit
    )
    ORDER BY a.user_id
    FOR UPDATE OF a SKIP LOCKED
    """
).bindparams(bindparam("now", type_=UTCDateTime()))

# One statement, over the accounts locked above, read afresh: each still-due grant keeps only
# what reservations hold of it (expired when nothing is held); one ``expiry`` entry per grant,
# chained per user in (expires_at, id) order at the account's stamp; its split; the accounts.
_EXPIRE = text(
    """
    WITH acct AS (
        SELECT user_id, tokens_balance, GREATEST(clock_timestamp(), updated_at) AS at
        FROM accounts WHERE user_id = ANY(:users)
    ),
    due AS (
        SELECT g.id, g.user_id, g.remaining - g.held AS tokens, g.expires_at, a.at,
               a.tokens_balance - SUM(g.remaining - g.held) OVER (
                   PARTITION BY g.user_id ORDER BY g.expires_at, g.id
                   ROWS UNBOUNDED PRECEDING
               ) AS balance_after
        FROM acct a JOIN grants g ON g.user_id = a.user_id
        WHERE g.status = 'active' AND g.expires_at IS NOT NULL
          AND g.expires_at <= COALESCE(:now, a.at)
          AND g.remaining > g.held
    ),
    ended AS (
        UPDATE grants g
        SET remaining = g.held,
            expired = g.expired + d.tokens,
            status = CASE WHEN g.held = 0 THEN 'expired' ELSE g.status END,
            ended_at = COALESCE(g.ended_at, g.expires_at)
        FROM due d WHERE g.id = d.id
    ),
    entries AS (
        INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount,
                                    balance_before, balance_after, metadata, created_at)
        SELECT user_id, 'expiry', 'expiry', -tokens, balance_after + tokens, balance_after,
               jsonb_build_object('grant_id', id::text), at
        FROM due
        ORDER BY user_id, expires_at, id
        RETURNING id, tokens_amount, metadata
    ),
    splits AS (
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT id, CAST(metadata ->> 'grant_id' AS bigint), tokens_amount, 0 FROM entries
    ),
    per_user AS (
        SELECT user_id, count(*) AS grants, SUM(tokens) AS tokens, max(at) AS at
        FROM due GROUP BY user_id
    )
    UPDATE accounts a
    SET tokens_balance = a.tokens_balance - p.tokens, updated_at = p.at
    FROM per_user p WHERE a.user_id = p.user_id
    RETURNING a.user_id, a.tokens_balance, a.tokens_reserved, p.grants, p.tokens
    """
).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("users", type_=ARRAY(String())))


def _chunk_postgresql(session: Session, limit: int, now: datetime | None) -> Chunk:
    users = list(session.execute(_LOCK, {"now": now, "limit": limit}).scalars())
    if not users:
        return Chunk(0, 0, 0)
    rows = session.execute(_EXPIRE, {"now": now, "users": users}).all()
    expired = tokens = 0
    for user_id, balance, reserved, n, gone in rows:
        expired += int(n)
        tokens += int(gone)
        note_balance_change(
            session,
            user_id=user_id,
            balance=int(balance),
            tokens_reserved=int(reserved),
            operation=grants.EXPIRY,
        )
    note_grants_expired(session, grants=expired, tokens=tokens)
    return Chunk(len(users), expired, tokens)


_g = grant_table.c

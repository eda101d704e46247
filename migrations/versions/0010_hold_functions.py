"""tokens_reserve() and tokens_release(): a hold made or freed on PostgreSQL in one statement

``tokens_reserve()`` does what accounting/reservations.py ``reserve`` does through
accounting/grants.py (which stays the reference, and the code SQLite runs): claim the idempotency
key (replay or conflict when it exists), lock the account, expire the user's due grants (one
``expiry`` entry each), check the available tokens, write the reservation, hold its grants in burn
order (``reservation_grants``), count the hold in ``tokens_reserved`` and store the outcome.

``tokens_release()`` does what ``release`` does: read the reservation, claim the key, end the
reservation (a conditional update: of a capture, a release and the expiry sweep, the first to lock
the row wins), lock the account, free the grants it held and ``tokens_reserved``, expire the
user's grants now due (a held grant that ended meanwhile leaves now) and store the outcome.

Lock order as everywhere: the key, the reservation, the account, its grants. A refusal returns a
``status`` (never raises), as ``tokens_spend()`` does (migrations 0005, 0006). The claim, the
lock and the expiries are 0008's ``tokens_claim`` and ``tokens_lock`` and 0009's
``tokens_expire_due``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESERVE = r"""
CREATE OR REPLACE FUNCTION tokens_reserve(
    p_user text, p_key text, p_digest text, p_id text, p_amount bigint, p_op text,
    p_ttl integer, p_metadata jsonb, p_overcapture bigint,
    OUT status text, OUT available bigint, OUT balance bigint, OUT reserved bigint,
    OUT response jsonb, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_expires timestamptz;
    v_left bigint;
    v_take bigint;
    g record;
BEGIN
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The account lock (grants.lock) and the movement's time, then the due grants' expiry
    -- (tokens_lock, 0008); balance and reserved are the account's as the guard sees it.
    SELECT l.balance, l.reserved, l.moment, l.expired_tokens, l.expired_balances
    INTO balance, reserved, v_now, expired_tokens, expired_balances
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;

    available := balance - reserved;
    IF available < p_amount THEN
        status := 'insufficient';
        RETURN;
    END IF;

    v_expires := v_now + make_interval(secs => p_ttl);
    INSERT INTO reservations (id, user_id, amount, operation_type, status, expires_at, created_at,
                              metadata, overcapture_limit)
    VALUES (p_id, p_user, p_amount, p_op, 'active', v_expires, v_now, p_metadata, p_overcapture);

    -- The hold: the free tokens of the live grants in burn order (grants.hold).
    v_left := p_amount;
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND (gr.expires_at IS NULL OR gr.expires_at > v_now)
        ORDER BY gr.priority, gr.expires_at NULLS LAST, gr.created_at, gr.id
    LOOP
        v_take := least(g.free, v_left);
        UPDATE grants SET held = held + v_take WHERE id = g.id;
        INSERT INTO reservation_grants (reservation_id, grant_id, amount)
        VALUES (p_id, g.id, v_take);
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'hold of % beyond the free tokens', p_amount;
    END IF;
    UPDATE accounts SET tokens_reserved = tokens_reserved + p_amount, updated_at = v_now
    WHERE user_id = p_user;

    -- ReserveOut as pydantic writes it (expires_at by datetime.isoformat()).
    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'amount', p_amount,
        'expires_at', to_char(v_expires AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || CASE WHEN date_trunc('second', v_expires) = v_expires THEN ''
                    ELSE to_char(v_expires AT TIME ZONE 'UTC', '.US') END
            || '+00:00',
        'tokens_available', available - p_amount, 'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_reserve.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
"""

RELEASE = r"""
CREATE OR REPLACE FUNCTION tokens_release(
    p_id text, p_key text, p_digest text, p_reason text,
    OUT status text, OUT owner text, OUT reservation_status text, OUT balance bigint,
    OUT reserved bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_held bigint;
BEGIN
    -- A reservation's user never changes, so it is read without a lock, before the key.
    SELECT r.user_id, r.status INTO owner, reservation_status
    FROM reservations r WHERE r.id = p_id;
    IF NOT FOUND THEN
        status := 'not_found';
        RETURN;
    END IF;
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(owner, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    IF reservation_status <> 'active' THEN
        status := 'not_active';
        RETURN;
    END IF;

    UPDATE reservations r SET
        status = 'released',
        settled_at = clock_timestamp(),
        metadata = CASE WHEN p_reason IS NULL THEN r.metadata
                        ELSE r.metadata || jsonb_build_object('release_reason', p_reason) END
    WHERE r.id = p_id AND r.status = 'active'
    RETURNING r.amount INTO v_held;
    IF NOT FOUND THEN
        -- Lost the race: the re-read sees what the winner committed.
        SELECT r.status INTO reservation_status FROM reservations r WHERE r.id = p_id;
        status := 'not_active';
        RETURN;
    END IF;
    reservation_status := 'released';

    SELECT greatest(clock_timestamp(), a.updated_at) INTO v_now
    FROM accounts a WHERE a.user_id = owner FOR UPDATE;
    UPDATE grants g SET held = g.held - rg.amount
    FROM reservation_grants rg
    WHERE rg.reservation_id = p_id AND g.id = rg.grant_id;
    -- balance and reserved are the account's once the hold is freed, before the expiries.
    UPDATE accounts SET tokens_reserved = tokens_reserved - v_held, updated_at = v_now
    WHERE user_id = owner
    RETURNING tokens_balance, tokens_reserved INTO balance, reserved;
    SELECT e.tokens, e.balances INTO expired_tokens, expired_balances
    FROM tokens_expire_due(owner, v_now) e;

    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'status', 'released');
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_release.response
        WHERE r.user_id = owner AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
"""

DROP = (
    "tokens_release(text, text, text, text)",
    "tokens_reserve(text, text, text, text, bigint, text, integer, jsonb, bigint)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in (RESERVE, RELEASE):
            op.execute(function)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in DROP:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")

"""tokens_credit() and tokens_reset(): a credit or a balance reset on PostgreSQL in one statement

They do what accounting/movements.py ``credit`` and ``reset_balance`` do through
accounting/grants.py (which stays the reference, and the code SQLite runs): claim the idempotency
key (replay or conflict when it exists), lock the account, expire the user's due grants (one
``expiry`` entry each), check the request against the locked account, make a grant that pays the
debt first (a credit, a reset upwards) or spend in burn order (a reset downwards, never into
debt), move the account, write the ledger entry with its split, and store the outcome under the
key. A refusal returns its ``status``, as ``tokens_spend()`` (migration 0005) does.

They are built from helpers that follow accounting/grants.py step by step: ``tokens_claim``
(idempotency.claim), ``tokens_lock`` (grants.lock_current: the lock, then the due grants'
expiry), ``tokens_grant`` (grants.Change.grant), ``tokens_burn`` (grants.Change.spend) and
``tokens_write`` (grants.write, with idempotency.record); an expiry is migration 0007's
``tokens_expire_grant`` (grants.expire_grant). Each is one plpgsql call inside the
movement's statement, so the movement stays one round trip. The grants are read only after the
account row lock (``tokens_lock``), each statement with a fresh snapshot (VOLATILE, READ
COMMITTED).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM = r"""
CREATE OR REPLACE FUNCTION tokens_claim(
    p_user text, p_key text, p_digest text, OUT status text, OUT response jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: NULL (claimed, or no key), 'conflict' or 'replay' (with the stored response).
#variable_conflict use_column
DECLARE
    v_hash text;
BEGIN
    IF p_key IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO idempotency_records (user_id, key, request_hash, created_at)
    VALUES (p_user, p_key, p_digest, clock_timestamp())
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT r.request_hash, r.response INTO v_hash, response
    FROM idempotency_records r WHERE r.user_id = p_user AND r.key = p_key;
    IF v_hash <> p_digest THEN
        status := 'conflict';
        response := NULL;
    ELSIF response IS NOT NULL THEN
        status := 'replay';
    END IF;
    -- else this transaction's own claim, made ahead (a batch's claim_many)
END
$fn$;
"""

WRITE = r"""
CREATE OR REPLACE FUNCTION tokens_write(
    p_user text, p_kind text, p_op text, p_delta bigint, p_debt_delta bigint,
    p_spent_delta bigint, p_key text, p_metadata jsonb, p_now timestamptz,
    p_gids bigint[], p_amounts bigint[],
    OUT entry_id bigint, OUT balance bigint, OUT reserved bigint, OUT spent bigint,
    OUT response jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account moved by p_delta, the entry and its split (p_gids, p_amounts in order), and the
-- outcome stored under p_key.
#variable_conflict use_column
BEGIN
    UPDATE accounts SET
        tokens_balance = tokens_balance + p_delta,
        debt = debt + p_debt_delta,
        tokens_spent = CASE WHEN tokens_spent + p_spent_delta < 0 THEN 0
                            ELSE tokens_spent + p_spent_delta END,
        updated_at = p_now
    WHERE user_id = p_user
    RETURNING tokens_balance, tokens_reserved, tokens_spent INTO balance, reserved, spent;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at)
    VALUES (p_user, p_kind, p_op, p_delta, balance - p_delta, balance, p_key, NULL,
            p_metadata, p_now)
    RETURNING id INTO entry_id;
    IF cardinality(p_gids) > 0 THEN
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT tokens_write.entry_id, s.gid, s.amount, (s.n - 1)::integer
        FROM unnest(p_gids, p_amounts) WITH ORDINALITY AS s(gid, amount, n);
    END IF;
    response := jsonb_build_object(
        'success', true, 'user_id', p_user, 'operation_type', p_op, 'amount', p_delta,
        'balance_before', balance - p_delta, 'new_balance', balance, 'tokens_spent', spent,
        'ledger_entry_id', entry_id::text, 'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_write.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
END
$fn$;
"""

LOCK = r"""
CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account lock and the movement's time (moment NULL: no such account), then the due
-- grants' expiry by (expires_at, id), one expiry entry each (tokens_expire_grant, 0007).
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt,
           greatest(clock_timestamp(), a.updated_at)
    INTO balance, reserved, spent, debt, moment
    FROM accounts a WHERE a.user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND gr.expires_at IS NOT NULL AND gr.expires_at <= moment
        ORDER BY gr.expires_at, gr.id
    LOOP
        balance := tokens_expire_grant(p_user, g.id, g.free, moment);
        expired_tokens := expired_tokens || g.free;
        expired_balances := expired_balances || balance;
    END LOOP;
END
$fn$;
"""

GRANT = r"""
CREATE OR REPLACE FUNCTION tokens_grant(
    p_user text, p_kind text, p_amount bigint, p_priority integer, p_expires_at timestamptz,
    p_debt bigint, p_now timestamptz, OUT grant_id bigint, OUT kept bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A new grant of p_amount that pays the debt first: kept is what it keeps (its split).
#variable_conflict use_column
BEGIN
    kept := p_amount - least(p_debt, p_amount);
    INSERT INTO grants (user_id, kind, amount, remaining, held, spent, expired, returned,
                        priority, expires_at, status, created_at, ended_at)
    VALUES (p_user, p_kind, p_amount, kept, 0, p_amount - kept, 0, 0, p_priority, p_expires_at,
            CASE WHEN kept > 0 THEN 'active' ELSE 'depleted' END, p_now,
            CASE WHEN kept > 0 THEN NULL ELSE p_now END)
    RETURNING id INTO grant_id;
END
$fn$;
"""

BURN = r"""
CREATE OR REPLACE FUNCTION tokens_burn(
    p_user text, p_amount bigint, p_now timestamptz,
    OUT gids bigint[], OUT amounts bigint[], OUT uncovered bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Spend p_amount of the free tokens in burn order; the splits, and what no grant covered.
#variable_conflict use_column
DECLARE
    v_take bigint;
    g record;
BEGIN
    gids := '{}';
    amounts := '{}';
    uncovered := p_amount;
    IF p_amount = 0 THEN
        RETURN;
    END IF;
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND (gr.expires_at IS NULL OR gr.expires_at > p_now)
        ORDER BY gr.priority, gr.expires_at NULLS LAST, gr.created_at, gr.id
    LOOP
        v_take := least(g.free, uncovered);
        UPDATE grants SET
            remaining = remaining - v_take,
            spent = grants.spent + v_take,
            status = CASE WHEN remaining = v_take THEN 'depleted' ELSE grants.status END,
            ended_at = CASE WHEN remaining = v_take THEN p_now ELSE ended_at END
        WHERE id = g.id;
        gids := gids || g.id;
        amounts := amounts || -v_take;
        uncovered := uncovered - v_take;
        EXIT WHEN uncovered = 0;
    END LOOP;
END
$fn$;
"""

CREDIT = r"""
CREATE OR REPLACE FUNCTION tokens_credit(
    p_user text, p_key text, p_digest text, p_op text, p_grant_kind text, p_amount bigint,
    p_priority integer, p_expires_at timestamptz, p_metadata jsonb,
    OUT status text, OUT entry_id bigint, OUT balance bigint, OUT reserved bigint,
    OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found' or 'expires_past'.
DECLARE
    v_debt bigint;
    v_now timestamptz;
    g record;
BEGIN
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.spent, l.debt, l.moment, l.expired_tokens,
           l.expired_balances
    INTO balance, reserved, spent, v_debt, v_now, expired_tokens, expired_balances
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;
    IF p_expires_at <= v_now THEN
        status := 'expires_past';
        RETURN;
    END IF;
    SELECT * INTO g FROM tokens_grant(
        p_user, p_grant_kind, p_amount, p_priority, p_expires_at, v_debt, v_now);
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(p_user, 'credit', p_op, p_amount, g.kept - p_amount, 0, p_key,
                      p_metadata, v_now, ARRAY[g.grant_id], ARRAY[g.kept]) w;
    status := 'ok';
END
$fn$;
"""

RESET = r"""
CREATE OR REPLACE FUNCTION tokens_reset(
    p_user text, p_key text, p_digest text, p_op text, p_new_balance bigint, p_priority integer,
    p_metadata jsonb,
    OUT status text, OUT entry_id bigint, OUT balance bigint, OUT reserved bigint,
    OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found' or 'below_reserved'. Upwards the difference
-- is an adjustment grant (of p_priority) that pays the debt first; downwards it is spent in
-- burn order, never into debt (p_new_balance >= reserved leaves the free tokens enough).
DECLARE
    v_debt bigint;
    v_now timestamptz;
    v_delta bigint;
    v_debt_delta bigint := 0;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
    g record;
BEGIN
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.spent, l.debt, l.moment, l.expired_tokens,
           l.expired_balances
    INTO balance, reserved, spent, v_debt, v_now, expired_tokens, expired_balances
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;
    IF p_new_balance < reserved THEN
        status := 'below_reserved';
        RETURN;
    END IF;
    v_delta := p_new_balance - balance;
    IF v_delta > 0 THEN
        SELECT * INTO g FROM tokens_grant(
            p_user, 'adjustment', v_delta, p_priority, NULL, v_debt, v_now);
        v_gids := ARRAY[g.grant_id];
        v_amounts := ARRAY[g.kept];
        v_debt_delta := g.kept - v_delta;
    ELSIF v_delta < 0 THEN
        SELECT * INTO g FROM tokens_burn(p_user, -v_delta, v_now);
        IF g.uncovered > 0 THEN
            RAISE EXCEPTION 'spend beyond the free tokens without into_debt';
        END IF;
        v_gids := g.gids;
        v_amounts := g.amounts;
    END IF;
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(p_user, 'adjustment', p_op, v_delta, v_debt_delta, 0, p_key,
                      p_metadata, v_now, v_gids, v_amounts) w;
    status := 'ok';
END
$fn$;
"""

SIGNATURES = (
    "tokens_credit(text, text, text, text, text, bigint, integer, timestamptz, jsonb)",
    "tokens_reset(text, text, text, text, bigint, integer, jsonb)",
    "tokens_burn(text, bigint, timestamptz)",
    "tokens_grant(text, text, bigint, integer, timestamptz, bigint, timestamptz)",
    "tokens_lock(text)",
    "tokens_write(text, text, text, bigint, bigint, bigint, text, jsonb, timestamptz,"
    " bigint[], bigint[])",
    "tokens_claim(text, text, text)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in (CLAIM, WRITE, LOCK, GRANT, BURN, CREDIT, RESET):
            op.execute(function)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in SIGNATURES:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")

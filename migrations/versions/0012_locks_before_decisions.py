"""Decide under the lock: the time after the account lock, the refund cap under it, cap rows
that go with their entry, and every grant's change in some entry's split

Issue 20's defects and suspicions, on PostgreSQL:

- ``tokens_lock`` and ``tokens_release`` read ``clock_timestamp()`` in the statement that waited
  for the account's row lock. PostgreSQL computes a locking query's output before the lock is
  granted and recomputes it only when the holder changed the row: a holder that left the row as
  it was (a refusal, a reader) gave back the time the wait began, and a grant that ended during
  the wait could still be spent. The lock is now taken in a subquery and the time read above it,
  once the row is held (a subquery with ``FOR UPDATE`` is never flattened into its parent).
- ``tokens_refund`` read the original entry before the account lock and without a lock of its
  own, then waited on the ``refund_totals`` row a prune was deleting, and made a fresh cap row
  once the prune had committed: 160 refunded against a debit of 100. The refund now takes the
  account lock first (as every movement, and now the prune, does), reads the original entry
  under it and holds it with ``FOR KEY SHARE`` until it commits, so an entry a prune removed is
  ``ENTRY_NOT_FOUND`` and an entry being refunded cannot be removed until the refund is done.
- ``refund_totals.entry_id`` references its entry (``ON DELETE CASCADE``): a cap row lives exactly
  as long as its entry, whichever transaction removes the entry. Rows left by earlier prunes
  whose entry is gone are deleted first.
- A prune now carries its entries' splits forward to the ``carried_forward`` entry
  (accounting/ledger.py); the splits earlier prunes dropped, and those of the grants migration 0004
  made from balances (no entry created them), are restored here onto the user's first entry,
  which stands for the history before splits were kept. After this, every grant's ``remaining``
  is the sum of its entries' splits, which ``ledger.reconcile`` now checks.
- ``tokens_json_bytes`` measured a number as Python's ``repr`` of the float read back, while
  the metadata bound measured what the producer sent: ``{"x": 1e300}`` passed as 12 bytes and
  was stored as 307. The bound now measures what is stored (models.schemas.metadata_bytes writes
  each float as PostgreSQL's numeric does), and so does this function: a number's own text.

Lock order everywhere: idempotency key -> reservation -> account -> original entry / cap row ->
grants.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_refund_totals_entry_id_ledger_entries"

JSON_BYTES = r"""
CREATE OR REPLACE FUNCTION tokens_json_bytes(p jsonb) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $fn$
-- The compact JSON size of a stored value: models.schemas.metadata_bytes, which counts each
-- number as it is stored (numeric's own text), so a number is its text here.
BEGIN
    CASE jsonb_typeof(p)
    WHEN 'object' THEN
        RETURN 1 + (SELECT coalesce(sum(octet_length(to_jsonb(e.key)::text) + 2
                                        + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_each(p) e);
    WHEN 'array' THEN
        RETURN 1 + (SELECT coalesce(sum(1 + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_array_elements(p) e);
    ELSE
        RETURN octet_length(p::text);
    END CASE;
END
$fn$;
"""

LOCK = r"""
CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account lock, then the movement's time, read once the lock is held (moment NULL: no such
-- account); then the due grants' expiry by (expires_at, id), one expiry entry each.
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT l.tokens_balance, l.tokens_reserved, l.tokens_spent, l.debt,
           greatest(clock_timestamp(), l.updated_at)
    INTO balance, reserved, spent, debt, moment
    FROM (SELECT a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt, a.updated_at
          FROM accounts a WHERE a.user_id = p_user FOR UPDATE) l;
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

    -- The time once the account is held (see tokens_lock).
    SELECT greatest(clock_timestamp(), l.updated_at) INTO v_now
    FROM (SELECT a.updated_at FROM accounts a WHERE a.user_id = owner FOR UPDATE) l;
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

REFUND = r"""
CREATE OR REPLACE FUNCTION tokens_refund(
    p_user text, p_key text, p_digest text, p_original bigint, p_amount bigint,
    p_metadata jsonb,
    OUT status text, OUT charged bigint, OUT refunded bigint, OUT entry_id bigint,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT ended_tokens bigint[], OUT ended_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_debt bigint;
    v_debt_delta bigint := 0;
    v_already bigint := 0;
    v_skip bigint;
    v_left bigint;
    v_share bigint;
    v_paid bigint;
    v_grant bigint;
    v_ended boolean;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
    v_ended_gids bigint[] := '{}';
    s record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    ended_tokens := '{}';
    ended_balances := '{}';
    -- The key before anything else (tokens_claim, 0008).
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The account lock, the movement's time and the due grants' expiry (tokens_lock). A prune
    -- takes this lock too, so none is in flight for this user from here on.
    SELECT l.balance, l.reserved, l.spent, l.debt, l.moment, l.expired_tokens,
           l.expired_balances
    INTO balance, reserved, spent, v_debt, v_now, expired_tokens, expired_balances
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;

    -- The refund cap, under the account lock: the original entry as committed now, held
    -- against deletion until this commits, and one upsert of its cap row that checks and adds.
    IF p_original IS NOT NULL THEN
        SELECT -e.tokens_amount INTO charged
        FROM ledger_entries e
        WHERE e.id = p_original AND e.user_id = p_user
          AND e.kind IN ('debit', 'charge', 'capture')
        FOR KEY SHARE;
        IF NOT FOUND THEN
            status := 'entry_not_found';
            RETURN;
        END IF;
        v_already := NULL;
        IF p_amount <= charged THEN
            INSERT INTO refund_totals AS t (entry_id, user_id, charged, refunded)
            VALUES (p_original, p_user, tokens_refund.charged, p_amount)
            ON CONFLICT (entry_id) DO UPDATE SET refunded = t.refunded + p_amount
            WHERE t.refunded + p_amount <= t.charged
            RETURNING t.refunded - p_amount INTO v_already;
        END IF;
        IF v_already IS NULL THEN
            SELECT t.refunded INTO refunded FROM refund_totals t WHERE t.entry_id = p_original;
            refunded := coalesce(refunded, 0);
            status := 'exceeds';
            RETURN;
        END IF;
    END IF;

    -- Where the tokens go (movements._put_back), skipping what earlier refunds returned:
    -- 1. what the original took as debt (what its split does not cover), 2. its grants, last
    -- spent first, 3. the rest (no original, or an entry older than grants) as a new grant.
    -- Without an original only 3. has tokens.
    v_skip := v_already;
    v_left := p_amount;
    FOR s IN
        SELECT 1 AS part, NULL::bigint AS gid,
               coalesce(tokens_refund.charged, 0) + coalesce(sum(eg.amount), 0)::bigint AS took,
               0 AS seq
        FROM entry_grants eg WHERE eg.entry_id = p_original AND eg.amount < 0
        UNION ALL
        SELECT 2, eg.grant_id, -eg.amount, eg.seq
        FROM entry_grants eg WHERE eg.entry_id = p_original AND eg.amount < 0
        UNION ALL
        SELECT 3, NULL, p_amount + v_already, 0
        ORDER BY part, seq DESC
    LOOP
        IF v_skip >= s.took THEN
            v_skip := v_skip - s.took;
            CONTINUE;
        END IF;
        v_share := least(s.took - v_skip, v_left);
        v_skip := 0;
        v_left := v_left - v_share;
        IF s.gid IS NOT NULL THEN
            -- grants.Change.put_back: is the grant ended (expired, or past its end)?
            UPDATE grants gr SET
                remaining = gr.remaining + v_share,
                returned = gr.returned + v_share,
                status = CASE WHEN gr.status = 'depleted' THEN 'active' ELSE gr.status END,
                ended_at = CASE WHEN gr.status = 'depleted' THEN NULL ELSE gr.ended_at END
            WHERE gr.id = s.gid
            RETURNING gr.status = 'expired'
                      OR (gr.expires_at IS NOT NULL AND gr.expires_at <= v_now)
            INTO v_ended;
            v_gids := v_gids || s.gid;
            v_amounts := v_amounts || v_share;
            IF v_ended THEN
                v_ended_gids := v_ended_gids || s.gid;
                ended_tokens := ended_tokens || v_share;
            END IF;
        ELSE
            -- Debt first. The debt part makes a grant only of what is left after the debt; the
            -- rest is always a grant (grants.Change.grant: depleted if the debt took it all).
            -- 50: grants.DEFAULT_PRIORITY of an adjustment.
            v_paid := least(v_debt + v_debt_delta, v_share);
            v_debt_delta := v_debt_delta - v_paid;
            IF s.part = 3 OR v_share > v_paid THEN
                INSERT INTO grants (user_id, kind, amount, remaining, held, spent, expired,
                                    returned, priority, expires_at, status, created_at, ended_at)
                VALUES (p_user, 'adjustment',
                        CASE WHEN s.part = 3 THEN v_share ELSE v_share - v_paid END,
                        v_share - v_paid, 0, CASE WHEN s.part = 3 THEN v_paid ELSE 0 END, 0, 0,
                        50, NULL, CASE WHEN v_share > v_paid THEN 'active' ELSE 'depleted' END,
                        v_now, CASE WHEN v_share > v_paid THEN NULL ELSE v_now END)
                RETURNING id INTO v_grant;
                v_gids := v_gids || v_grant;
                v_amounts := v_amounts || (v_share - v_paid);
            END IF;
        END IF;
        EXIT WHEN v_left = 0;
    END LOOP;

    -- The account, the entry and its split (grants.write), and the stored outcome.
    UPDATE accounts SET
        tokens_balance = tokens_balance + p_amount,
        debt = debt + v_debt_delta,
        tokens_spent = CASE WHEN tokens_spent - p_amount < 0 THEN 0
                            ELSE tokens_spent - p_amount END,
        updated_at = v_now
    WHERE user_id = p_user
    RETURNING tokens_balance, tokens_reserved, tokens_spent INTO balance, reserved, spent;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at)
    VALUES (p_user, 'refund', 'refund', p_amount, balance - p_amount, balance, p_key,
            p_original, p_metadata, v_now)
    RETURNING id INTO entry_id;
    IF cardinality(v_gids) > 0 THEN
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT tokens_refund.entry_id, x.gid, x.amount, (x.n - 1)::integer
        FROM unnest(v_gids, v_amounts) WITH ORDINALITY AS x(gid, amount, n);
    END IF;
    response := jsonb_build_object(
        'success', true, 'user_id', p_user, 'operation_type', 'refund', 'amount', p_amount,
        'balance_before', balance - p_amount, 'new_balance', balance, 'tokens_spent', spent,
        'ledger_entry_id', entry_id::text, 'replayed', false);

    -- A refund never revives an ended grant: what went back into one leaves again at once.
    FOR i IN 1 .. cardinality(v_ended_gids) LOOP
        ended_balances := ended_balances
            || tokens_expire_grant(p_user, v_ended_gids[i], ended_tokens[i], v_now);
    END LOOP;

    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_refund.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
"""

# What each grant's remaining is not yet accounted for by its entries' splits, put on the first
# entry (created_at, id) of its user: the history before splits were kept, or before a prune
# that dropped them. A user with no entry keeps the difference, and reconcile names the grant.
RESTORE_SPLITS = """
INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
SELECT x.first_entry, x.grant_id, x.missing,
       1000000 + CAST(row_number() OVER (PARTITION BY x.first_entry ORDER BY x.grant_id)
                      AS integer)
FROM (
    SELECT m.grant_id, m.missing,
           (SELECT e.id FROM ledger_entries e WHERE e.user_id = m.user_id
            ORDER BY e.created_at, e.id LIMIT 1) AS first_entry
    FROM (
        SELECT g.id AS grant_id, g.user_id,
               g.remaining - COALESCE((SELECT SUM(eg.amount) FROM entry_grants eg
                                       WHERE eg.grant_id = g.id), 0) AS missing
        FROM grants g
    ) m
    WHERE m.missing <> 0
) x
WHERE x.first_entry IS NOT NULL
ON CONFLICT (entry_id, grant_id) DO UPDATE SET amount = entry_grants.amount + excluded.amount
"""


def upgrade() -> None:
    op.execute("DELETE FROM refund_totals WHERE entry_id NOT IN (SELECT id FROM ledger_entries)")
    with op.batch_alter_table("refund_totals") as refund_totals:
        refund_totals.create_foreign_key(
            FK, "ledger_entries", ["entry_id"], ["id"], ondelete="CASCADE"
        )
    op.execute(sa.text(RESTORE_SPLITS))
    if op.get_bind().dialect.name == "postgresql":
        for function in (LOCK, RELEASE, REFUND, JSON_BYTES):
            op.execute(function)


def downgrade() -> None:
    # The splits restored stay: they are true, and the earlier revisions never read them.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(import_module("migrations.versions.0008_credit_function").LOCK)
        op.execute(import_module("migrations.versions.0010_hold_functions").RELEASE)
        op.execute(import_module("migrations.versions.0011_spend_refund_over_helpers").REFUND)
        op.execute(import_module("migrations.versions.0009_capture_function").JSON_BYTES)
    with op.batch_alter_table("refund_totals") as refund_totals:
        refund_totals.drop_constraint(FK, type_="foreignkey")

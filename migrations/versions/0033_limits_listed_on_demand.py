"""A member's movement checks and counts its limits without listing them (issue 22)

Profiled with ``track_functions = 'all'`` on ``bench.pool_debit``'s tree (pool -> 4 teams -> 64
members, two limits on each level), pgbench running ``tokens_spend`` with one client, per debit:
a plain one 0.42 ms in ``tokens_spend``, a member's 0.81 ms, of which 0.435 ms in
``tokens_limit`` (0.35 ms of it in ``tokens_limits``). Where it went:

- ``tokens_bucket`` ran as a called SQL function 21 times a debit, about 8 us each (0.17 ms):
  inlined into ``tokens_limits``, ``tokens_window`` handed it the whole CASE that makes the
  grain, an argument it reads more than once and too costly for the planner to repeat, so it
  did not inline. The grain, span and step now come from a subquery kept apart (``OFFSET 0``),
  so ``tokens_bucket`` gets columns and inlines;
- ``tokens_limits`` built every limit's listing (``jsonb_build_object``, ``tokens_iso``), which a
  movement reads only for the limit that refuses it or that it takes to ``max_tokens``. It
  takes ``p_listed`` (default true: every listing caller as before); ``tokens_limit`` asks for
  none, and reads the one listing it needs again, in the same loop, before anything is counted,
  under the pool's lock that keeps every window of the tree as it was.

After: 0.23 ms in ``tokens_limit`` (0.15 ms in ``tokens_limits``), a member debit 0.63 ms
against a plain one's 0.39 ms in the same profile; ``bench.pool_debit``'s member debit (the
statement alone) went from 0.62-0.64 of a plain debit's rate to 0.76-0.77. Same results and
rules: limits still checked and counted in the movement's statement under the pool's lock, and
the listing a refusal or ``limit.reached`` carries is the same (tests/accounting/test_limits.py).

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Another argument: dropped and made again (a second overload would make calls ambiguous).
    op.execute("DROP FUNCTION tokens_limits(text, timestamptz, bigint)")
    snapshot.apply("0033", "tokens_window", "tokens_limits", "tokens_limit")


def downgrade() -> None:
    op.execute("DROP FUNCTION tokens_limits(text, timestamptz, bigint, boolean)")
    snapshot.apply("0024", "tokens_window", "tokens_limits")
    snapshot.apply("0030", "tokens_limit")

"""``ledger.verify``: every user's hash chain, balance fields and balance checked in the database.

The chain is written by the trigger ``tokens_chain`` (sql/ledger/tokens_chain.sql) on every
insert; ``tokens_verify`` (sql/ledger/tokens_verify.sql) recomputes it with the same
``tokens_entry_hash``, a page of users per statement when the whole ledger is checked, so each
statement sorts a page's entries, never the whole table, and memory stays bounded.
docs/verify_ledger.py checks the same chain from outside, with only the entries and the
standard library.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.schemas import Broken, VerifyOut

MAX_BROKEN_LISTED = 100
# Users a full check verifies per statement.
USERS_PER_STATEMENT = 500

_VERIFY = text("SELECT checked, broken FROM tokens_verify(CAST(:users AS text[]), :max)")
_PAGE = text("SELECT user_id FROM accounts WHERE user_id > :after ORDER BY user_id LIMIT :n")


def verify(session: Session, user_id: str | None = None) -> VerifyOut:
    """One user's chain, or every user's, a page of users per statement; at most
    ``MAX_BROKEN_LISTED`` problems, by user then entry."""
    if user_id is not None:
        row = session.execute(_VERIFY, {"users": [user_id], "max": MAX_BROKEN_LISTED}).one()
        return _out(int(row.checked), row.broken)
    checked, after = 0, ""
    broken: list[dict[str, str]] = []
    while True:
        users = list(session.execute(_PAGE, {"after": after, "n": USERS_PER_STATEMENT}).scalars())
        if not users:
            return _out(checked, broken)
        row = session.execute(_VERIFY, {"users": users, "max": MAX_BROKEN_LISTED}).one()
        checked += int(row.checked)
        broken.extend(row.broken[: MAX_BROKEN_LISTED - len(broken)])  # only what is listed
        after = users[-1]


def _out(checked: int, broken: list[dict[str, str]]) -> VerifyOut:
    return VerifyOut(checked=checked, broken=[Broken(**b) for b in broken[:MAX_BROKEN_LISTED]])

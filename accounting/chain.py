"""``ledger.verify``: every user's hash chain, balance fields and balance checked in the database.

The chain is written by the trigger ``tokens_chain`` (sql/ledger/tokens_chain.sql) on every
insert; ``tokens_verify`` (sql/ledger/tokens_verify.sql) recomputes it with the same
``tokens_entry_hash``, a page of users per statement when the whole ledger is checked, so each
statement sorts a page's entries, never the whole table, and memory stays bounded. The pages
can be checked on several connections at once: the work is the database's (hashing), so each
connection is a server process of its own, one core each.
docs/verify_ledger.py checks the same chain from outside, with only the entries and the
standard library.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from models.schemas import Broken, VerifyOut

MAX_BROKEN_LISTED = 100
# Users a full check verifies per statement.
USERS_PER_STATEMENT = 500

_VERIFY = text("SELECT checked, broken FROM tokens_verify(CAST(:users AS text[]), :max)")
_PAGE = text("SELECT user_id FROM accounts WHERE user_id > :after ORDER BY user_id LIMIT :n")

Checked = tuple[int, list[dict[str, str]]]


def verify(session: Session, user_id: str | None = None, connections: int = 1) -> VerifyOut:
    """One user's chain, or every user's, a page of users per statement (on ``connections``
    connections at once: the session's engine lends the others); at most
    ``MAX_BROKEN_LISTED`` problems, by user then entry."""
    if user_id is not None:
        return _out(*_check(session, [user_id]))
    pages = _pages(session)
    if connections > 1:
        results = _in_parallel(_engine(session), pages, connections)
    else:
        results = (_check(session, users) for users in pages)
    checked = 0
    broken: list[dict[str, str]] = []
    for n, found in results:  # in page order, so the problems stay in user order
        checked += n
        broken.extend(found[: MAX_BROKEN_LISTED - len(broken)])  # only what is listed
    return _out(checked, broken)


def _check(executor: Session | Connection, users: list[str]) -> Checked:
    row = executor.execute(_VERIFY, {"users": users, "max": MAX_BROKEN_LISTED}).one()
    return int(row.checked), list(row.broken)


def _pages(session: Session) -> Iterator[list[str]]:
    after = ""
    while users := list(
        session.execute(_PAGE, {"after": after, "n": USERS_PER_STATEMENT}).scalars()
    ):
        yield users
        after = users[-1]


def _engine(session: Session) -> Engine:
    bind = session.get_bind()
    return bind.engine if isinstance(bind, Connection) else bind


def _in_parallel(engine: Engine, pages: Iterator[list[str]], connections: int) -> Iterator[Checked]:
    """Each page checked on one of ``connections`` connections of ``engine``, its result yielded
    in page order; at most two pages per connection in flight, so memory stays bounded."""
    local = threading.local()
    opened: list[Connection] = []

    def check(users: list[str]) -> Checked:
        conn: Connection | None = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = engine.connect()
            opened.append(conn)
        with conn.begin():
            return _check(conn, users)

    pending: deque[Future[Checked]] = deque()
    pool = ThreadPoolExecutor(connections, thread_name_prefix="verify")
    try:
        for users in pages:
            pending.append(pool.submit(check, users))
            if len(pending) >= 2 * connections:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        for conn in opened:
            conn.close()


def _out(checked: int, broken: list[Any]) -> VerifyOut:
    return VerifyOut(checked=checked, broken=[Broken(**b) for b in broken[:MAX_BROKEN_LISTED]])

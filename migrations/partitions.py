"""The ledger's and the events' partitions are not in the models: they are made by month, at
run time (``sql/ledger/tokens_ledger_months.sql``), under their parents, which are."""

from __future__ import annotations

import re
from typing import Any

PARTITION = re.compile(r"(ledger_entries|entry_grants|events)_(before|after|\d{4}_\d{2})")


def include_name(name: str | None, type_: str, _parents: Any) -> bool:
    """Alembic's ``include_name``: compare everything but the partitions (and their indexes,
    which go with them)."""
    return not (type_ == "table" and name is not None and PARTITION.fullmatch(name))


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, _compare: Any) -> bool:
    """Alembic's ``include_object``: a key referring to the ledger refers, in the catalog, to
    each partition as well; those are PostgreSQL's, not ours."""
    if type_ == "foreign_key_constraint" and reflected:
        return not PARTITION.fullmatch(obj.referred_table.name)
    return True

"""Check a ledger's hash chains with nothing but the entries and the standard library.

    python docs/verify_ledger.py entries.json

``entries.json`` holds entries as ``ledger.user_entries`` returns them (a JSON array, or one
object per line), of any users, in any order. Each user's entries are put in the contract's
order (``created_at``, ties by ``id``) and checked: the first entry's ``prev_hash`` is 64 zeros
(or it is a ``carried_forward`` checkpoint, whose ``hash`` is trusted), each later entry's
``prev_hash`` is the previous entry's ``hash``, each ``hash`` is SHA-256 of ``prev_hash``, a
newline and the entry's canonical JSON, and each ``balance_before`` is the previous
``balance_after``. Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

ZEROS = "0" * 64
FIELDS = (
    "id",
    "user_id",
    "operation_type",
    "tokens_amount",
    "balance_before",
    "balance_after",
    "idempotency_key",
    "original_entry_id",
    "metadata",
    "created_at",
    "spent_by",
)


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """The contract's hash of ``entry`` after ``prev_hash``."""
    fields = {name: entry.get(name) for name in FIELDS}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def problems(entries: Iterable[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(user_id, entry_id, reason) for each entry that breaks its user's chain."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_user[entry["user_id"]].append(entry)
    found = []
    for user_id in sorted(by_user):
        chain = sorted(
            by_user[user_id],
            key=lambda e: (datetime.fromisoformat(e["created_at"]), int(e["id"])),
        )
        prev_hash, prev_after = ZEROS, 0
        for n, entry in enumerate(chain):
            checkpoint = entry["operation_type"] == "carried_forward" and n == 0
            if entry["prev_hash"] != prev_hash:
                found.append((user_id, entry["id"], "prev_hash"))
            elif not checkpoint and entry["hash"] != entry_hash(prev_hash, entry):
                found.append((user_id, entry["id"], "hash"))
            elif entry["balance_before"] != prev_after:
                found.append((user_id, entry["id"], "balance_before"))
            prev_hash, prev_after = entry["hash"], entry["balance_after"]
    return found


def read(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("["):
        loaded: list[dict[str, Any]] = json.loads(text)
        return loaded
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    entries = read(argv[0])
    found = problems(entries)
    for user_id, entry_id, reason in found:
        print(f"{user_id} {entry_id}: {reason}")
    print(f"{len(entries)} entries checked, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

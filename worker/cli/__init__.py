"""``tokens``: the operator CLI. Every command runs the same domain functions as the tasks.

- ``group``: the ``tokens`` group, exit statuses, JSON output, running the domain;
- ``generated``: commands whose parameters are a task's payload model's fields;
- ``tasks``: the commands that mirror tasks (balance, debit, reserve, history, renew...);
- ``operations``: migrate, doctor, account show, expiries, reconcile, pruning, the sweep;
- ``events``: follow the events; the webhook's dead ones, listed and delivered again.

Importing it loads click and nothing heavier (``tokens --help`` answers at once).
"""

from __future__ import annotations

from worker.cli import events, operations, tasks
from worker.cli.group import main

__all__ = ["events", "main", "operations", "tasks"]

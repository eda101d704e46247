"""What a refusal leaves once its request's transaction has rolled back: the ``limit.reached``
event of a request a spend limit refused (contract v1.2), written alike for a task
(tasks/base.py) and for the same request from the CLI (worker/cli/group.py)."""

from __future__ import annotations

import logging

from accounting import limits
from accounting.errors import LimitExceeded
from worker.db import session_scope
from worker.failures import one_line

log = logging.getLogger(__name__)


def note_refused(refused: LimitExceeded) -> None:
    """The ``limit.reached`` a refusal writes (once per window and limit), in a transaction of
    its own: the request's rolled back. Best effort: the refusal is the answer either way, and
    the next refusal or reach in the window writes it."""
    try:
        with session_scope() as session:
            limits.note_refused(session, refused)
    except Exception as exc:  # a refusal must stay a refusal, not become a failure
        log.warning("limit.reached for a refusal not written: %s", one_line(exc))

"""worker/celery.py: what a pool process does when it starts."""

from __future__ import annotations

import gc

from worker import celery as worker_celery


def test_a_pool_process_moves_what_it_starts_with_out_of_the_collectors_way() -> None:
    """Frozen, the modules and the app a pool process starts with are never scanned again: a
    full collection over them paused a task about 60 ms."""
    gc.unfreeze()
    try:
        worker_celery._after_fork()
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()

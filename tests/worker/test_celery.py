"""worker/celery.py: what a pool process does when it starts."""

from __future__ import annotations

import gc
import os
import uuid

from celery import Celery

from tests.support import WorkerProcess, running_workers
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


def test_every_pool_process_of_a_real_worker_starts_frozen(app: Celery) -> None:
    # The hook above, connected where Celery calls it: in each prefork pool process.
    queue = f"probe-{uuid.uuid4().hex[:8]}"
    w = WorkerProcess(
        f"probe-{os.getpid()}", concurrency=2, queues=queue, include="tests.worker.probe_tasks"
    )
    with running_workers(app, w):
        results = [app.send_task("test.pool_process", queue=queue) for _ in range(20)]
        seen = [r.get(timeout=30) for r in results]
    assert w.proc is not None
    assert all(s["pid"] != w.proc.pid for s in seen)  # pool processes, not the main one
    assert all(s["frozen"] > 10_000 for s in seen), seen


def test_the_worker_threads_start_after_every_process_it_forks() -> None:
    """The coalescer's and the events relay's threads import as they start (the coalescer: the
    result backend). A process forked meanwhile inherits that module's import lock held by a
    thread it does not have, and hangs at its own first import of it: an embedded beat (-B)
    did, before its first tick, about one start in three under load (tests/worker/
    test_producers_e2e.py). Their order among the worker's steps came from a set's iteration
    order; the blueprint's graph must put Pool and Beat before them."""
    from celery.worker import WorkController

    from worker import coalescer, relay

    blueprint = WorkController.Blueprint(steps=worker_celery.app.steps["worker"])
    blueprint._finalize_steps(blueprint.claim_steps())
    graph = blueprint.graph

    def ancestors(step: type) -> set[str]:
        found: set[str] = set()
        todo = [step]
        while todo:
            for before in graph[todo.pop()]:
                if before.name not in found:
                    found.add(before.name)
                    todo.append(before)
        return found

    for thread_step in (coalescer.Step, relay.Step):
        assert {"celery.worker.components.Pool", "celery.worker.components.Beat"} <= ancestors(
            thread_step
        ), thread_step

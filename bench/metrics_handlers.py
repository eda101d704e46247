"""What the metrics cost a task: the signal handlers one ``tokens.debit`` runs through, in
prometheus_client's multiprocess mode, timed in-process (no broker, no database).

    python -m bench.metrics_handlers [--tasks 20000]

Prints microseconds per task (best of five rounds); compare with the worker CPU a debit costs
(about 4 ms, /work/shared/CELERY-NOTES.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        # As the worker does: the directory is set before prometheus_client is imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        print(f"metrics handlers per task: {per_task(args.tasks):.1f} us (best of 5)")


def per_task(tasks: int) -> float:
    from worker import metrics

    metrics.configure(frozenset({"image_generation"}), frozenset({"celery"}))
    info = {"routing_key": "celery"}
    request = SimpleNamespace(delivery_info=info, eta=None, kwargs={})
    task: Any = SimpleNamespace(name="tokens.debit", request=request)
    message: Any = SimpleNamespace(request_dict={}, name="tokens.debit", delivery_info=info)
    outcome: dict[str, Any] = {
        "operation": "tokens.debit",
        "operation_type": "image_generation",
        "amount": -10,
        "success": True,
        "replayed": False,
        "duration": 0.004,
        "error_code": None,
    }

    def one() -> None:
        metrics.on_task_received(request=message)  # main process
        setattr(request, metrics.RECEIVED_AT, message.request_dict[metrics.RECEIVED_AT])
        metrics.on_task_prerun(task=task)  # pool process from here on
        metrics.on_operation_completed(**outcome)
        metrics.on_task_success(sender=task, result={"success": True}, runtime=0.004)
        metrics.on_task_postrun()

    for _ in range(min(tasks, 1000)):
        one()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(tasks):
            one()
        rounds.append((time.perf_counter() - started) / tasks * 1e6)
    return min(rounds)


if __name__ == "__main__":
    main()

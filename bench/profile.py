"""Profile a worker under a debit load: py-spy samples every worker process (main and pool).

    python -m bench.profile [--tasks 3000] [--concurrency 2] [--rate 200] [--out PATH]

Starts ``celery -A worker worker`` under ``py-spy record --subprocesses`` on its own scratch
database and Redis pair, sends ``--tasks`` ``tokens.debit`` messages from one producer, collects
every result, stops the worker and writes a speedscope file (open it at https://www.speedscope.app
or with ``speedscope FILE``) under var/profile/. Then prints where the worker's samples went: the
share of samples whose stack passes through each of the project's functions (inclusive) and the
functions the samples ended in (exclusive), so hot-path work that is not needed shows up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from worker.devenv import ROOT, Scratch, WorkerProcess, producer

OURS = tuple(
    f"({d}/" for d in ("tasks", "worker", "accounting", "models", "src/token_worker_client")
)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def summarise(path: Path, top: int) -> None:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            names = [f"{frames[i]['name']} ({_short(frames[i].get('file', ''))})" for i in stack]
            total += weight
            for name in set(names):
                inclusive[name] += weight
            exclusive[names[-1]] += weight
    if not total:
        print("no samples")
        return
    print(f"{total} samples across the worker's processes (on CPU only)")
    print("inclusive, the project's functions:")
    ours = [(n, w) for n, w in inclusive.most_common() if any(o in n for o in OURS)]
    for name, weight in ours[:top]:
        print(f"  {100 * weight / total:5.1f}%  {name}")
    print("exclusive (where samples ended):")
    for name, weight in exclusive.most_common(top):
        print(f"  {100 * weight / total:5.1f}%  {name}")


def _short(file: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/client/", str(ROOT) + "/", "/lib/python"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: make install (it is in the dev extra)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "var" / "profile" / f"worker-debits-{stamp}.speedscope.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    scratch = Scratch("tokens_profile")
    scratch.export()
    scratch.create()
    try:
        from accounting import accounts
        from worker.db import dispose_engines, session_scope
        from worker.migrate import upgrade

        upgrade()
        with session_scope() as s:
            for u in range(args.users):
                accounts.open_account(s, f"user-{u}", initial_balance=10**9)
        dispose_engines()
        app = producer()
        worker = WorkerProcess("profile", concurrency=args.concurrency, loglevel="WARNING")
        worker.argv = [
            py_spy, "record", "--subprocesses", "--rate", str(args.rate),
            "--format", "speedscope", "--output", str(out), "--", *worker.argv,
        ]  # fmt: skip
        worker.start()
        assert worker.proc is not None
        try:
            worker.wait_ready(app)
            kwargs = [
                {
                    "user_id": f"user-{i % args.users}",
                    "amount": 1,
                    "operation_type": "chatgpt_message",
                }
                for i in range(args.tasks)
            ]
            start = time.perf_counter()
            results = [app.send_task("tokens.debit", kwargs=k) for k in kwargs]
            failed = [o for o in (r.get(timeout=300) for r in results) if not o.get("success")]
            elapsed = time.perf_counter() - start
            if failed:
                raise SystemExit(f"{len(failed)} debits failed, e.g. {failed[0]}")
            print(
                f"{args.tasks} debits in {elapsed:.1f} s ({args.tasks / elapsed:.0f}/s, profiled)"
            )
        finally:
            # Stop the worker, not py-spy: py-spy writes its file when the program it runs ends.
            for pid in children(worker.proc.pid):
                os.kill(pid, signal.SIGTERM)
            try:
                worker.proc.wait(60)
            except Exception:
                worker.kill()
    finally:
        scratch.destroy()
    print(f"speedscope profile: {out}")
    summarise(out, args.top)


if __name__ == "__main__":
    main()

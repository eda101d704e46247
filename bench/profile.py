"""Profile a worker under a debit load: py-spy samples every worker process (main and pool).

    python -m bench.profile [--task health.noop] [--tasks 3000] [--concurrency 2] [--rate 200]
                            [--out PATH]

Starts ``celery -A worker worker`` under ``py-spy record --subprocesses`` on its own scratch
database and Redis pair, sends ``--tasks`` ``tokens.debit`` messages (or ``--task health.noop``,
the same kwargs to a task that does nothing) from one producer, collects every result, stops the
worker and writes a speedscope file (open it at https://www.speedscope.app or with
``speedscope FILE``) under var/profile/. Then prints where the worker's samples went, as shares
and as milliseconds of samples per task (so a debit's run and a no-op's compare line by line):
the worker's main process and its pool processes apart, each of the project's functions
(inclusive) and the functions the samples ended in (exclusive), so hot-path work that is not
needed shows up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.transport import debit_kwargs, round_trips
from tests.devenv import ROOT, Scratch, WorkerProcess, producer, running_workers

OURS = tuple(
    f"({d}/" for d in ("tasks", "worker", "accounting", "models", "src/token_worker_client")
)


def summarise(path: Path, top: int, tasks: int, main_pid: int | None = None) -> None:
    """py-spy's speedscope profiles weigh each sample in seconds (1 / its rate)."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    processes: Counter[str] = Counter()  # of seconds, not counts
    total = 0.0
    for profile in data["profiles"]:
        # py-spy names each profile "Process <pid> Thread <id> ...".
        pid = profile.get("name", "").split()[1:2]
        where = "main process" if pid == [str(main_pid)] else "pool processes"
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            names = [f"{frames[i]['name']} ({_short(frames[i].get('file', ''))})" for i in stack]
            total += weight
            processes[where] += weight
            for name in set(names):
                inclusive[name] += weight
            exclusive[names[-1]] += weight
    if not total:
        print("no samples")
        return

    def row(weight: float) -> str:
        return f"{100 * weight / total:5.1f}% {1e3 * weight / tasks:6.3f} ms/task"

    print(f"{total:.1f} s of samples across the worker's processes (on CPU only): {row(total)}")
    if main_pid is not None:
        for where, weight in sorted(processes.items()):
            print(f"  {row(weight)}  {where}")
    print("inclusive, the project's functions:")
    ours = [(n, w) for n, w in inclusive.most_common() if any(o in n for o in OURS)]
    for name, weight in ours[:top]:
        print(f"  {row(weight)}  {name}")
    print("exclusive (where samples ended):")
    for name, weight in exclusive.most_common(top):
        print(f"  {row(weight)}  {name}")


def _short(file: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/client/", str(ROOT) + "/", "/lib/python"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--task", choices=("tokens.debit", "health.noop"), default="tokens.debit")
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
    kind = "debits" if args.task == "tokens.debit" else "noops"
    out = args.out or ROOT / "var" / "profile" / f"worker-{kind}-{stamp}.speedscope.json"
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
        with running_workers(app, worker):
            assert worker.proc is not None
            kwargs = debit_kwargs(args.users)  # the no-op gets them too: same messages
            round_trips(app, args.task, kwargs, 300)  # warm up: connections, pool processes
            # Attached once the worker is warm, so start-up is not in the samples; py-spy writes
            # its file when interrupted.
            argv = [py_spy, "record", "--pid", str(worker.proc.pid), "--subprocesses"]
            argv += ["--rate", str(args.rate), "--format", "speedscope", "--output", str(out)]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            time.sleep(2)  # py-spy attaching to every process
            elapsed = round_trips(app, args.task, kwargs, args.tasks)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(
                f"{args.tasks} {kind} in {elapsed:.1f} s ({args.tasks / elapsed:.0f}/s, profiled)"
            )
    finally:
        scratch.destroy()
    print(f"speedscope profile: {out}")
    summarise(out, args.top, args.tasks, worker.proc.pid if worker.proc else None)


if __name__ == "__main__":
    main()

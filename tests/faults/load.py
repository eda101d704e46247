"""Producers sending debits through the typed client while a fault is injected, and the account
of what became of each: sent, acknowledged, applied once, applied twice, lost.

Each debit has its own ``idempotency_key`` (the ledger keeps it), so the ledger tells how many
times each was applied. The client is used with ``retries=0`` while the fault runs, so a message
the broker acknowledged and then lost shows as lost (a client retry would hide it); afterwards
every debit not known to be applied is sent again with its key, as the client's errors tell a
producer to, and every debit must then be applied exactly once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.stack import Stack
from token_worker_client import TokenClient
from token_worker_client.errors import TaskFailed, TokenTimeout, TokenUnavailable
from token_worker_client.models import Failure

BALANCE = 10**12
#: Outcomes where the broker took the message (the publish returned).
ACKNOWLEDGED = ("ok", "refused", "timeout", "failed", "error")
#: Of those, the ones a producer is not told the fate of: each must be applied, unasked.
UNTOLD = ("timeout", "error")


@dataclass
class Debit:
    key: str
    user: str
    outcome: str = "pending"
    detail: str = ""


@dataclass
class Report:
    fault: str
    sent: int = 0
    acknowledged: int = 0
    not_sent: int = 0  # the client said the broker refused it
    answered: int = 0  # a result came back (ok or a refusal)
    applied: int = 0  # keys applied at least once, before any resend
    applied_twice: int = 0
    lost_acknowledged: int = 0  # acknowledged, never applied, before any resend
    answered_not_applied: int = 0
    recover_seconds: float = 0.0
    resent: int = 0
    final_applied_once: int = 0
    final_applied_twice: int = 0
    retried_same_key: int = 0
    reconcile_mismatches: int = -1
    outcomes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def reported_failed(self) -> int:
        """Sends the producer was told failed: the broker refused it, or the task failed."""
        return self.outcomes.get("unavailable", 0) + self.outcomes.get("failed", 0)

    def row(self) -> str:
        cells = (
            self.fault, self.sent, self.acknowledged, self.answered, self.reported_failed,
            self.applied, self.applied_twice, self.lost_acknowledged,
            f"{self.recover_seconds:.1f}", self.resent, self.final_applied_once,
            self.final_applied_twice, self.reconcile_mismatches,
        )  # fmt: skip
        return "| " + " | ".join(str(c) for c in cells) + " |"

    HEADER = (
        "| fault | sent | acknowledged by the broker | answered | reported failed | applied | "
        "applied twice | lost among acknowledged | recovered in (s) | resent with same key | "
        "applied once at the end | applied twice at the end | reconcile mismatches |\n"
        "| --- |" + " ---: |" * 12
    )


class Load:
    """``total`` debits of 1 token over ``users`` accounts from ``producers`` threads, each with
    its own client; :attr:`done` counts the sends that ended (for a fault to start at)."""

    def __init__(
        self,
        stack: Stack,
        total: int,
        users: int = 32,
        producers: int = 8,
        timeout: float = 20,
        broker_url: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``broker_url``, ``config``: the clients' broker (the stack's Redis by default) and
        Celery settings (publisher confirms, the queue type)."""
        self.stack = stack
        self.broker_url = broker_url or stack.broker_url
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]
        self.users = [f"f{self.run_id}-{i}" for i in range(users)]
        self.debits = [Debit(f"{self.run_id}-{i}", self.users[i % users]) for i in range(total)]
        self.producers = producers
        self.timeout = timeout
        self.done = 0
        self._lock = threading.Lock()
        self._next = 0
        self._threads: list[threading.Thread] = []

    def client(self, timeout: float | None = None, retries: int = 0) -> TokenClient:
        return TokenClient(
            self.broker_url,
            self.stack.backend_url,
            timeout=timeout or self.timeout,
            retries=retries,
            config=self.config,
        )

    def open_accounts(self) -> None:
        with self.client(timeout=30, retries=2) as client:
            for user in self.users:
                client.open_account(user_id=user, initial_balance=BALANCE).unwrap()

    # --- sending ------------------------------------------------------------------------------

    def start(self) -> Load:
        for _ in range(self.producers):
            t = threading.Thread(target=self._produce, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def wait_done(self, fraction: float, timeout: float = 300) -> None:
        """Until ``fraction`` of the debits have been sent and answered (or failed)."""
        target = int(len(self.debits) * fraction)
        deadline = time.monotonic() + timeout
        while self.done < target and time.monotonic() < deadline:
            time.sleep(0.05)

    def _take(self) -> Debit | None:
        with self._lock:
            if self._next >= len(self.debits):
                return None
            debit = self.debits[self._next]
            self._next += 1
            return debit

    def _produce(self) -> None:
        with self.client() as client:
            while (debit := self._take()) is not None:
                debit.outcome, debit.detail = send(client, debit)
                with self._lock:
                    self.done += 1

    # --- what became of them ------------------------------------------------------------------

    def applied_counts(self) -> Counter[str]:
        rows = self.stack.rows(
            "SELECT idempotency_key, count(*) FROM ledger_entries"
            " WHERE idempotency_key LIKE :prefix GROUP BY idempotency_key",
            prefix=f"{self.run_id}-%",
        )
        return Counter({key: int(n) for key, n in rows})

    def settle(self, report: Report, fault_ended: float, within: float) -> Counter[str]:
        """Wait (up to ``within`` s after the fault ended) until every acknowledged debit is
        applied, or the broker holds nothing more and the ledger stops moving."""
        expected = {d.key for d in self.debits if d.outcome in ("ok", *UNTOLD)}
        deadline = fault_ended + within
        last, stable_since = -1, time.monotonic()
        counts: Counter[str] = Counter()
        while time.monotonic() < deadline:
            try:
                counts = self.applied_counts()
                backlog = self.stack.broker_backlog()
            except Exception:
                time.sleep(0.5)
                continue
            if expected <= set(counts):
                break
            if len(counts) != last:
                last, stable_since = len(counts), time.monotonic()
            elif backlog == 0 and time.monotonic() - stable_since > 10:
                break
            time.sleep(0.5)
        report.recover_seconds = max(0.0, time.monotonic() - fault_ended)
        return counts

    def report(self, fault: str, fault_ended: float, within: float = 120) -> Report:
        r = Report(fault, sent=len(self.debits))
        r.outcomes = dict(Counter(d.outcome for d in self.debits))
        r.acknowledged = sum(1 for d in self.debits if d.outcome in ACKNOWLEDGED)
        r.not_sent = r.outcomes.get("unavailable", 0)
        r.answered = r.outcomes.get("ok", 0) + r.outcomes.get("refused", 0)
        counts = self.settle(r, fault_ended, within)
        r.applied = len(counts)
        r.applied_twice = sum(1 for n in counts.values() if n > 1)
        r.lost_acknowledged = sum(
            1 for d in self.debits if d.outcome in UNTOLD and d.key not in counts
        )
        r.answered_not_applied = sum(
            1 for d in self.debits if d.outcome == "ok" and d.key not in counts
        )
        for d in self.debits:
            if d.outcome in ("error", "failed", "refused") and len(r.notes) < 5:
                r.notes.append(f"{d.outcome}: {d.detail[:200]}")
        self.resend(r, counts)
        return r

    def resend(self, r: Report, counts: Counter[str]) -> None:
        """Every debit not applied is sent again with its key; a sample of applied ones too
        (the client's retry of a debit that did apply): all must end applied exactly once."""
        missing = [d for d in self.debits if d.key not in counts]
        again = [d for d in self.debits if d.key in counts][:50]
        r.resent = len(missing)
        with self.client(timeout=30, retries=2) as client:
            for d in missing + again:
                outcome, detail = send(client, d)
                if outcome != "ok":
                    r.notes.append(f"resend of {d.key}: {outcome} {detail[:200]}")
            r.retried_same_key = len(again)
            out = client.reconcile()
            mismatches = getattr(out, "mismatches", None)
            r.reconcile_mismatches = len(mismatches) if mismatches is not None else -1
        final = self.applied_counts()
        r.final_applied_once = sum(1 for d in self.debits if final.get(d.key) == 1)
        r.final_applied_twice = sum(1 for n in final.values() if n > 1)


def send(client: TokenClient, debit: Debit) -> tuple[str, str]:
    """One debit through the typed client: its outcome as the producer sees it."""
    try:
        out = client.debit(
            user_id=debit.user, amount=1, operation_type="image_generation",
            idempotency_key=debit.key,
        )  # fmt: skip
    except TokenUnavailable as exc:
        return "unavailable", str(exc)
    except TokenTimeout as exc:
        return "timeout", str(exc)
    except TaskFailed as exc:
        return "failed", str(exc)
    except Exception as exc:  # the result backend's connection lost while waiting, ...
        return "error", f"{type(exc).__name__}: {exc}"
    if isinstance(out, Failure):
        return "refused", f"{out.error_code}: {out.error}"
    return "ok", ""


def during(load: Load, at: float, fault: Callable[[], Any]) -> float:
    """Run ``fault`` once ``at`` of the load has been sent; let the load finish; the time the
    fault ended (monotonic)."""
    load.wait_done(at)
    fault()
    ended = time.monotonic()
    load.wait()
    return ended

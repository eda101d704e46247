"""Operations: the schema, the health of the service, and the scheduled work run now (expiries,
reconcile, pruning, the renewal sweep). Those that share a task's kwargs take them from its
model too (worker/cli/generated.py); each runs in transactions of its own, with a progress bar
on stderr where it can take a while."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from worker.cli.generated import Fields, task_command, values
from worker.cli.group import emit, main, ready, refuse, since

if TYPE_CHECKING:
    from models.schemas import DeleteOldEntriesIn, ReconcileIn, SweepIn, UserIn, VerifyIn


@main.command()
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Retry for up to SECONDS until the database accepts connections (one still starting).",
)
def migrate(wait: float) -> None:
    """Apply the database migrations (safe to run again); with TOKENS_WORKER_DB_PASSWORD, let
    the worker's role log in with it."""
    from worker.migrate import upgrade
    from worker.preflight import wait_for_database
    from worker.settings import get_settings, masked

    settings = get_settings()
    url = settings.migrate_url
    if wait:
        wait_for_database(wait, url)
    upgrade()
    click.echo(f"schema up to date on {masked(url)}")
    if settings.worker_db_password is not None:
        from worker.migrate import WORKER_ROLE, allow_worker_login

        allow_worker_login(url, settings.worker_db_password.get_secret_value())
        click.echo(f"{WORKER_ROLE} may log in")


@main.command()
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=2.0, show_default=True)
def doctor(timeout: float) -> None:
    """Check the database (reachable, migrated), broker, result backend, beat lock holder and
    workers (one must answer), one line each; exit 1 if anything is wrong."""
    from worker.doctor import run_checks

    problems = 0
    for check in run_checks(timeout):
        click.echo(f"{check.status:<5} {check.name:<9} {check.detail}")
        problems += check.status == "FAIL"
    if problems:
        raise SystemExit(1)


@main.group()
def account() -> None:
    """One account."""


@task_command(account, "show", Fields("UserIn", ("user_id",)))
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True)
def account_show(payload: UserIn, limit: int) -> None:
    """A user's balance, renewal, totals and newest ledger entries, read in one transaction."""
    from accounting import accounts, ledger, renewals
    from accounting.errors import DomainError
    from worker.db import session_scope

    ready()
    user_id = payload.user_id
    try:
        with session_scope() as session:
            shown = {
                "success": True,
                "balance": accounts.get_balance(session, user_id).model_dump(mode="json"),
                "renewal": renewals.check_eligibility(session, user_id).model_dump(mode="json"),
                "statistics": ledger.statistics(session, user_id).model_dump(mode="json"),
                "entries": ledger.user_entries(session, user_id, limit=limit).model_dump(
                    mode="json"
                )["entries"],
            }
    except DomainError as exc:
        refuse(exc)
    emit(shown)


# --- what the beat schedules, now -------------------------------------------------------------


@main.command("expire-reservations")
def expire_reservations() -> None:
    """Release every reservation past its expiry now."""
    from accounting import reservations
    from models.schemas import ExpireOut
    from worker.db import session_factory

    ready()
    emit(ExpireOut(expired=reservations.expire_all(session_factory())))


@main.command("expire-grants")
def expire_grants() -> None:
    """Expire every grant past its end now (what the beat's grants.expire does each minute)."""
    from accounting import expiry
    from models.schemas import GrantsExpireOut
    from worker.db import session_factory

    ready()
    expired, tokens = expiry.expire_all(session_factory())
    emit(GrantsExpireOut(expired=expired, tokens_expired=tokens))


@main.command("months")
@click.option(
    "--make",
    "ahead",
    type=click.IntRange(min=0, max=120),
    default=None,
    help="First make the missing months up to N ahead (the worker and beat keep three).",
)
def months_command(ahead: int | None) -> None:
    """The ledger's partitions, one per UTC month (entries: the planner's estimate), oldest
    first: {"success": true, "made": [...], "months": [{name, lower, upper, entries}]}."""
    from accounting import months
    from worker.db import session_scope

    ready()
    made: list[str] = []
    with session_scope() as session:
        if ahead is not None:
            made = months.make_months(session, ahead)
            session.commit()
        listed = [m.model_dump(mode="json") for m in months.months(session)]
    emit({"success": True, "made": made, "months": listed})


@task_command(main, "reconcile", Fields("ReconcileIn", helps={"user_id": "Check one user only."}))
def reconcile(payload: ReconcileIn) -> None:
    """List users whose balance differs from the sum of their ledger (exit 1 if any)."""
    from accounting import ledger
    from worker.db import session_scope

    ready()
    with session_scope() as session:
        out = ledger.reconcile(session, payload.user_id)
    emit(out)
    if out.mismatches:
        raise SystemExit(1)


@task_command(main, "verify", Fields("VerifyIn", helps={"user_id": "Check one user only."}))
def verify(payload: VerifyIn) -> None:
    """Check every hash chain, balance field and balance (exit 1 if anything is broken)."""
    from accounting import chain
    from worker.db import session_scope
    from worker.settings import get_settings

    ready()
    with session_scope() as session:
        out = chain.verify(session, payload.user_id, get_settings().verify_on)
    emit(out)
    if out.broken:
        raise SystemExit(1)


@task_command(main, "delete-old-entries", Fields("DeleteOldEntriesIn", ("older_than",)))
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--users-per-transaction", type=click.IntRange(min=1), default=1000, show_default=True
)
def delete_old_entries(
    payload: DeleteOldEntriesIn, dry_run: bool, yes: bool, users_per_transaction: int
) -> None:
    """Prune entries older than a date (UTC unless it names an offset), carrying each user's sum
    forward. With --dry-run, print what it would delete: {"dry_run": true, "would_delete": N,
    "users": M}."""
    from accounting import ledger
    from worker.db import session_factory, session_scope
    from worker.signals import send_completed

    cutoff = payload.older_than
    ready()
    with session_scope() as session:
        estimate = ledger.count_old_entries(session, cutoff).deleted
        users = ledger.users_with_old_entries(session, cutoff)
    if dry_run:
        emit({"success": True, "dry_run": True, "would_delete": estimate, "users": users})
        return
    if not yes:
        click.confirm(
            f"Delete {estimate} ledger entries created before {cutoff.isoformat()} "
            f"of {users} users (each user's sum kept as one carried_forward entry)?",
            abort=True,
            err=True,
        )
    started = time.perf_counter()
    with click.progressbar(length=users, label="pruning", show_pos=True, file=sys.stderr) as bar:
        out = ledger.delete_old_entries_in_chunks(
            session_factory(), cutoff, users_per_transaction, progress=bar.update
        )
    send_completed("ledger.delete_old_entries", None, {}, out.model_dump(), since(started))
    emit(out)


SWEEP = Fields(
    "SweepIn",
    names={"continue_on_error": ("--continue-on-error/--stop-on-error",)},
    helps={
        "tier": "Only this tier.",
        "limit": "Renew at most N.",
        "dry_run": "Count what a sweep would do; change nothing.",
        "continue_on_error": "Go on past a failed renewal, or stop at the first.",
    },
)


@task_command(main, "sweep", SWEEP)
def sweep(payload: SweepIn) -> None:
    """Run the renewal sweep now (one transaction per chunk; safe beside the scheduled one)."""
    from accounting import renewals
    from accounting.errors import DomainError
    from worker.db import session_factory
    from worker.signals import send_completed

    ready()
    started = time.perf_counter()
    with click.progressbar(length=1, label="renewing", show_pos=True, file=sys.stderr) as bar:

        def progress(users: int, planned: int) -> None:
            bar.length = max(planned, 1)
            bar.update(users)

        try:
            out = renewals.sweep(session_factory(), **values(payload), progress=progress)
        except DomainError as exc:
            refuse(exc)
    send_completed(
        "renewals.sweep", None, {"tier": payload.tier}, out.model_dump(mode="json"), since(started)
    )
    emit(out)
    if out.failed:
        raise SystemExit(1)

"""``tokens``: the operator CLI. Every command runs the same domain functions as the tasks.

Exit status: 0 done; 1 a refusal (the contract's failure JSON on stdout) or, for ``reconcile``
and ``doctor``, something found wrong; 2 a usage error or a bad setting; 3 the database (or
another server) unreachable, or not migrated. Any problem but a refusal is one line on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from accounting import accounts, expiry, ledger, movements, renewals, reservations
from accounting import grants as grant_rows
from accounting.errors import DomainError
from models.schemas import (
    MAX_AMOUNT,
    MAX_TTL_SECONDS,
    EntryId,
    ExpireOut,
    Failure,
    GrantsExpireOut,
    GrantsOut,
    IdempotencyKey,
    Metadata,
    OperationType,
    Reason,
    ReservationId,
    TierName,
    UserId,
    UTCDatetime,
)
from worker.db import session_factory, session_scope
from worker.preflight import Unavailable, database_problem, reason, wait_for_database
from worker.settings import ConfigurationError, get_settings, masked
from worker.signals import connect_configured_handlers, send_completed

# The domain does not re-check what the task schemas check, so the CLI applies the same rules.
AMOUNT = click.IntRange(max=MAX_AMOUNT)


class Problem(click.ClickException):
    """Anything but a refusal: one line on stderr."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"tokens: {self.message}", err=True)


class TokensGroup(click.Group):
    """Turns a bad setting or an unreachable database into one line and a non-zero exit, for
    every command; a traceback is left for what is a bug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            raise Problem(f"configuration error: {exc}", 2) from None
        except Unavailable as exc:
            raise Problem(str(exc), 3) from None
        except (OperationalError, InterfaceError) as exc:
            url = masked(get_settings().db_url)
            raise Problem(f"database {url} unreachable: {reason(exc)}", 3) from None


def _checked(annotation: Any) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback validating a value as the task schemas validate ``annotation``."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def check(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            reasons = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise click.BadParameter("; ".join(reasons)) from None

    return check


def _json_object(annotation: Any) -> Callable[[click.Context, click.Parameter, Any], Any]:
    validate = _checked(annotation)

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON ({exc})") from None
        return validate(ctx, param, parsed)

    return check


_user_id = _checked(UserId)
_date = _checked(UTCDatetime)
_metadata_option = click.option(
    "--metadata", default=None, callback=_json_object(Metadata), help="A JSON object."
)
_key_option = click.option("--idempotency-key", default=None, callback=_checked(IdempotencyKey))


def _emit(model: BaseModel | dict[str, Any]) -> None:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    click.echo(json.dumps(data, indent=2))


def _ready(schema: bool = True) -> None:
    """Before a command's work: the settings (one line if bad), the signal handlers they name
    (so they fire for CLI movements as in the worker), and the schema at head."""
    get_settings()
    connect_configured_handlers()
    if schema:
        problem = database_problem()
        if problem:
            raise Unavailable(problem)


def _run(operation: str | None, action: Callable[..., BaseModel], **kwargs: Any) -> None:
    """``action(session, **kwargs)`` in one transaction, reported through
    ``operation_completed`` as the task ``operation`` would be (``task_id`` None)."""
    _ready()
    started = time.perf_counter()
    try:
        with session_scope() as session:
            out = action(session, **kwargs)
    except DomainError as exc:
        failure = Failure(error=exc.message, error_code=exc.code)
        if operation is not None:
            send_completed(operation, None, kwargs, failure.model_dump(), _since(started))
        _emit(failure)
        raise SystemExit(1) from None
    result = out.model_dump(mode="json")
    if operation is not None:
        send_completed(operation, None, kwargs, result, _since(started))
    _emit(result)


def _since(started: float) -> float:
    return time.perf_counter() - started


@click.group(cls=TokensGroup)
def main() -> None:
    """Operate the token ledger."""


@main.command()
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Retry for up to SECONDS until the database accepts connections (one still starting).",
)
def migrate(wait: float) -> None:
    """Apply the database migrations (safe to run again)."""
    from worker.migrate import upgrade

    url = get_settings().db_url
    if wait:
        wait_for_database(wait)
    upgrade()
    click.echo(f"schema up to date on {masked(url)}")


# --- accounts and movements -----------------------------------------------------------------


@main.command()
@click.argument("user_id", callback=_user_id)
def balance(user_id: str) -> None:
    """Show a user's balance."""
    _run("tokens.get_balance", accounts.get_balance, user_id=user_id)


@main.group()
def account() -> None:
    """One account."""


@account.command("show")
@click.argument("user_id", callback=_user_id)
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True)
def account_show(user_id: str, limit: int) -> None:
    """A user's balance, renewal, totals and newest ledger entries, read in one transaction."""
    _ready()
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
        _emit(Failure(error=exc.message, error_code=exc.code))
        raise SystemExit(1) from None
    _emit(shown)


@main.command()
@click.argument("user_id", callback=_user_id)
@click.option("--all", "include_ended", is_flag=True, help="Also depleted and expired grants.")
@click.option("--json", "as_json", is_flag=True, help="The tokens.grants result as JSON.")
def grants(user_id: str, include_ended: bool, as_json: bool) -> None:
    """A user's grants, in burn order (then ended ones, newest first), and their debt."""
    if as_json:
        _run("tokens.grants", grant_rows.list_grants, user_id=user_id, include_ended=include_ended)
        return
    _ready()
    try:
        with session_scope() as session:
            out = grant_rows.list_grants(session, user_id, include_ended=include_ended)
    except DomainError as exc:
        _emit(Failure(error=exc.message, error_code=exc.code))
        raise SystemExit(1) from None
    click.echo(grants_table(out))


def grants_table(out: GrantsOut) -> str:
    """One line per grant: id, kind, remaining/amount, held, priority, expiry, status."""
    header = ("GRANT", "KIND", "REMAINING/AMOUNT", "HELD", "PRIORITY", "EXPIRES_AT", "STATUS")
    rows = [header] + [
        (
            g.grant_id,
            g.kind,
            f"{g.remaining}/{g.amount}",
            str(g.held),
            str(g.priority),
            g.expires_at.isoformat() if g.expires_at else "never",
            g.status,
        )
        for g in out.grants
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join([*lines, f"debt: {out.debt}"])


@main.command("open-account")
@click.argument("user_id", callback=_user_id)
@click.option("--tier", default="Gift", show_default=True, callback=_checked(TierName))
@click.option("--initial-balance", type=AMOUNT, default=0, show_default=True)
def open_account(user_id: str, tier: str, initial_balance: int) -> None:
    """Open an account (nothing changes if it exists)."""
    _run(
        "tokens.open_account",
        accounts.open_account,
        user_id=user_id,
        tier=tier,
        initial_balance=initial_balance,
    )


@main.command("set-tier")
@click.argument("user_id", callback=_user_id)
@click.argument("tier", callback=_checked(TierName))
@click.option(
    "--subscription-expires-at",
    default=None,
    callback=_date,
    help="ISO 8601; without it a paid tier never expires.",
)
def set_tier(user_id: str, tier: str, subscription_expires_at: datetime | None) -> None:
    """Move a user to a tier (replaces the subscription's end)."""
    _run(
        "tokens.set_tier",
        accounts.set_tier,
        user_id=user_id,
        tier=tier,
        subscription_expires_at=subscription_expires_at,
    )


@main.command()
@click.argument("user_id", callback=_user_id)
@click.argument("amount", type=AMOUNT)
@click.option("--operation-type", required=True, callback=_checked(OperationType))
@click.option("--allow-overdraft", is_flag=True, help="Let the balance go below zero.")
@_metadata_option
@_key_option
def debit(
    user_id: str,
    amount: int,
    operation_type: str,
    allow_overdraft: bool,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
) -> None:
    """Debit tokens from a user."""
    _run(
        "tokens.debit",
        movements.debit,
        user_id=user_id,
        amount=amount,
        operation_type=operation_type,
        allow_overdraft=allow_overdraft,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )


@main.command()
@click.argument("user_id", callback=_user_id)
@click.argument("amount", type=AMOUNT)
@click.option(
    "--operation-type", default="purchase", show_default=True, callback=_checked(OperationType)
)
@_metadata_option
@_key_option
@click.option(
    "--grant-kind",
    type=click.Choice(["purchased", "promo"]),
    default="purchased",
    show_default=True,
)
@click.option("--expires-at", default=None, callback=_date, help="ISO 8601, in the future.")
@click.option(
    "--priority", type=click.IntRange(0, 100), default=None, help="Default: by kind (50, 20)."
)
def credit(
    user_id: str,
    amount: int,
    operation_type: str,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    grant_kind: str,
    expires_at: datetime | None,
    priority: int | None,
) -> None:
    """Credit tokens to a user, as a new purchased (or promo) grant."""
    _run(
        "tokens.credit",
        movements.credit,
        user_id=user_id,
        amount=amount,
        operation_type=operation_type,
        metadata=metadata,
        idempotency_key=idempotency_key,
        grant_kind=grant_kind,
        expires_at=expires_at,
        priority=priority,
    )


@main.command()
@click.argument("user_id", callback=_user_id)
@click.argument("operation_type", callback=_checked(OperationType))
@_metadata_option
@_key_option
def charge(
    user_id: str,
    operation_type: str,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
) -> None:
    """Charge a user the price of an operation."""
    _run(
        "tokens.charge",
        movements.charge,
        user_id=user_id,
        operation_type=operation_type,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )


@main.command()
@click.argument("user_id", callback=_user_id)
@click.argument("amount", type=AMOUNT)
@click.option("--reason", default=None, callback=_checked(Reason))
@click.option(
    "--original-entry-id",
    default=None,
    callback=_checked(EntryId),
    help="The debit or charge refunded; all its refunds together never exceed it.",
)
@_metadata_option
@_key_option
def refund(
    user_id: str,
    amount: int,
    reason: str | None,
    original_entry_id: str | None,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
) -> None:
    """Refund tokens to a user."""
    _run(
        "tokens.refund",
        movements.refund,
        user_id=user_id,
        amount=amount,
        reason=reason,
        original_entry_id=original_entry_id,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )


@main.command("reset-balance")
@click.argument("user_id", callback=_user_id)
@click.argument("new_balance", type=AMOUNT)
@click.option("--reason", default=None, callback=_checked(Reason))
def reset_balance(user_id: str, new_balance: int, reason: str | None) -> None:
    """Set a balance, writing an adjustment entry of the difference."""
    _run(
        "tokens.reset_balance",
        movements.reset_balance,
        user_id=user_id,
        new_balance=new_balance,
        reason=reason,
    )


# --- reservations ---------------------------------------------------------------------------


@main.command()
@click.argument("user_id", callback=_user_id)
@click.option("--amount", type=AMOUNT, default=None, help="Tokens to hold...")
@click.option(
    "--operation-type", default=None, callback=_checked(OperationType), help="...or its price."
)
@click.option("--ttl-seconds", type=click.IntRange(1, MAX_TTL_SECONDS), default=900)
@_metadata_option
@_key_option
@click.option(
    "--overcapture-limit",
    type=click.IntRange(0, MAX_AMOUNT),
    default=0,
    show_default=True,
    help="How far past the hold a capture may go (into debt if need be).",
)
def reserve(
    user_id: str,
    amount: int | None,
    operation_type: str | None,
    ttl_seconds: int,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    overcapture_limit: int,
) -> None:
    """Hold tokens until captured, released or expired."""
    _run(
        "tokens.reserve",
        reservations.reserve,
        user_id=user_id,
        amount=amount,
        operation_type=operation_type,
        ttl_seconds=ttl_seconds,
        metadata=metadata,
        idempotency_key=idempotency_key,
        overcapture_limit=overcapture_limit,
    )


@main.command()
@click.argument("reservation_id", callback=_checked(ReservationId))
@click.option("--amount", type=click.IntRange(0, MAX_AMOUNT), default=0, help="Tokens to add.")
@click.option("--ttl-seconds", type=click.IntRange(1, MAX_TTL_SECONDS), default=None)
def extend(reservation_id: str, amount: int, ttl_seconds: int | None) -> None:
    """Hold more of a reservation and/or keep it alive longer (at most 7 days in all)."""
    _run(
        "tokens.extend",
        reservations.extend,
        reservation_id=reservation_id,
        amount=amount,
        ttl_seconds=ttl_seconds,
    )


@main.command()
@click.argument("reservation_id", callback=_checked(ReservationId))
@click.option("--amount", type=AMOUNT, default=None, help="Default: all of it.")
@_metadata_option
def capture(reservation_id: str, amount: int | None, metadata: dict[str, Any] | None) -> None:
    """Debit (part of) a reservation and release the rest."""
    _run(
        "tokens.capture",
        reservations.capture,
        reservation_id=reservation_id,
        amount=amount,
        metadata=metadata,
    )


@main.command()
@click.argument("reservation_id", callback=_checked(ReservationId))
@click.option("--reason", default=None, callback=_checked(Reason))
def release(reservation_id: str, reason: str | None) -> None:
    """Release a reservation's hold."""
    _run("tokens.release", reservations.release, reservation_id=reservation_id, reason=reason)


@main.command("expire-reservations")
def expire_reservations() -> None:
    """Release every reservation past its expiry now."""
    _ready()
    _emit(ExpireOut(expired=reservations.expire_all(session_factory())))


@main.command("expire-grants")
def expire_grants() -> None:
    """Expire every grant past its end now (what the beat's grants.expire does each minute)."""
    _ready()
    expired, tokens = expiry.expire_all(session_factory())
    _emit(GrantsExpireOut(expired=expired, tokens_expired=tokens))


# --- the ledger -----------------------------------------------------------------------------


@main.command()
@click.argument("user_id", callback=_user_id)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def history(user_id: str, limit: int) -> None:
    """A user's newest ledger entries."""
    _run("ledger.user_entries", ledger.user_entries, user_id=user_id, limit=limit)


@main.command()
@click.argument("user_id", callback=_user_id)
@click.option("--start-date", default=None, callback=_date, help="Inclusive, ISO 8601 (UTC).")
@click.option("--end-date", default=None, callback=_date, help="Exclusive, ISO 8601 (UTC).")
def stats(user_id: str, start_date: datetime | None, end_date: datetime | None) -> None:
    """A user's totals spent and earned, and counts by operation type, over a period."""
    _run(
        "ledger.statistics",
        ledger.statistics,
        user_id=user_id,
        start_date=start_date,
        end_date=end_date,
    )


@main.command()
@click.option("--user-id", default=None, callback=_user_id, help="Check one user only.")
def reconcile(user_id: str | None) -> None:
    """List users whose balance differs from the sum of their ledger (exit 1 if any)."""
    _ready()
    with session_scope() as session:
        out = ledger.reconcile(session, user_id)
    _emit(out)
    if out.mismatches:
        raise SystemExit(1)


@main.command("delete-old-entries")
@click.argument("older_than", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]))
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--users-per-transaction", type=click.IntRange(min=1), default=1000, show_default=True
)
def delete_old_entries(
    older_than: datetime, dry_run: bool, yes: bool, users_per_transaction: int
) -> None:
    """Prune entries older than a UTC date, carrying each user's sum forward."""
    cutoff = older_than.replace(tzinfo=UTC)
    _ready()
    with session_scope() as session:
        estimate = ledger.count_old_entries(session, cutoff)
        users = ledger.users_with_old_entries(session, cutoff)
    if dry_run:
        _emit(estimate)
        return
    if not yes:
        click.confirm(
            f"Delete {estimate.deleted} ledger entries created before {cutoff.isoformat()} "
            f"of {users} users (each user's sum kept as one carried_forward entry)?",
            abort=True,
            err=True,
        )
    started = time.perf_counter()
    with click.progressbar(length=users, label="pruning", show_pos=True, file=sys.stderr) as bar:
        out = ledger.delete_old_entries_in_chunks(
            session_factory(), cutoff, users_per_transaction, progress=bar.update
        )
    send_completed("ledger.delete_old_entries", None, {}, out.model_dump(), _since(started))
    _emit(out)


# --- the scheduled side, for operators who need it now ---------------------------------------


@main.command()
@click.argument("user_id", callback=_user_id)
def eligibility(user_id: str) -> None:
    """Whether a user is due for renewal, and when next."""
    _run("renewals.check_eligibility", renewals.check_eligibility, user_id=user_id)


@main.command()
@click.argument("user_id", callback=_user_id)
def renew(user_id: str) -> None:
    """Renew one user now, if due (at most once per period)."""
    _run("renewals.renew_user", renewals.renew_user, user_id=user_id)


@main.command()
@click.option("--tier", default=None, callback=_checked(TierName), help="Only this tier.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=None, help="At most N.")
def due(tier: str | None, limit: int | None) -> None:
    """The users due for renewal now, due longest first."""
    _run("renewals.due", renewals.due, tier=tier, limit=limit)


@main.command()
@click.option("--tier", default=None, callback=_checked(TierName), help="Only this tier.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Renew at most N.")
@click.option("--dry-run", is_flag=True, help="Count what a sweep would do; change nothing.")
@click.option("--stop-on-error", is_flag=True, help="Stop at the first failed renewal.")
def sweep(tier: str | None, limit: int | None, dry_run: bool, stop_on_error: bool) -> None:
    """Run the renewal sweep now (one transaction per chunk; safe beside the scheduled one)."""
    _ready()
    started = time.perf_counter()
    with click.progressbar(length=1, label="renewing", show_pos=True, file=sys.stderr) as bar:

        def progress(users: int, planned: int) -> None:
            bar.length = max(planned, 1)
            bar.update(users)

        try:
            out = renewals.sweep(
                session_factory(),
                tier=tier,
                limit=limit,
                dry_run=dry_run,
                continue_on_error=not stop_on_error,
                progress=progress,
            )
        except DomainError as exc:
            _emit(Failure(error=exc.message, error_code=exc.code))
            raise SystemExit(1) from None
    send_completed(
        "renewals.sweep", None, {"tier": tier}, out.model_dump(mode="json"), _since(started)
    )
    _emit(out)
    if out.failed:
        raise SystemExit(1)


# --- is everything there ----------------------------------------------------------------------


@main.command()
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=2.0, show_default=True)
def doctor(timeout: float) -> None:
    """Check the database (reachable, migrated), broker, result backend, beat lock holder and
    workers, one line each; exit 1 if anything is wrong."""
    from worker.doctor import run_checks

    problems = 0
    for check in run_checks(timeout):
        click.echo(f"{check.status:<5} {check.name:<9} {check.detail}")
        problems += check.status == "FAIL"
    if problems:
        raise SystemExit(1)

"""``tokens``: the operator CLI. Every command runs the same domain functions as the tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from pydantic import BaseModel, TypeAdapter, ValidationError

from accounting import accounts, ledger, movements, renewals, reservations
from accounting.errors import DomainError
from models.schemas import MAX_AMOUNT, ExpireOut, Failure, IdempotencyKey, Reason, UserId
from worker.db import session_factory, session_scope
from worker.settings import get_settings

# The domain does not re-check what the task schemas check, so the CLI applies the same rules.
AMOUNT = click.IntRange(max=MAX_AMOUNT)


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


_user_id = _checked(UserId)


def _emit(model: BaseModel) -> None:
    click.echo(json.dumps(model.model_dump(mode="json"), indent=2))


def _run(action: Callable[..., BaseModel], *args: Any, **kwargs: Any) -> None:
    try:
        with session_scope() as session:
            out = action(session, *args, **kwargs)
    except DomainError as exc:
        _emit(Failure(error=exc.message, error_code=exc.code))
        raise SystemExit(1) from None
    _emit(out)


@click.group()
def main() -> None:
    """Operate the token ledger."""


@main.command()
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds to keep retrying while the database does not accept connections yet.",
)
def migrate(wait: float) -> None:
    """Apply the database migrations (safe to run again)."""
    from sqlalchemy.exc import OperationalError

    from worker.migrate import upgrade

    deadline = time.monotonic() + wait
    while True:
        try:
            upgrade()
            break
        except OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)
    click.echo(f"schema up to date on {_redacted(get_settings().db_url)}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@main.command()
@click.argument("user_id", callback=_user_id)
def balance(user_id: str) -> None:
    """Show a user's balance."""
    _run(accounts.get_balance, user_id)


@main.command("open-account")
@click.argument("user_id", callback=_user_id)
@click.option("--tier", default="Gift", show_default=True)
@click.option("--initial-balance", type=AMOUNT, default=0, show_default=True)
def open_account(user_id: str, tier: str, initial_balance: int) -> None:
    """Open an account (nothing changes if it exists)."""
    _run(accounts.open_account, user_id, tier=tier, initial_balance=initial_balance)


@main.command()
@click.argument("user_id", callback=_user_id)
@click.argument("amount", type=AMOUNT)
@click.option("--operation-type", default="purchase", show_default=True)
@click.option("--idempotency-key", default=None, callback=_checked(IdempotencyKey))
def credit(user_id: str, amount: int, operation_type: str, idempotency_key: str | None) -> None:
    """Credit tokens to a user."""
    _run(movements.credit, user_id, amount, operation_type, idempotency_key=idempotency_key)


@main.command("reset-balance")
@click.argument("user_id", callback=_user_id)
@click.argument("new_balance", type=AMOUNT)
@click.option("--reason", default=None, callback=_checked(Reason))
def reset_balance(user_id: str, new_balance: int, reason: str | None) -> None:
    """Set a balance, writing an adjustment entry of the difference."""
    _run(movements.reset_balance, user_id, new_balance, reason=reason)


@main.command()
@click.argument("user_id", callback=_user_id)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def history(user_id: str, limit: int) -> None:
    """A user's newest ledger entries."""
    _run(ledger.user_entries, user_id, limit=limit)


@main.command()
@click.option("--user-id", default=None, callback=_user_id, help="Check one user only.")
def reconcile(user_id: str | None) -> None:
    """List users whose balance differs from the sum of their ledger (exit 1 if any)."""
    with session_scope() as session:
        out = ledger.reconcile(session, user_id)
    _emit(out)
    if out.mismatches:
        raise SystemExit(1)


@main.command("delete-old-entries")
@click.argument("older_than", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]))
def delete_old_entries(older_than: datetime) -> None:
    """Prune entries older than a UTC date, carrying their sum forward."""
    from datetime import UTC

    _run(ledger.delete_old_entries, older_than.replace(tzinfo=UTC))


# --- the scheduled side, for operators who need it now ---------------------------------------


@main.command()
@click.argument("user_id", callback=_user_id)
def eligibility(user_id: str) -> None:
    """Whether a user is due for renewal, and when next."""
    _run(renewals.check_eligibility, user_id)


@main.command()
@click.argument("user_id", callback=_user_id)
def renew(user_id: str) -> None:
    """Renew one user now, if due (at most once per period)."""
    _run(renewals.renew_user, user_id)


@main.command()
@click.option("--tier", default=None, help="Only this tier.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Renew at most N.")
@click.option("--dry-run", is_flag=True, help="Count what a sweep would do; change nothing.")
@click.option("--stop-on-error", is_flag=True, help="Stop at the first failed renewal.")
def sweep(tier: str | None, limit: int | None, dry_run: bool, stop_on_error: bool) -> None:
    """Run the renewal sweep now (one transaction per chunk; safe beside the scheduled one)."""
    try:
        out = renewals.sweep(
            session_factory(),
            tier=tier,
            limit=limit,
            dry_run=dry_run,
            continue_on_error=not stop_on_error,
        )
    except DomainError as exc:
        _emit(Failure(error=exc.message, error_code=exc.code))
        raise SystemExit(1) from None
    _emit(out)
    if out.failed:
        raise SystemExit(1)


@main.command("expire-reservations")
def expire_reservations() -> None:
    """Release every reservation past its expiry now."""
    _emit(ExpireOut(expired=reservations.expire_all(session_factory())))

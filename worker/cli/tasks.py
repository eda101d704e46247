"""Commands that mirror tasks: each runs the domain function its task runs, with the task's
payload model as its parameters (worker/cli/generated.py). Positional arguments, a few option
spellings and defaults kept from earlier versions of the CLI are all that is said here."""

from __future__ import annotations

import click

from worker.cli.generated import Fields, mirror
from worker.cli.group import main

USER = ("user_id",)
USER_AMOUNT = ("user_id", "amount")


# --- accounts -------------------------------------------------------------------------------

mirror(
    main,
    "balance",
    "tokens.get_balance",
    "accounting.accounts:get_balance",
    "Show a user's balance (with --as-of, the balance fields as they were then).",
    Fields("BalanceIn", USER, helps={"as_of": "An instant (ISO 8601, UTC if no offset)."}),
)
mirror(
    main,
    "can-afford",
    "tokens.can_afford",
    "accounting.accounts:can_afford",
    "Whether a user can pay for an operation now, and what it costs.",
    Fields("CanAffordIn", ("user_id", "operation_type")),
)
mirror(
    main,
    "open-account",
    "tokens.open_account",
    "accounting.accounts:open_account",
    "Open an account (nothing changes if it exists); with --parent, a member of its pool.",
    Fields(
        "OpenAccountIn",
        USER,
        names={"parent_id": ("--parent", "--parent-id")},
        helps={"parent_id": "The account above it: it spends its pool's tokens."},
    ),
)
mirror(
    main,
    "set-tier",
    "tokens.set_tier",
    "accounting.accounts:set_tier",
    "Move a user to a tier (replaces the subscription's end).",
    Fields("SetTierIn", ("user_id", "tier")),
)
mirror(
    main,
    "grants",
    "tokens.grants",
    "accounting.grants:list_grants",
    "A user's grants, in burn order (then ended ones, newest first), and their debt.",
    Fields("GrantsIn", USER, names={"include_ended": ("--include-ended", "--all")}),
    # Earlier versions printed a table unless --json: the output is JSON now, the flag a no-op.
    params=[click.Option(["--json", "as_json"], is_flag=True, hidden=True)],
)

mirror(
    main,
    "limits",
    "tokens.limits",
    "accounting.limits:limits",
    "Every spend limit that applies to an account (its own, then those above it), with use.",
    Fields("UserIn", USER),
)
mirror(
    main,
    "set-limit",
    "tokens.set_limit",
    "accounting.limits:set_limit",
    "Cap what an account and the accounts below it spend per window (no --max-tokens: remove).",
    Fields(
        "SetLimitIn",
        ("user_id", "name"),
        helps={
            "max_tokens": "At most this many tokens per window; without it the limit goes.",
            "period": "minute, hour, day, week or month (UTC calendar windows, weeks from Monday).",
            "rolling": "The last 60 s, 1 h, 24 h, 7 days or 30 days instead of the calendar's.",
        },
    ),
)

# --- movements ------------------------------------------------------------------------------

mirror(
    main,
    "debit",
    "tokens.debit",
    "accounting.movements:debit",
    "Debit tokens from a user.",
    Fields("DebitIn", USER_AMOUNT),
)
mirror(
    main,
    "credit",
    "tokens.credit",
    "accounting.movements:credit",
    "Credit tokens to a user, as a new purchased (or promo) grant.",
    Fields("CreditIn", USER_AMOUNT),
)
mirror(
    main,
    "charge",
    "tokens.charge",
    "accounting.movements:charge",
    "Charge a user the price of an operation.",
    Fields("ChargeIn", ("user_id", "operation_type")),
)
mirror(
    main,
    "refund",
    "tokens.refund",
    "accounting.movements:refund",
    "Refund tokens to a user.",
    Fields("RefundIn", USER_AMOUNT),
)
mirror(
    main,
    "reset-balance",
    "tokens.reset_balance",
    "accounting.movements:reset_balance",
    "Set a balance, writing an adjustment entry of the difference.",
    Fields("ResetBalanceIn", ("user_id", "new_balance")),
)

# --- reservations ---------------------------------------------------------------------------

mirror(
    main,
    "reserve",
    "tokens.reserve",
    "accounting.reservations:reserve",
    "Hold tokens (give --amount or --operation-type) until captured, released or expired.",
    Fields(
        "ReserveIn",
        USER,
        helps={"amount": "Tokens to hold...", "operation_type": "...or its price."},
    ),
)
mirror(
    main,
    "extend",
    "tokens.extend",
    "accounting.reservations:extend",
    "Hold more of a reservation and/or keep it alive longer (at most 7 days in all).",
    Fields("ExtendIn", ("reservation_id",), helps={"amount": "Tokens to add."}),
)
mirror(
    main,
    "capture",
    "tokens.capture",
    "accounting.reservations:capture",
    "Debit (part of) a reservation and release the rest.",
    Fields("CaptureIn", ("reservation_id",), helps={"amount": "Default: all of it."}),
)
mirror(
    main,
    "release",
    "tokens.release",
    "accounting.reservations:release",
    "Release a reservation's hold.",
    Fields("ReleaseIn", ("reservation_id",)),
)

# --- the ledger -----------------------------------------------------------------------------

mirror(
    main,
    "history",
    "ledger.user_entries",
    "accounting.ledger:user_entries",
    "A user's newest ledger entries.",
    Fields("UserEntriesIn", USER, defaults={"limit": 20}),
)
mirror(
    main,
    "stats",
    "ledger.statistics",
    "accounting.ledger:statistics",
    "A user's totals spent and earned, and counts by operation type, over a period.",
    Fields("UserPeriodIn", USER),
)

# --- renewals -------------------------------------------------------------------------------

mirror(
    main,
    "eligibility",
    "renewals.check_eligibility",
    "accounting.renewals:check_eligibility",
    "Whether a user is due for renewal, and when next.",
    Fields("UserIn", USER),
)
mirror(
    main,
    "renew",
    "renewals.renew_user",
    "accounting.renewals:renew_user",
    "Renew one user now, if due (at most once per period).",
    Fields("UserIn", USER),
)
mirror(
    main,
    "due",
    "renewals.due",
    "accounting.renewals:due",
    "The users due for renewal now, due longest first.",
    Fields("DueIn", helps={"tier": "Only this tier."}),
)

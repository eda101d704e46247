"""accounting/accounts.py over a real PostgreSQL session."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from accounting import accounts
from accounting.errors import DomainError
from models.tables import LedgerEntry
from tests.support import assert_ledger_consistent, refused

PLUS_TWO = timezone(timedelta(hours=2))


def entries(session: Session, user_id: str) -> list[LedgerEntry]:
    return list(
        session.scalars(
            select(LedgerEntry).where(LedgerEntry.user_id == user_id).order_by(LedgerEntry.id)
        )
    )


def code_and_message(err: DomainError) -> tuple[str, str]:
    return err.code, err.message


def test_open_account_creates_with_defaults(session: Session) -> None:
    out = accounts.open_account(session, "u1")
    session.commit()
    assert out.model_dump() == {
        "success": True,
        "user_id": "u1",
        "tokens_balance": 0,
        "tokens_reserved": 0,
        "tokens_available": 0,
        "tokens_spent": 0,
        "tier": "Gift",
        "last_renewal_at": None,
        "subscription_expires_at": None,
        "by_kind": {},
        "debt": 0,
        "next_expiry": None,
        # v1.2: both null for a pool, which every account outside a tree is
        "pool_id": None,
        "parent_id": None,
        "created": True,
    }
    assert entries(session, "u1") == []  # a zero initial balance writes no entry


def test_initial_balance_is_one_adjustment_entry(session: Session) -> None:
    out = accounts.open_account(session, "u1", tier="Professional", initial_balance=250)
    session.commit()
    assert (out.created, out.tokens_balance, out.tokens_available, out.tier) == (
        True,
        250,
        250,
        "Professional",
    )
    [entry] = entries(session, "u1")
    assert (
        entry.kind,
        entry.operation_type,
        entry.tokens_amount,
        entry.balance_before,
        entry.balance_after,
    ) == ("adjustment", "adjustment", 250, 0, 250)
    assert entry.created_at.utcoffset() == timedelta(0)
    assert_ledger_consistent(session)


def test_existing_account_is_returned_unchanged(session: Session) -> None:
    expires = datetime(2027, 1, 1, tzinfo=UTC)
    accounts.open_account(
        session, "u1", tier="Business", initial_balance=40, subscription_expires_at=expires
    )
    session.commit()
    again = accounts.open_account(session, "u1", tier="Gift", initial_balance=999)
    session.commit()
    assert again.model_dump() == {
        "success": True,
        "user_id": "u1",
        "tokens_balance": 40,
        "tokens_reserved": 0,
        "tokens_available": 40,
        "tokens_spent": 0,
        "tier": "Business",
        "last_renewal_at": None,
        "subscription_expires_at": expires,
        "by_kind": {"adjustment": 40},
        "debt": 0,
        "next_expiry": None,
        # v1.2: both null for a pool, which every account outside a tree is
        "pool_id": None,
        "parent_id": None,
        "created": False,
    }
    assert [e.tokens_amount for e in entries(session, "u1")] == [40]
    assert_ledger_consistent(session)


def test_negative_initial_balance_is_refused(session: Session) -> None:
    err = refused(session, accounts.open_account, "u1", initial_balance=-1)
    assert code_and_message(err) == ("NEGATIVE_BALANCE", "Balance cannot be negative")
    assert code_and_message(refused(session, accounts.get_balance, "u1")) == (
        "USER_NOT_FOUND",
        "User not found",
    )


def test_unknown_tier_is_a_validation_error_naming_tier(session: Session) -> None:
    err = refused(session, accounts.open_account, "u1", tier="Platinum")
    assert err.code == "VALIDATION_ERROR"
    assert err.message.startswith("tier: ")
    assert "Platinum" in err.message
    assert refused(session, accounts.get_balance, "u1").code == "USER_NOT_FOUND"


def test_dates_are_stored_utc_aware(session: Session) -> None:
    renewed = datetime(2026, 3, 1, 9, 30, tzinfo=PLUS_TWO)
    expires = datetime(2026, 12, 31, 23, 0, tzinfo=PLUS_TWO)
    out = accounts.open_account(
        session, "u1", last_renewal_at=renewed, subscription_expires_at=expires
    )
    session.commit()
    assert out.last_renewal_at == datetime(2026, 3, 1, 7, 30, tzinfo=UTC)
    assert out.subscription_expires_at == datetime(2026, 12, 31, 21, 0, tzinfo=UTC)
    session.expunge_all()
    read = accounts.get_balance(session, "u1")
    assert read.last_renewal_at is not None and read.subscription_expires_at is not None
    assert read.last_renewal_at.utcoffset() == timedelta(0)
    assert read.subscription_expires_at.utcoffset() == timedelta(0)
    assert (read.last_renewal_at, read.subscription_expires_at) == (renewed, expires)
    # What PostgreSQL holds is the same instant, in UTC.
    raw = session.execute(
        text(
            "SELECT to_char(last_renewal_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM accounts"
        )
    ).scalar_one()
    assert raw == "2026-03-01 07:30"
    assert read.model_dump(mode="json")["last_renewal_at"] == "2026-03-01T07:30:00+00:00"


def test_set_tier(session: Session) -> None:
    accounts.open_account(session, "u1", initial_balance=5)
    session.commit()
    expires = datetime(2027, 6, 1, 12, tzinfo=PLUS_TWO)
    out = accounts.set_tier(session, "u1", "Professional", subscription_expires_at=expires)
    session.commit()
    assert (out.tier, out.subscription_expires_at, out.tokens_balance) == (
        "Professional",
        datetime(2027, 6, 1, 10, tzinfo=UTC),
        5,
    )
    # None means "never expires": it replaces the old date.
    out = accounts.set_tier(session, "u1", "Business")
    session.commit()
    assert (out.tier, out.subscription_expires_at) == ("Business", None)
    assert accounts.get_balance(session, "u1").tier == "Business"
    assert [e.tokens_amount for e in entries(session, "u1")] == [5]


def test_set_tier_refusals(session: Session) -> None:
    accounts.open_account(session, "u1")
    session.commit()
    err = refused(session, accounts.set_tier, "u1", "Platinum")
    assert err.code == "VALIDATION_ERROR" and err.message.startswith("tier: ")
    assert accounts.get_balance(session, "u1").tier == "Gift"
    assert code_and_message(refused(session, accounts.set_tier, "ghost", "Business")) == (
        "USER_NOT_FOUND",
        "User not found",
    )


def test_get_balance_subtracts_reserved(session: Session) -> None:
    renewed = datetime(2026, 2, 1, tzinfo=UTC)
    accounts.open_account(session, "u1", initial_balance=100, last_renewal_at=renewed)
    session.execute(text("UPDATE accounts SET tokens_reserved = 30, tokens_spent = 7"))
    session.commit()
    assert accounts.get_balance(session, "u1").model_dump() == {
        "success": True,
        "user_id": "u1",
        "tokens_balance": 100,
        "tokens_reserved": 30,
        "tokens_available": 70,
        "tokens_spent": 7,
        "tier": "Gift",
        "last_renewal_at": renewed,
        "subscription_expires_at": None,
        "by_kind": {"adjustment": 100},
        "debt": 0,
        "next_expiry": None,
        # v1.2: both null for a pool, which every account outside a tree is
        "pool_id": None,
        "parent_id": None,
    }
    assert code_and_message(refused(session, accounts.get_balance, "ghost")) == (
        "USER_NOT_FOUND",
        "User not found",
    )


def test_user_ids_match_exactly(session: Session) -> None:
    accounts.open_account(session, "User", initial_balance=1)
    session.commit()
    assert refused(session, accounts.get_balance, "user").code == "USER_NOT_FOUND"
    assert refused(session, accounts.get_balance, "User ").code == "USER_NOT_FOUND"


def test_can_afford(session: Session) -> None:
    accounts.open_account(session, "u1", initial_balance=12)
    session.execute(text("UPDATE accounts SET tokens_reserved = 5"))
    session.commit()
    # Available is 7: a 5-token message fits, a 10-token image does not.
    assert accounts.can_afford(session, "u1", "chatgpt_message").model_dump() == {
        "success": True,
        "can_afford": True,
        "cost": 5,
        "balance": 7,
        "deficit": 0,
    }
    assert accounts.can_afford(session, "u1", "image_generation").model_dump() == {
        "success": True,
        "can_afford": False,
        "cost": 10,
        "balance": 7,
        "deficit": 3,
    }
    free = accounts.can_afford(session, "u1", "refund")
    assert (free.can_afford, free.cost, free.deficit) == (True, 0, 0)


def test_can_afford_exactly_the_available_amount(session: Session) -> None:
    accounts.open_account(session, "u1", initial_balance=10)
    session.commit()
    out = accounts.can_afford(session, "u1", "image_generation")
    assert (out.can_afford, out.balance, out.deficit) == (True, 10, 0)


def test_can_afford_refusals(session: Session) -> None:
    accounts.open_account(session, "u1", initial_balance=10)
    session.commit()
    assert code_and_message(refused(session, accounts.can_afford, "u1", "teleport")) == (
        "UNKNOWN_OPERATION_TYPE",
        "Unknown operation type: teleport",
    )
    assert code_and_message(refused(session, accounts.can_afford, "ghost", "chatgpt_message")) == (
        "USER_NOT_FOUND",
        "User not found",
    )


# --- balances as of an instant (contract v1.2) --------------------------------------------------


def _at(session: Session, sql: str, **params: object) -> datetime:
    moment = session.execute(text(sql), params).scalar_one()
    assert isinstance(moment, datetime)
    return moment


def _then(session: Session, user_id: str, at: datetime) -> tuple[int, int, int, int]:
    out = accounts.get_balance(session, user_id, as_of=at)
    assert out.as_of == at
    return out.tokens_balance, out.tokens_reserved, out.tokens_available, out.tokens_spent


def test_a_balance_as_of_any_instant_is_what_the_ledger_and_holds_said_then(
    session: Session,
) -> None:
    from accounting import movements, reservations

    accounts.open_account(session, "u", initial_balance=100)
    movements.debit(session, "u", 30, "image_generation")
    hold = reservations.reserve(session, "u", 20)
    reservations.capture(session, hold.reservation_id, 15)
    movements.credit(session, "u", 50)
    session.commit()
    times = list(
        session.execute(
            text("SELECT created_at FROM ledger_entries WHERE user_id = 'u' ORDER BY id")
        ).scalars()
    )
    held_at = _at(session, "SELECT created_at FROM reservations WHERE user_id = 'u'")
    tick = timedelta(microseconds=1)
    assert _then(session, "u", times[0] - tick) == (0, 0, 0, 0)  # before the account's first entry
    assert _then(session, "u", times[0]) == (100, 0, 100, 0)
    assert _then(session, "u", times[1]) == (70, 0, 70, 30)
    assert _then(session, "u", held_at) == (70, 20, 50, 30)
    assert _then(session, "u", times[2] - tick) == (70, 20, 50, 30)
    assert _then(session, "u", times[2]) == (55, 0, 55, 45)  # the capture replaced the hold
    assert _then(session, "u", times[3]) == (105, 0, 105, 45)
    now = accounts.get_balance(session, "u")
    assert "as_of" not in now.model_dump(mode="json")  # only when asked
    assert _then(session, "u", times[3] + timedelta(days=1)) == (105, 0, 105, 45)


def test_a_member_as_of_reads_its_pool_and_its_own_spend(session: Session) -> None:
    from accounting import movements

    accounts.open_account(session, "pool", initial_balance=100)
    accounts.open_account(session, "m", parent_id="pool")
    movements.debit(session, "m", 10, "image_generation")
    movements.debit(session, "pool", 5, "image_generation")
    session.commit()
    first, mine, pools = session.execute(
        text("SELECT created_at FROM ledger_entries WHERE user_id = 'pool' ORDER BY id")
    ).scalars()
    assert _then(session, "m", mine) == (90, 0, 90, 10)
    assert _then(session, "m", pools) == (85, 0, 85, 10)
    assert _then(session, "pool", pools) == (85, 0, 85, 15)  # a pool counts its tree
    assert _then(session, "m", first) == (100, 0, 100, 0)


def test_as_of_before_a_prune_is_refused(session: Session) -> None:
    from accounting import ledger, movements

    accounts.open_account(session, "u", initial_balance=100)
    movements.debit(session, "u", 30, "image_generation")
    session.commit()
    last = _at(session, "SELECT max(created_at) FROM ledger_entries WHERE user_id = 'u'")
    ledger.delete_old_entries(session, last + timedelta(microseconds=1))
    session.commit()
    assert _then(session, "u", last) == (70, 0, 70, 30)  # the checkpoint stands for them
    error = refused(session, accounts.get_balance, "u", as_of=last - timedelta(seconds=1))
    assert error.code == "VALIDATION_ERROR"
    assert error.message == f"History before {last.isoformat()} was pruned"
    assert refused(session, accounts.get_balance, "nobody", as_of=last).code == "USER_NOT_FOUND"

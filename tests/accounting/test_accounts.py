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

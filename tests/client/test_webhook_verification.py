"""verify_webhook: a receiver's one check of a Tokens-Signature header."""

from __future__ import annotations

import hashlib
import hmac

from token_worker_client.events import signature_header, verify_webhook

BODY = b'{"event_id":"1","type":"balance.low","user_id":"u","seq":1,"at":"x","data":{}}'
NOW = 1_800_000_000


def header(secret: str = "s", t: int = NOW, body: bytes = BODY) -> str:
    # Written out as the contract says, not through the helper under test.
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def test_a_signature_as_the_contract_defines_it_verifies() -> None:
    assert verify_webhook(BODY, header(), "s", now=NOW)
    assert signature_header("s", BODY, NOW) == header()


def test_a_changed_body_another_secret_or_no_header_fail() -> None:
    assert not verify_webhook(BODY + b" ", header(), "s", now=NOW)
    assert not verify_webhook(BODY, header(secret="other"), "s", now=NOW)
    assert not verify_webhook(BODY, None, "s", now=NOW)
    assert not verify_webhook(BODY, "garbage", "s", now=NOW)
    assert not verify_webhook(BODY, f"t={NOW}", "s", now=NOW)


def test_a_signature_outside_the_tolerance_fails() -> None:
    assert verify_webhook(BODY, header(t=NOW - 299), "s", now=NOW)
    assert not verify_webhook(BODY, header(t=NOW - 301), "s", now=NOW)
    assert not verify_webhook(BODY, header(t=NOW + 301), "s", now=NOW)
    assert verify_webhook(BODY, header(t=NOW - 3000), "s", tolerance=3600, now=NOW)


def test_any_v1_may_match_while_a_secret_is_rotated() -> None:
    old = header(secret="old").split(",")[1]
    assert verify_webhook(BODY, f"{header(secret='new')},{old}", "old", now=NOW)

"""worker/producers.py: TOKENS_PRODUCERS read strictly, and the signature check (the end-to-end
tests with a real worker are in test_producers_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from kombu import Connection  # type: ignore[attr-defined]
from kombu.messaging import Producer as KombuProducer

from tests.support import ROOT
from token_worker_client.signing import HEADER, signature
from worker.poison import MessageCheck
from worker.producers import Denial, ProducerConfig, Producers, unmatched_patterns
from worker.settings import Settings, describe

KEY, OLD = "k" * 32, "o" * 32
CONFIG = {
    "worker": {"key": "w" * 32, "tasks": ["*"]},
    "web": {"keys": [KEY, OLD], "tasks": ["tokens.debit", "tokens.get_*"]},
}
BODY = b'[[], {"user_id": "u", "amount": 1, "operation_type": "image_generation"}, {}]'


def producers(config: dict[str, Any] = CONFIG) -> Producers:
    return Producers({n: ProducerConfig.model_validate(c) for n, c in config.items()})


def signed(name: str, key: str, body: bytes = BODY) -> dict[str, Any]:
    return {HEADER: f"{name}:{signature(key.encode(), body)}"}


@pytest.mark.parametrize(
    ("headers", "task", "denial"),
    [
        (signed("web", KEY), "tokens.debit", None),
        (signed("web", OLD), "tokens.debit", None),  # the second key, while rotating
        (signed("web", KEY), "tokens.get_balance", None),  # tokens.get_*
        (signed("worker", "w" * 32), "tokens.reset_balance", None),
        (signed("web", KEY), "tokens.credit", Denial("web", "web may not send tokens.credit")),
        (signed("web", KEY), "tokens.get", Denial("web", "web may not send tokens.get")),
        ({}, "tokens.debit", Denial(None, f"no {HEADER} header")),
        ({HEADER: ["web", "x"]}, "tokens.debit", Denial(None, f"{HEADER}: not a string")),
        (
            {HEADER: signature(KEY.encode(), BODY)},  # no name
            "tokens.debit",
            Denial(None, f"{HEADER}: names no producer this worker knows"),
        ),
        (
            signed("mallory", KEY),
            "tokens.debit",
            Denial(None, f"{HEADER}: names no producer this worker knows"),
        ),
        (
            signed("web", "x" * 32),
            "tokens.debit",
            Denial("web", f"{HEADER}: the signature matches no key of web"),
        ),
        (
            signed("web", KEY, BODY + b" "),  # another body
            "tokens.debit",
            Denial("web", f"{HEADER}: the signature matches no key of web"),
        ),
        (
            {HEADER: "web:" + signature(KEY.encode(), BODY).upper()},  # lowercase hex only
            "tokens.debit",
            Denial("web", f"{HEADER}: the signature matches no key of web"),
        ),
        (
            {HEADER: "web:é"},  # not ASCII: compared as bytes, no TypeError
            "tokens.debit",
            Denial("web", f"{HEADER}: the signature matches no key of web"),
        ),
    ],
)
def test_check(headers: dict[str, Any], task: str, denial: Denial | None) -> None:
    assert producers().check(headers, task, BODY) == denial


def test_the_worker_signs_with_its_first_key() -> None:
    signer = producers().signer("web")
    assert signer.header(BODY) == signed("web", KEY)[HEADER]


class Message:
    """What MessageCheck.problem reads of a kombu message."""

    content_type = "application/json"

    def __init__(self, headers: dict[str, Any], body: bytes = BODY) -> None:
        self.headers = {"id": "t1", "task": "tokens.debit", **headers}
        self.body = body

    def decode(self) -> Any:
        return json.loads(self.body)


def test_the_message_check_refuses_before_decoding() -> None:
    check = MessageCheck(32, 1 << 20, 300, producers())
    refusal = check.problem(Message({}, b"not json at all"), ("tokens.debit",))
    assert refusal is not None
    assert (refusal.reason, refusal.code, refusal.producer) == (
        "unauthorized",
        "UNAUTHORIZED",
        None,
    )
    assert refusal.result.model_dump() == {
        "success": False,
        "error": "Unsigned message",
        "error_code": "UNAUTHORIZED",
    }
    forged = check.problem(Message(signed("web", "x" * 32)), ("tokens.debit",))
    assert forged is not None and forged.result.error == "Producer web may not send tokens.debit"
    assert check.problem(Message(signed("web", KEY)), ("tokens.debit",)) is None
    # Off: nothing is asked of the headers.
    assert MessageCheck(32, 1 << 20, 300).problem(Message({}), ("tokens.debit",)) is None


def test_what_kombu_sends_is_what_is_checked() -> None:
    """A body published with the signer's header arrives with a signature the check accepts
    (kombu's in-memory transport: the bytes a consumer gets)."""
    with Connection("memory://") as conn:  # type: ignore[no-untyped-call]
        queue = conn.SimpleQueue("signed")
        body = '[[], {"user_id": "é"}, {}]'
        KombuProducer(conn.default_channel).publish(  # type: ignore[no-untyped-call]
            body.encode(),
            routing_key="signed",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"id": "t1", "task": "tokens.debit", **signed("web", KEY, body.encode())},
        )
        message = queue.get(timeout=1)
        assert producers().check(message.headers, "tokens.debit", message.body) is None


# --- the setting -----------------------------------------------------------------------------


def settings_error(value: Any, **env: str) -> str:
    raw = value if isinstance(value, str) else json.dumps(value)
    try:
        Settings(producers=raw, **env)  # type: ignore[arg-type]
    except Exception as exc:
        return describe(exc)  # type: ignore[arg-type]
    raise AssertionError("accepted")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("{", "TOKENS_PRODUCERS: not valid JSON"),
        ([], "TOKENS_PRODUCERS: Input should be a valid dictionary"),
        ({"web": {"key": KEY, "tasks": ["*"]}}, "no entry for 'worker' (TOKENS_PRODUCER_NAME)"),
        ({"worker": {"key": KEY, "tasks": ["tokens.*"]}}, 'must have "tasks": ["*"]'),
        ({"worker": {"key": "short", "tasks": ["*"]}}, "a key must be at least 32 characters"),
        ({"worker": {"key": KEY, "keys": [KEY], "tasks": ["*"]}}, 'give either "key" or "keys"'),
        ({"worker": {"tasks": ["*"]}}, 'give either "key" or "keys"'),
        ({"worker": {"keys": [], "tasks": ["*"]}}, "worker.keys: List should have at least 1 item"),
        ({"worker": {"key": KEY, "tasks": []}}, "worker.tasks: List should have at least 1 item"),
        ({"worker": {"key": KEY, "tasks": ["*.debit"]}}, "worker.tasks: '*.debit' is not a"),
        ({"worker": {"key": KEY, "tasks": ["*"], "task": ["x"]}}, "worker.task: Extra inputs"),
        ({"worker": {"key": 7, "tasks": ["*"]}}, "worker.key: Input should be a valid string"),
        ({"worker": {"key": KEY, "tasks": "*"}}, "worker.tasks: Input should be a valid list"),
        (
            {"worker": {"key": KEY, "tasks": ["*"]}, "a:b": {"key": KEY, "tasks": ["*"]}},
            "TOKENS_PRODUCERS: 'a:b' is not a name",
        ),
    ],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_it(value: Any, error: str) -> None:
    message = settings_error(value)
    assert error in message and "\n" not in message
    assert KEY not in message


def test_the_workers_own_name_is_a_setting() -> None:
    value = json.dumps({"tokens-worker": {"key": KEY, "tasks": ["*"]}})
    assert Settings(producers=value, producer_name="tokens-worker").producers is not None
    assert "no entry for 'worker'" in settings_error(value)


def test_off_by_default_and_keys_never_shown() -> None:
    assert Settings().producers is None
    shown = repr(Settings(producers=json.dumps(CONFIG)))
    assert KEY not in shown and OLD not in shown


def test_patterns_matching_no_task_are_named() -> None:
    config = {n: ProducerConfig.model_validate(c) for n, c in CONFIG.items()}
    assert unmatched_patterns(config, ["tokens.debit", "tokens.get_balance"]) == []
    assert unmatched_patterns(config, ["tokens.debit"]) == [
        "TOKENS_PRODUCERS: web: 'tokens.get_*' matches no task"
    ]


def test_a_worker_refuses_to_start_on_a_bad_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"],
        cwd=ROOT,
        env={"TOKENS_PRODUCERS": '{"web": {"key": "short", "tasks": ["*"]}}', "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "configuration error: TOKENS_PRODUCERS web: a key must be at least 32 characters"
        " (e.g. the output of `openssl rand -hex 32`)"
    ]

"""Producers allowed to move money (contract v1.2): ``TOKENS_PRODUCERS``, and the check of every
message against it.

Off unless ``TOKENS_PRODUCERS`` is set. Then every message a worker takes must carry the header
``tokens-signature: NAME:HEX``, HEX the lowercase HMAC-SHA256 of the body bytes as sent under one
of NAME's keys, for a task NAME's patterns allow. The check runs where the body arrives
(``worker.poison.MessageCheck.problem``: the task consumer and the coalescer), after the headers
are known to be usable and before the body is decoded; what fails is refused there, as a poison
message is, with ``UNAUTHORIZED`` as its result.

What a refused message's result says (``accounting.errors.unauthorized``):

- ``Producer NAME may not send TASK`` when the header names a producer of the setting: its
  signature matched none of NAME's keys (forged, or signed with a retired key), or it did and
  NAME may not send TASK. Only the log line tells the two apart: the result does not confirm to
  whoever sent it whether the signature or the task was wrong;
- ``Unsigned message`` otherwise: no header, one that is not ``NAME:HEX``, or a NAME the setting
  does not have (no producer can be named).

The worker signs what it publishes itself (beat, a sweep's fan-out, a task's retries) as
``TOKENS_PRODUCER_NAME`` (default ``worker``), with the first key of that entry, which must allow
every task: a retry re-sends whatever task failed transiently.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from token_worker_client.signing import HEADER, Signer, signature

#: A producer's name: it precedes the ``:`` of the header, so it holds none.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A task pattern: a task name, or a prefix followed by ``*`` (``*`` alone: every task).
PATTERN = re.compile(r"[A-Za-z0-9_.:-]*\*?")
MIN_KEY_CHARS = 32
MAX_KEYS = 4
#: The metric label of a producer that cannot be named (unknown names collapse into it).
UNKNOWN = "unknown"


class ProducerConfig(BaseModel):
    """One producer of ``TOKENS_PRODUCERS``: ``{"key": "…", "tasks": ["tokens.get_*"]}``, or
    ``"keys": ["new", "old"]`` while rotating (the first signs, every one verifies)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    key: SecretStr | None = None
    keys: list[SecretStr] | None = Field(default=None, min_length=1, max_length=MAX_KEYS)
    tasks: list[str] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _patterns(cls, tasks: list[str]) -> list[str]:
        for pattern in tasks:
            if not pattern or not PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"{pattern!r} is not a task name or a prefix ending in * (* only at the end)"
                )
        return tasks

    @model_validator(mode="after")
    def _one_way_to_give_keys(self) -> ProducerConfig:
        if (self.key is None) == (self.keys is None):
            raise ValueError('give either "key" or "keys" (a list while rotating), not both')
        for key in self.secrets:
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(
                    f"a key must be at least {MIN_KEY_CHARS} characters "
                    "(e.g. the output of `openssl rand -hex 32`)"
                )
        return self

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every key, the signing one first."""
        given = [self.key] if self.key is not None else self.keys or []
        return tuple(k.get_secret_value() for k in given)

    def allows(self, task: str) -> bool:
        return any(matches(pattern, task) for pattern in self.tasks)


def matches(pattern: str, task: str) -> bool:
    """``tokens.get_*`` matches every task name that starts ``tokens.get_``; ``*`` every one."""
    return task.startswith(pattern[:-1]) if pattern.endswith("*") else task == pattern


def setting_problem(producers: Mapping[str, ProducerConfig], own: str) -> str | None:
    """What is wrong with ``TOKENS_PRODUCERS`` as a whole, given the worker's own producer name
    (``TOKENS_PRODUCER_NAME``), if anything."""
    for name in producers:
        if not NAME.fullmatch(name):
            return f"TOKENS_PRODUCERS: {name!r} is not a name (letters, digits, _ . -; 1-64)"
    mine = producers.get(own)
    if mine is None:
        return (
            f"TOKENS_PRODUCERS: no entry for {own!r} (TOKENS_PRODUCER_NAME), the producer the "
            "worker signs its own messages as (beat, fan-out, retries)"
        )
    if "*" not in mine.tasks:
        return (
            f'TOKENS_PRODUCERS: {own!r} (TOKENS_PRODUCER_NAME) must have "tasks": ["*"]: '
            "the worker re-sends any task it retries"
        )
    return None


def unmatched_patterns(
    producers: Mapping[str, ProducerConfig], tasks: Collection[str]
) -> list[str]:
    """Patterns that match no registered task (a typo denies quietly): checked at start-up."""
    return [
        f"TOKENS_PRODUCERS: {name}: {pattern!r} matches no task"
        for name, config in producers.items()
        for pattern in config.tasks
        if not any(matches(pattern, task) for task in tasks)
    ]


@dataclass(frozen=True)
class Denial:
    """Why a message was refused: ``producer`` is the producer named (None when none can be),
    ``why`` says which check failed (for the log line only)."""

    producer: str | None
    why: str


class Producers:
    """The check of ``TOKENS_PRODUCERS``, built once per consumer."""

    def __init__(self, config: Mapping[str, ProducerConfig]) -> None:
        self.config = dict(config)
        self.keys = {
            name: tuple(key.encode() for key in producer.secrets)
            for name, producer in config.items()
        }
        self.allows = cache(self._allows)  # (producer, task) pairs: both bounded

    def _allows(self, name: str, task: str) -> bool:
        return self.config[name].allows(task)

    def signer(self, name: str) -> Signer:
        """How the worker signs as ``name`` (its first key)."""
        return Signer(name, self.keys[name][0])

    def check(self, headers: Mapping[str, Any], task: str, body: bytes) -> Denial | None:
        """Why the message with these headers and serialized ``body`` may not run ``task``, if
        it may not."""
        value = headers.get(HEADER)
        if value is None:
            return Denial(None, f"no {HEADER} header")
        if not isinstance(value, str):
            return Denial(None, f"{HEADER}: not a string")
        name, colon, given = value.partition(":")
        keys = self.keys.get(name)
        if not colon or keys is None:
            return Denial(None, f"{HEADER}: names no producer this worker knows")
        offered = given.encode()
        # Every key is tried, so the time taken does not tell which one came close.
        matched = [hmac.compare_digest(signature(key, body).encode(), offered) for key in keys]
        if not any(matched):
            return Denial(name, f"{HEADER}: the signature matches no key of {name}")
        if not self.allows(name, task):
            return Denial(name, f"{name} may not send {task}")
        return None

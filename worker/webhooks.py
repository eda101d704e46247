"""Delivering events as signed webhooks: one POST, and the backoff between attempts."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from datetime import timedelta

from token_worker_client.events import SIGNATURE_HEADER, EventOut, signature_header


def body(event: EventOut) -> bytes:
    """The JSON object POSTed: ``event_id, type, user_id, seq, at, data``."""
    return json.dumps(
        event.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False
    ).encode()


def post(url: str, secret: str, event: EventOut, timeout: float) -> str | None:
    """POST ``event``; None when the endpoint answered 2xx, else why not (one line)."""
    payload = body(event)
    request = urllib.request.Request(
        url,
        data=payload,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "tokens-worker",
            SIGNATURE_HEADER: signature_header(secret, payload),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status = int(answer.status)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # refused, reset, timed out, a bad answer
        return f"{type(exc).__name__}: {exc}"[:1000]
    return None if 200 <= status < 300 else f"HTTP {status}"


def backoff(attempts: int, longest: float) -> timedelta:
    """The wait before the next attempt after ``attempts`` failed ones: 1 s, 2 s, 4 s … up to
    ``longest``, less up to a quarter at random (endpoints that failed together retry apart)."""
    wait = min(longest, 2.0 ** max(0, attempts - 1))
    return timedelta(seconds=wait * random.uniform(0.75, 1.0))

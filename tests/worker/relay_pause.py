"""Loaded into a worker (``-I tests.worker.relay_pause``): its relay stops between publishing a
page of events and recording it, as a relay killed at that moment would, and says so in the
file ``TOKENS_TEST_RELAY_PAUSED`` names."""

from __future__ import annotations

import os
import time
from pathlib import Path

import worker.relay


def _pause(pos: int) -> None:
    Path(os.environ["TOKENS_TEST_RELAY_PAUSED"]).write_text(str(pos))
    time.sleep(3600)


worker.relay._after_publish = _pause

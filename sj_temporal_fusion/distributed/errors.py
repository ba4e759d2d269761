"""How long a wait of time sharding may take, and what it raises when a peer does not answer."""
from __future__ import annotations

import datetime
import os

DEFAULT_TIMEOUT = float(os.environ.get("SJ_TF_SHARD_TIMEOUT", "300"))


class TimeShardingError(RuntimeError):
    """A peer of the time group died, stalled, or disagreed about shapes or layers."""


def as_timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The worker's own retry policy for Graph's invite, which is not idempotent.

Pure decisions: whether an error is worth another attempt, and after how long. What is
transient:

- 429, 500, 502, 503, 504 and 509 answers: Graph's Retry-After is honoured when given,
  otherwise exponential backoff with full jitter;
- `GraphUnreachable`: the request never left, so another attempt cannot duplicate it;
- `TokenUnavailable` when Entra ID could not be reached.

`GraphNoAnswer` (sent, then a timeout or a reset) is ambiguous: Graph may have rung the
person already. By default it is final, so the worker never rings anyone twice on a
guess, and the outcome says `graph_no_answer` so the upstream system, which knows whether
the call still needs the person, decides. `RETRY_AMBIGUOUS=true` retries it instead.

Other 4xx answers are final. A 401 is handled before this policy: the handler refreshes the
tenant's token once and tries once more.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from worker.core.errors import (
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    InviteError,
    TokenUnavailable,
)

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504, 509})
#: A Retry-After larger than this is treated as this: a broken header must not park a
#: command for days.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    """Graph requests per command, the first included."""
    max_elapsed: float = 120.0
    """Seconds from the command's first delivery after which no attempt starts."""
    base_delay: float = 0.5
    max_delay: float = 30.0
    in_process_limit: float = 2.0
    """Waits up to this long happen in the process; longer ones go back to the broker."""
    retry_ambiguous: bool = False

    def is_transient(self, error: InviteError) -> bool:
        match error:
            case GraphRefused(status=status):
                return status in TRANSIENT_STATUSES
            case GraphUnreachable():
                return True
            case GraphNoAnswer():
                return self.retry_ambiguous
            case TokenUnavailable(transient=transient):
                return transient
        return False

    def backoff(self, attempts: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with full jitter, after `attempts` failed attempts."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(attempts - 1, 0))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def delay_before_next(
        self, error: InviteError, *, attempts: int, elapsed: float, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when `error` is final."""
        if not self.is_transient(error) or attempts >= self.max_attempts:
            return None
        retry_after = error.retry_after if isinstance(error, GraphRefused) else None
        delay = retry_after if retry_after is not None else self.backoff(attempts, rng)
        if elapsed + delay > self.max_elapsed:
            return None
        return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: a (possibly fractional) number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)

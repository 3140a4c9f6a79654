"""The worker's own retry policy for Graph's invite, which is not idempotent.

Pure decisions: whether an error is worth another attempt, and after how long. Answers fall
in three groups:

- **Graph did not do the work** (429, 503, 509: throttled or unavailable): retried, Graph's
  Retry-After honoured when given, otherwise exponential backoff with full jitter. These
  attempts do not use up `max_attempts`: only `max_elapsed` and the command's deadline bound
  them, so a throttling storm delays a command but does not fail it.
- **Graph may have acted** (`GraphNoAnswer`: sent, then a timeout or a reset; `GraphAmbiguous`:
  500, 502, 504): by default final, so the worker never rings anyone twice on a guess; the
  outcome says `graph_no_answer` or `graph_ambiguous`, and the upstream system, which knows
  whether the call still needs the person, decides. `RETRY_AMBIGUOUS=true` retries them
  instead, within `max_attempts`.
- **Not sent** (`GraphUnreachable`: the request never left): retried within `max_attempts`.

`TokenUnavailable` from an unreachable or failing Entra ID (5xx) is transient too: its
retries are counted apart (token requests per command stay within `max_attempts`), with
Entra's Retry-After or backoff. Other 4xx answers are final. A 401 is handled before this
policy: the handler refreshes the tenant's token once and tries once more.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from worker.core.errors import (
    GraphAmbiguous,
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    InviteError,
    TokenUnavailable,
)

#: Answers that say Graph did not do the work: retried without using up `max_attempts`.
THROTTLED_STATUSES = frozenset({429, 503, 509})
#: Answers after which Graph may have acted (`GraphAmbiguous`): final unless `retry_ambiguous`.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})
TRANSIENT_STATUSES = THROTTLED_STATUSES | AMBIGUOUS_STATUSES
#: A Retry-After larger than this is treated as this: a broken header must not park a
#: command for days.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    """Graph requests per command that could have had an effect, the first included (answers
    in `THROTTLED_STATUSES` are not counted); also the token requests per command."""
    max_elapsed: float = 120.0
    """Seconds from the command's first delivery after which no attempt starts."""
    base_delay: float = 0.5
    max_delay: float = 30.0
    in_process_limit: float = 2.0
    """Waits up to this long happen in the process; longer ones go back to the broker."""
    retry_ambiguous: bool = False

    def is_transient(self, error: InviteError) -> bool:
        match error:
            case GraphAmbiguous() | GraphNoAnswer():
                return self.retry_ambiguous
            case GraphRefused(status=status):
                # A 500, 502 or 504 typed as a plain refusal is ambiguous all the same.
                return status in THROTTLED_STATUSES or (
                    status in AMBIGUOUS_STATUSES and self.retry_ambiguous
                )
            case GraphUnreachable():
                return True
            case TokenUnavailable(transient=transient):
                return transient
        return False

    @staticmethod
    def graph_did_not_act(error: InviteError) -> bool:
        """Graph said it did not do the work (429, 503, 509): the attempt is not counted."""
        return (
            isinstance(error, GraphRefused)
            and not isinstance(error, GraphAmbiguous)
            and error.status in THROTTLED_STATUSES
        )

    def backoff(self, attempts: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with full jitter, after `attempts` failed attempts."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(attempts - 1, 0))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def delay_before_next(
        self,
        error: InviteError,
        *,
        attempts: int,
        elapsed: float,
        throttled: int = 0,
        token_failures: int = 0,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when `error` is final.

        `attempts` are the Graph requests made so far, `throttled` those of them Graph answered
        with a status in `THROTTLED_STATUSES`, `token_failures` the failed token requests.
        """
        if not self.is_transient(error):
            return None
        retry_after: float | None = None
        if isinstance(error, TokenUnavailable):
            if token_failures >= self.max_attempts:
                return None
            retry_after, failures = error.retry_after, token_failures
        elif isinstance(error, GraphRefused) and self.graph_did_not_act(error):
            retry_after, failures = error.retry_after, throttled
        else:
            failures = attempts - throttled
            if failures >= self.max_attempts:
                return None
        delay = retry_after if retry_after is not None else self.backoff(failures, rng)
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

"""A circuit breaker for Graph: stop taking commands while Graph is unreachable.

Closed: commands flow. After `threshold` transient failures in a row (no answer, 5xx)
it opens: the worker stops consuming, so that commands wait in the broker rather than in
memory, and commands already taken go back to the broker for a delayed retry. After
`open_for` seconds it is half-open: the worker takes one command at a time as a probe.
A success closes it; a failure opens it again for twice as long, up to `max_open_for`.
Pure state: the consumer acts on the changes it reports.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        open_for: float = 5.0,
        max_open_for: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self._base_open_for = open_for
        self._max_open_for = max_open_for
        self._open_for = open_for
        self._clock = clock
        self.on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state)

    def record_success(self) -> None:
        self._failures = 0
        self._open_for = self._base_open_for
        self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        """A transient failure that says Graph is in trouble (not a 4xx, not a 429)."""
        self._failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self._max_open_for)
            self._open()
        elif self._failures >= self.threshold and self.state is CircuitState.CLOSED:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(CircuitState.OPEN)

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._open_for - self._clock())

    def half_open(self) -> None:
        """The open period is over: let one probe through."""
        if self.state is CircuitState.OPEN:
            self._set(CircuitState.HALF_OPEN)

    @property
    def allows_traffic(self) -> bool:
        return self.state is not CircuitState.OPEN

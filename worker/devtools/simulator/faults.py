"""Fault rules: scripted misbehaviour of the invite endpoint, as armed and as read from JSON."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from worker.devtools.simulator.common import _is_number


@dataclass(frozen=True)
class FaultRule:
    """One scripted misbehaviour of the invite endpoint; the first matching rule wins.

    A rule matches on ``call_id`` and ``tenant_id`` when given (the tenant is the one
    the bearer token was issued for), only on every ``every``-th such request when that is
    given, and only ``remaining`` more times when that is not None. ``hang`` reads the
    request and never answers; ``reset`` drops the connection with a TCP reset after
    ``delay``; otherwise ``status`` picks a Graph error (else the normal answer), sent after
    ``delay`` seconds plus the simulator's latency. With ``act`` the invite is carried out
    (recorded with ``acted``) before the error is answered: a gateway timing out while
    Graph did the work.
    """

    call_id: str | None = None
    tenant_id: str | None = None
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    hang: bool = False
    reset: bool = False
    remaining: int | None = None
    every: int | None = None
    act: bool = False

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("every must be None or a positive number of requests")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("a fault status must be an HTTP error status (400-599)")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError("a fault delay must be a non-negative number of seconds")
        if self.remaining is not None and self.remaining < 0:
            raise ValueError("remaining must be None or non-negative")
        if self.hang and self.reset:
            raise ValueError("a fault can hang or reset, not both")
        # The value goes verbatim into a response header.
        if self.retry_after is not None and not (
            self.retry_after.isascii() and self.retry_after.isprintable()
        ):
            raise ValueError("retry_after must be printable ASCII")

    def applies_to(self, call_id: str, tenant_id: str) -> bool:
        return (self.call_id is None or self.call_id == call_id) and (
            self.tenant_id is None or self.tenant_id.lower() == tenant_id.lower()
        )


@dataclass(slots=True)
class _ArmedFault:
    rule: FaultRule
    remaining: int | None
    seen: int = 0


class FaultTable:
    """The armed fault rules, guarded by the simulator's lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.armed: list[_ArmedFault] = []

    @property
    def faults(self) -> list[tuple[FaultRule, int | None]]:
        with self._lock:
            return [(armed.rule, armed.remaining) for armed in self.armed]

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        armed = [_ArmedFault(rule, rule.remaining) for rule in rules]
        with self._lock:
            self.armed = armed

    def take_fault(self, call_id: str, tenant: str) -> FaultRule | None:
        with self._lock:
            for armed in self.armed:
                if armed.remaining != 0 and armed.rule.applies_to(call_id, tenant):
                    armed.seen += 1
                    if armed.rule.every is not None and armed.seen % armed.rule.every:
                        continue
                    if armed.remaining is not None:
                        armed.remaining -= 1
                    return armed.rule
        return None


_RULE_FIELD_TYPES: dict[str, Callable[[object], bool]] = {
    **dict.fromkeys(
        ("call_id", "tenant_id", "code", "message", "retry_after"),
        lambda v: v is None or isinstance(v, str),
    ),
    **dict.fromkeys(
        ("status", "remaining", "every"),
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    ),
    "delay": _is_number,
    **dict.fromkeys(("hang", "reset", "act"), lambda v: isinstance(v, bool)),
}


def _rule_from_json(value: object) -> FaultRule:
    if not isinstance(value, dict):
        raise ValueError("each fault rule must be a JSON object")
    unknown = set(value) - {field.name for field in fields(FaultRule)}
    if unknown:
        raise ValueError(f"unknown fault rule fields: {sorted(unknown)}")
    if _is_number(value.get("retry_after")):
        value = {**value, "retry_after": str(value["retry_after"])}
    for name, item in value.items():
        if not _RULE_FIELD_TYPES[name](item):
            raise ValueError(f"fault rule field {name!r} has the wrong type")
    return FaultRule(**value)

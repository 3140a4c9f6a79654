"""The settled-command memory: what a redelivery of an already settled command gets."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from worker.core.outcomes import OutcomeEvent


@dataclass(slots=True)
class SettledCommands:
    """Recently settled commands by commandId, so that a redelivery does not invite twice.

    Confirmed outcomes were published: a redelivery is only acknowledged, and only the id is
    kept. Unconfirmed ones keep their event, published again (same event id) instead of
    calling Graph again.
    """

    capacity: int = 10_000
    _entries: OrderedDict[str, OutcomeEvent | None] = field(default_factory=OrderedDict)

    def get(self, command_id: str) -> tuple[OutcomeEvent | None, bool] | None:
        """(event, confirmed) for a settled command; None when it is not remembered."""
        if command_id not in self._entries:
            return None
        event = self._entries[command_id]
        return event, event is None

    def remember(self, command_id: str, event: OutcomeEvent, *, confirmed: bool) -> None:
        self._entries[command_id] = None if confirmed else event
        self._entries.move_to_end(command_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

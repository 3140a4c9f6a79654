"""The settled-command memory: what a redelivery of an already settled command gets.

Each settled commandId is kept with the command's fingerprint (`Command.fingerprint`), so
that a different command published under an id already used is recognised, not mistaken
for a redelivery. The first command settled under an id keeps it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from worker.core.outcomes import OutcomeEvent


@dataclass(frozen=True, slots=True)
class Settled:
    """What is remembered of a settled command."""

    fingerprint: bytes
    #: The event to publish again; None once the broker confirmed it.
    event: OutcomeEvent | None

    @property
    def confirmed(self) -> bool:
        return self.event is None


@dataclass(slots=True)
class SettledCommands:
    """Recently settled commands by commandId, so that a redelivery does not invite twice.

    Confirmed outcomes were published: a redelivery is only acknowledged, and only the id and
    the fingerprint are kept. Unconfirmed ones keep their event, published again (same event
    id) instead of calling Graph again.
    """

    capacity: int = 10_000
    _entries: OrderedDict[str, Settled] = field(default_factory=OrderedDict)

    def get(self, command_id: str) -> Settled | None:
        """The settled command under `command_id`; None when it is not remembered."""
        return self._entries.get(command_id)

    def remember(
        self, command_id: str, fingerprint: bytes, event: OutcomeEvent, *, confirmed: bool
    ) -> None:
        known = self._entries.get(command_id)
        if known is not None and known.fingerprint != fingerprint:
            return  # another command reusing the id: the first one keeps it
        self._entries[command_id] = Settled(fingerprint, None if confirmed else event)
        self._entries.move_to_end(command_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

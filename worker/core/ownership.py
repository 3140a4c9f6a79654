"""Whether this process still owns a delivery.

A delivery belongs to the process only while the channel it came on is open: when the channel
or its connection goes, the broker requeues every unacknowledged message of it and another
consumer may take them. The edge that receives a message makes its `Ownership` and marks it
lost when the channel closes; the handler looks at it before every wait and right before
writing a request, and sends nothing for a delivery that is no longer its own.
"""

from __future__ import annotations


class DeliveryLost(Exception):
    """The delivery's channel is gone: nothing more may be sent or published for it."""


class Ownership:
    """A delivery's tie to this process; `lose()` once its channel is gone."""

    __slots__ = ("_lost",)

    def __init__(self) -> None:
        self._lost = False

    @property
    def lost(self) -> bool:
        return self._lost

    def lose(self) -> None:
        self._lost = True

    def check(self) -> None:
        """Raise `DeliveryLost` once the delivery is no longer this process's."""
        if self._lost:
            raise DeliveryLost

"""How a command's message is settled: the closed set of settlements and the one rule choosing.

A pure decision; `worker.amqp.settlement` carries it out on the broker.
"""

from __future__ import annotations

import enum

from worker.core.outcomes import OutcomeKind


class Settlement(enum.Enum):
    """The closed set of things the worker does with a command's message."""

    ACK = "ack"
    """The outcome is confirmed (or was already): remove the command."""
    DEAD_LETTER = "dead_letter"
    """The outcome is confirmed; keep the command in the dead-letter queue, with why."""
    RETRY_LATER = "retry_later"
    """Publish a copy to a delay queue that returns it to the command queue, then remove it."""
    REQUEUE = "requeue"
    """Nothing could be confirmed: hand the message back to the broker as it is."""


def settlement_for(
    outcome: OutcomeKind | None,
    *,
    confirmed: bool,
    retry: bool = False,
    poison: bool = False,
) -> Settlement:
    """How a command's message is settled.

    `outcome` is the outcome event published for it (None when the command is not finished:
    a retry is due, or it was settled before); `confirmed` says whether the broker confirmed
    what had to be published; `poison` marks a message that kept coming back.
    """
    if not confirmed:
        return Settlement.REQUEUE
    if retry:
        return Settlement.RETRY_LATER
    if poison or outcome is OutcomeKind.REJECTED:
        return Settlement.DEAD_LETTER
    return Settlement.ACK

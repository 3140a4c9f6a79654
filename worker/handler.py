"""What happens to one command, from its raw bytes to its outcome event.

The core of the worker: it parses, checks the deadline, takes a token, waits for an
in-flight slot and the tenant's rate limit, sends the invite through an `InviteSender`,
and turns whatever happened into exactly one `OutcomeEvent`. It knows neither AMQP nor
HTTP; the consumer and the Graph client translate at the edges.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from worker import outcomes
from worker.errors import DeadlinePassed, InviteError
from worker.invite import GraphAccepted, InviteRequest, build_request
from worker.messages import Command, parse_command
from worker.outcomes import OutcomeEvent
from worker.ratelimit import TenantRateLimits
from worker.settings import Settings
from worker.tokens import TokenProvider

#: Outcomes remembered after the broker refused them, so that a redelivered command
#: gets its known outcome published again instead of a second invite.
_UNPUBLISHED_MEMORY = 10_000


class InviteSender(Protocol):
    """Sends one invite to Graph; raises a `GraphError` when Graph does not accept it.

    `on_sent` is called once the request has been written out, for the rate limiter.
    """

    async def invite(
        self, request: InviteRequest, token: str, on_sent: Callable[[], None]
    ) -> GraphAccepted: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """An incoming message, as the consumer hands it over."""

    body: bytes
    content_type: str | None
    message_id: str | None


@dataclass(frozen=True, slots=True)
class Handled:
    """A command's outcome, with what the canonical log line reports beyond the event."""

    event: OutcomeEvent
    command: Command | None
    http_status: int | None
    request_id: str | None
    attempts: int
    replayed: bool = False


class InviteHandler:
    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenProvider,
        sender: InviteSender,
        limits: TenantRateLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._sender = sender
        self._limits = limits or TenantRateLimits(settings.graph_tenant_rate_limit)
        self._in_flight = asyncio.Semaphore(settings.graph_max_in_flight)
        self._clock = clock
        self._now = now
        self._unpublished: OrderedDict[str, OutcomeEvent] = OrderedDict()

    async def handle(self, delivery: Delivery) -> Handled:
        started = self._clock()
        command: Command | None = None
        attempts = 0
        settings = self._settings
        try:
            command = parse_command(
                delivery.body,
                content_type=delivery.content_type,
                default_tenant_id=settings.azure_tenant_id,
                max_bytes=settings.max_command_bytes,
            )
            known = self._unpublished.get(command.command_id)
            if known is not None:
                return Handled(known, command, None, None, 0, replayed=True)
            self._check_deadline(command)
            request = build_request(command)
            token = await self._tokens.token(command.tenant_id)
            async with self._in_flight:
                # The grant is taken last, right before sending, and stamped when the
                # request is written, so that the arrivals Graph sees keep the promise.
                grant = await self._limits.for_tenant(command.tenant_id).acquire()
                try:
                    self._check_deadline(command)
                    attempts += 1
                    answer = await self._sender.invite(request, token, grant.mark_sent)
                finally:
                    grant.mark_sent()
        except InviteError as error:
            event = outcomes.from_error(
                error,
                command,
                attempts=attempts,
                duration_ms=(self._clock() - started) * 1000,
                client_request_id=command.command_id if command and attempts else None,
                source=settings.event_source,
            )
            status = getattr(error, "status", None)
            request_id = getattr(error, "request_id", None)
            return Handled(event, command, status, request_id, attempts)
        event = outcomes.accepted(
            command,
            operation_id=answer.operation_id,
            operation_status=answer.operation_status,
            location=answer.location,
            request_id=answer.request_id,
            client_request_id=request.client_request_id,
            attempts=attempts,
            duration_ms=(self._clock() - started) * 1000,
            source=settings.event_source,
        )
        return Handled(event, command, answer.status, answer.request_id, attempts)

    def remember_unpublished(self, handled: Handled) -> None:
        """Keep an outcome the broker did not confirm, for the command's redelivery."""
        if handled.command is None:
            return
        self._unpublished[handled.command.command_id] = handled.event
        self._unpublished.move_to_end(handled.command.command_id)
        while len(self._unpublished) > _UNPUBLISHED_MEMORY:
            self._unpublished.popitem(last=False)

    def forget_unpublished(self, handled: Handled) -> None:
        if handled.command is not None:
            self._unpublished.pop(handled.command.command_id, None)

    def _check_deadline(self, command: Command) -> None:
        if command.deadline is not None and self._now() >= command.deadline:
            raise DeadlinePassed("the deadline passed before Graph was called")

"""What happens to one command, from its raw bytes to its outcome event.

The core of the worker: it parses, checks the deadline, takes a token, waits for an
in-flight slot and the tenant's rate limit, sends the invite through an `InviteSender`,
retries what the `RetryPolicy` calls transient, and turns whatever happened into a
`Handled`: an outcome event to publish, or a retry the broker should deliver later. It
knows neither AMQP nor HTTP; the consumer and the Graph client translate at the edges.

A delivery whose channel is gone (its `Ownership` lost) is no longer this process's: the
broker has requeued it. Nothing that was not yet written to Graph is sent for it, and work
that finished for it publishes nothing (`Handled.abandoned`); an outcome Graph answered for
is remembered, unconfirmed, so that its redelivery here publishes that event instead of
calling Graph again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from worker.core import outcomes
from worker.core.circuit import CircuitBreaker, CircuitState
from worker.core.commands import Command, parse_command
from worker.core.errors import (
    DeadlinePassed,
    GraphError,
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    InvalidCommand,
    InviteError,
    Problem,
    RedeliveredTooOften,
    TokenUnavailable,
)
from worker.core.invite import GraphAccepted, InviteRequest, build_request
from worker.core.outcomes import OutcomeEvent
from worker.core.ownership import DeliveryLost, Ownership
from worker.core.ports import InviteSender, TokenProvider
from worker.core.ratelimit import TenantRateLimits
from worker.core.retry import RetryPolicy
from worker.core.settled import SettledCommands
from worker.core.slots import FairSlots
from worker.observability.metrics import Metrics

#: A second delivery of a command that is still being handled comes back after this long,
#: by when the first has usually settled and the second is acknowledged as a duplicate.
_IN_PROGRESS_RETRY = 1.0
_OUTAGE_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    """What the handler decides with; `worker.app.handler_config` builds it from the settings."""

    #: The tenant of a command that names none.
    default_tenant_id: str
    #: The allow-list: commands for any other tenant are rejected before a token is asked for.
    served_tenants: frozenset[str]
    max_command_bytes: int
    #: Deliveries of one message before it is failed as poison.
    max_redeliveries: int
    #: The CloudEvents `source` of outcome events.
    event_source: str
    retry_policy: RetryPolicy
    #: Invite requests per tenant in any one-second window, and per-tenant overrides.
    tenant_rate_limit: int
    tenant_rate_limits: Mapping[str, int]
    max_in_flight: int
    tenant_max_in_flight_share: float
    #: Settled commandIds remembered so that a redelivery does not call Graph again.
    settled_memory: int
    circuit_failure_threshold: int
    circuit_open_seconds: float
    circuit_max_open_seconds: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """An incoming message, as the consumer hands it over (headers already checked)."""

    body: bytes
    content_type: str | None
    message_id: str | None
    #: Earlier deliveries of this message (the broker's count; 0 the first time).
    delivery_count: int = 0
    #: Graph attempts made for this command by earlier deliveries (delayed retries).
    prior_attempts: int = 0
    #: When the command was first received (epoch seconds), carried across retries.
    first_received: float | None = None
    #: Lost once the channel it came on is gone; the edge that received it marks it.
    ownership: Ownership = field(default_factory=Ownership)


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of a command: an event to publish, or a retry due later."""

    command: Command | None
    event: OutcomeEvent | None = None
    #: Seconds after which the broker should deliver the command again.
    retry_in: float | None = None
    attempts: int = 0
    first_received: float = 0.0
    http_status: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    #: The command was settled before and its outcome confirmed: nothing to publish.
    duplicate: bool = False
    #: The outcome is the one remembered from an earlier delivery, published again.
    replayed: bool = False
    #: The message kept coming back; it goes to the dead-letter queue.
    poison: bool = False
    #: The delivery was lost (its channel is gone): publish nothing, settle nothing.
    abandoned: bool = False
    #: Of an abandoned command: its outcome was remembered for the redelivery.
    outcome_kept: bool = False


@dataclass(slots=True)
class _Progress:
    attempts: int
    first_received: float
    http_status: int | None = None
    request_id: str | None = None
    error_type: str | None = None

    def note(self, error: InviteError) -> None:
        self.error_type = type(error).__name__
        if isinstance(error, GraphError):
            self.http_status = error.status
            self.request_id = error.request_id


@dataclass(frozen=True, slots=True)
class _RetryLater:
    delay: float


class _TenantPaused(Exception):
    """A 429 paused the tenant while this command waited for its rate limit."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"tenant paused for {seconds:.1f} s")
        self.seconds = seconds


class InviteHandler:
    """Turns a delivery into what should become of it; one per process.

    Its public surface for the AMQP edge: `handle`, `remember_outcome` once an outcome was
    published, `stop` on shutdown, and the circuit through `takes_traffic`,
    `on_circuit_change`, `circuit_reopens_in` and `probe_circuit`.
    """

    def __init__(
        self,
        config: HandlerConfig,
        *,
        tokens: TokenProvider,
        sender: InviteSender,
        limits: TenantRateLimits | None = None,
        circuit: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._sender = sender
        self._limits = limits or TenantRateLimits(
            config.tenant_rate_limit, overrides=dict(config.tenant_rate_limits)
        )
        self._served = config.served_tenants
        self.circuit = circuit or CircuitBreaker(
            threshold=config.circuit_failure_threshold,
            open_for=config.circuit_open_seconds,
            max_open_for=config.circuit_max_open_seconds,
        )
        self.metrics = metrics or Metrics()
        self.policy = config.retry_policy
        self.slots = FairSlots(config.max_in_flight, config.tenant_max_in_flight_share)
        self.in_flight_requests = 0
        self._clock = clock
        self._now = now
        self.settled = SettledCommands(config.settled_memory)
        self._in_progress: set[str] = set()
        #: Set on shutdown: waits between attempts end, and the retry goes to the broker.
        self._stopping = asyncio.Event()

    # --- the surface the AMQP edge uses -----------------------------------------------------

    @property
    def takes_traffic(self) -> bool:
        """False while the circuit is open: Graph looks down, commands should wait."""
        return self.circuit.allows_traffic

    def on_circuit_change(self, callback: Callable[[CircuitState], None]) -> None:
        """Call `callback` with the circuit's new state whenever it changes."""
        self.circuit.on_change = callback

    def circuit_reopens_in(self) -> float:
        """Seconds until an open circuit lets a probe through."""
        return self.circuit.reopens_in()

    def probe_circuit(self) -> None:
        """Let one probe through an open circuit (half-open)."""
        self.circuit.half_open()

    def stop(self) -> None:
        """Shutdown began: waits between attempts end, and their retries go to the broker."""
        self._stopping.set()

    def remember_outcome(self, command_id: str, event: OutcomeEvent, *, confirmed: bool) -> None:
        """The outcome was published (`confirmed`) or not: a redelivery gets it, not Graph."""
        self.settled.remember(command_id, event, confirmed=confirmed)

    def abandon_if_lost(self, delivery: Delivery, handled: Handled) -> Handled:
        """`handled` as it stands, or abandoned when the delivery is no longer ours.

        An outcome of Graph's answer to this delivery is remembered, unconfirmed: the
        redelivery, when it comes back here, publishes it instead of calling Graph again.
        """
        if not delivery.ownership.lost or handled.abandoned:
            return handled
        kept = (
            handled.event is not None
            and handled.command is not None
            and handled.attempts > delivery.prior_attempts
            and not handled.replayed
        )
        if kept and handled.command is not None and handled.event is not None:
            self.settled.remember(handled.command.command_id, handled.event, confirmed=False)
        return replace(
            handled,
            event=None,
            retry_in=None,
            duplicate=False,
            replayed=False,
            poison=False,
            abandoned=True,
            outcome_kept=kept,
        )

    async def handle(self, delivery: Delivery) -> Handled:
        """What should become of `delivery`; abandoned when it was lost meanwhile."""
        return self.abandon_if_lost(delivery, await self._handle(delivery))

    async def _handle(self, delivery: Delivery) -> Handled:
        started = self._clock()
        wall = self._now().timestamp()
        progress = _Progress(delivery.prior_attempts, delivery.first_received or wall)
        command: Command | None = None
        try:
            command = parse_command(
                delivery.body,
                content_type=delivery.content_type,
                default_tenant_id=self._config.default_tenant_id,
                max_bytes=self._config.max_command_bytes,
            )
            if command.tenant_id not in self._served:
                # Checked before any token request: an upstream cannot make the app act in a
                # tenant nobody configured.
                raise InvalidCommand([Problem("tenantId", "is not a tenant this worker serves")])
            settled = self.settled.get(command.command_id)
            if settled is not None:
                event, confirmed = settled
                return Handled(
                    command,
                    event=None if confirmed else event,
                    attempts=progress.attempts,
                    first_received=progress.first_received,
                    duplicate=confirmed,
                    replayed=not confirmed,
                )
            if command.command_id in self._in_progress:
                return Handled(
                    command,
                    retry_in=_IN_PROGRESS_RETRY,
                    first_received=progress.first_received,
                    attempts=progress.attempts,
                )
            if delivery.delivery_count > self._config.max_redeliveries:
                raise RedeliveredTooOften(delivery.delivery_count + 1)
            self._in_progress.add(command.command_id)
            try:
                result = await self._invite(command, progress, delivery.ownership)
            finally:
                self._in_progress.discard(command.command_id)
        except DeliveryLost:
            return Handled(
                command,
                attempts=progress.attempts,
                first_received=progress.first_received,
                error_type=progress.error_type,
                abandoned=True,
            )
        except InviteError as error:
            progress.note(error)
            event = outcomes.from_error(
                error,
                command,
                attempts=progress.attempts,
                duration_ms=(self._clock() - started) * 1000,
                client_request_id=command.command_id if command and progress.attempts else None,
                source=self._config.event_source,
            )
            return self._handled(
                command, progress, event=event, poison=isinstance(error, RedeliveredTooOften)
            )
        if isinstance(result, _RetryLater):
            self.metrics.retries_scheduled.inc("broker")
            return self._handled(command, progress, retry_in=result.delay)
        event = outcomes.accepted(
            command,
            operation_id=result.operation_id,
            operation_status=result.operation_status,
            location=result.location,
            request_id=result.request_id,
            client_request_id=command.command_id,
            attempts=progress.attempts,
            duration_ms=(self._clock() - started) * 1000,
            source=self._config.event_source,
        )
        progress.http_status, progress.request_id = result.status, result.request_id
        return self._handled(command, progress, event=event)

    @staticmethod
    def _handled(
        command: Command | None,
        progress: _Progress,
        *,
        event: OutcomeEvent | None = None,
        retry_in: float | None = None,
        poison: bool = False,
    ) -> Handled:
        return Handled(
            command,
            event=event,
            retry_in=retry_in,
            attempts=progress.attempts,
            first_received=progress.first_received,
            http_status=progress.http_status,
            request_id=progress.request_id,
            error_type=progress.error_type,
            poison=poison,
        )

    async def _invite(
        self, command: Command, progress: _Progress, owner: Ownership
    ) -> GraphAccepted | _RetryLater:
        """Attempts until Graph accepts, a final error is raised, or a long wait is due.

        Raises `DeliveryLost` when the delivery is lost before a request is written.
        """
        limiter = self._limits.for_tenant(command.tenant_id)
        request = build_request(command)
        refreshed_token = False
        while True:
            owner.check()
            self._check_deadline(command)
            if not self.circuit.allows_traffic:
                return _RetryLater(max(self.circuit.reopens_in(), 1.0))
            blocked = limiter.blocked_for()
            if blocked > 0 and (
                blocked > self.policy.in_process_limit or not await self._pause(blocked)
            ):
                return _RetryLater(blocked)
            try:
                return await self._attempt(command, request, progress, owner)
            except _TenantPaused as paused:
                return _RetryLater(paused.seconds)
            except GraphRefused as error:
                if error.status == 401 and not refreshed_token:
                    # An expired or revoked token: one fresh token, one more try.
                    refreshed_token = True
                    progress.note(error)
                    await self._tokens.invalidate(command.tenant_id)
                    continue
                delay = self._after_failure(error, command, progress)
            except (GraphError, TokenUnavailable) as error:
                delay = self._after_failure(error, command, progress)
            if delay > self.policy.in_process_limit or not self.circuit.allows_traffic:
                return _RetryLater(delay)
            self.metrics.retries_scheduled.inc("in_process")
            if not await self._pause(delay):
                return _RetryLater(delay)

    async def _attempt(
        self, command: Command, request: InviteRequest, progress: _Progress, owner: Ownership
    ) -> GraphAccepted:
        token = await self._tokens.token(command.tenant_id)
        owner.check()
        limiter = self._limits.for_tenant(command.tenant_id)
        async with self.slots.slot(command.tenant_id, owner):
            # The grant is taken last, right before sending, and stamped when the request
            # is written, so that the arrivals Graph sees keep the per-second promise.
            waited = self._clock()
            grant = await limiter.acquire_unless_paused(self.policy.in_process_limit, owner)
            self.metrics.rate_limit_wait.observe(self._clock() - waited)
            if grant is None:
                raise _TenantPaused(limiter.blocked_for())
            self.in_flight_requests += 1
            sent = self._clock()
            try:
                # The last moment the request can still be held back.
                owner.check()
                self._check_deadline(command)
                progress.attempts += 1
                answer = await self._sender.invite(request, token, grant.mark_sent)
            except GraphError as error:
                self.metrics.graph_requests.inc(str(error.status or "none"), command.tenant_id)
                raise
            finally:
                grant.mark_sent()
                self.in_flight_requests -= 1
        self.metrics.graph_latency.observe(self._clock() - sent)
        self.metrics.graph_requests.inc(str(answer.status), command.tenant_id)
        self.circuit.record_success()
        return answer

    def _after_failure(
        self, error: GraphError | TokenUnavailable, command: Command, progress: _Progress
    ) -> float:
        """Seconds before the next attempt; raises `error` (or `DeadlinePassed`) when final."""
        progress.note(error)
        if isinstance(error, GraphRefused) and error.status == 429:
            retry_after = error.retry_after
            self.metrics.throttled.inc(command.tenant_id)
            if retry_after is not None:
                self.metrics.retry_after.inc(amount=retry_after)
            wait = (
                retry_after if retry_after is not None else self.policy.backoff(progress.attempts)
            )
            self._limits.for_tenant(command.tenant_id).throttle(wait)
        elif isinstance(error, GraphUnreachable | GraphNoAnswer) or (
            isinstance(error, GraphRefused) and error.status in _OUTAGE_STATUSES
        ):
            self.circuit.record_failure()
        elapsed = self._now().timestamp() - progress.first_received
        delay = self.policy.delay_before_next(error, attempts=progress.attempts, elapsed=elapsed)
        if delay is None:
            raise error
        deadline = command.deadline
        if deadline is not None and self._now().timestamp() + delay >= deadline.timestamp():
            raise DeadlinePassed("the deadline comes before Graph may be tried again")
        return delay

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless shutdown starts first; False when it did."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False

    def _check_deadline(self, command: Command) -> None:
        if command.deadline is not None and self._now() >= command.deadline:
            raise DeadlinePassed("the deadline passed before Graph was called")

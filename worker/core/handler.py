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

With a fleet-wide `SharedState` (Redis), the last step before a request is written claims
the command and takes its tenant's grant in one call: a command another live process holds
waits in a delay queue, one a dead process was sending ends as the ambiguous outcome, one
settled anywhere gets the settled outcome, and a 429 pauses the tenant everywhere. Without
the shared state the handler sends nothing (the command goes back to the broker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

from opentelemetry.trace import Span, SpanKind, Tracer

from worker.core import outcomes
from worker.core.circuit import CircuitBreaker, CircuitState
from worker.core.commands import Command, parse_command
from worker.core.errors import (
    DeadlinePassed,
    GraphAmbiguous,
    GraphError,
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    InvalidCommand,
    InviteError,
    Problem,
    RedeliveredTooOften,
    SharedStateUnavailable,
    TokenUnavailable,
)
from worker.core.invite import GraphAccepted, InviteRequest, build_request
from worker.core.outcomes import OutcomeEvent
from worker.core.ownership import DeliveryLost, Ownership
from worker.core.ports import ClaimVerdict, InviteSender, SharedState, TokenProvider
from worker.core.ratelimit import Grant, TenantRateLimits
from worker.core.retry import AMBIGUOUS_STATUSES, RetryPolicy
from worker.core.settled import SettledCommands
from worker.core.slots import FairSlots
from worker.observability.metrics import Metrics
from worker.observability.tracing import NO_TRACER, fail, started, traced
from worker.observability.tracing import span as span_of

#: A second delivery of a command that is still being handled comes back after this long,
#: by when the first has usually settled and the second is acknowledged as a duplicate.
_IN_PROGRESS_RETRY = 1.0
_OUTAGE_STATUSES = frozenset({500, 502, 503, 504})
#: Seconds before a command whose handling crashed is delivered again.
CRASH_RETRY = 1.0
#: Seconds before a command comes back while the fleet's shared state does not answer.
SHARED_STATE_RETRY = 5.0


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
    #: Graph's root, for the attributes of each request's span.
    graph_base_url: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """An incoming message, as the consumer hands it over (headers already checked)."""

    body: bytes
    content_type: str | None
    message_id: str | None
    #: The body's size as published, when `body` is not all of it: a body far over the
    #: limit is dropped as it arrives, and `body` is then empty.
    body_size: int | None = None
    #: Earlier deliveries of this message (the broker's count; 0 the first time).
    delivery_count: int = 0
    #: Graph attempts made for this command by earlier deliveries (delayed retries).
    prior_attempts: int = 0
    #: Of those, the attempts Graph refused without acting (429, 503, 509).
    prior_throttled: int = 0
    #: Failed token requests for this command by earlier deliveries.
    prior_token_failures: int = 0
    #: When the command was first received (epoch seconds), carried across retries.
    first_received: float | None = None
    #: No attempt before this time (epoch seconds): a delayed retry that came back early.
    retry_at: float | None = None
    #: The last failure of an earlier delivery: its HTTP status and error type.
    last_status: int | None = None
    last_error: str | None = None
    #: Times handling this command crashed before (the worker's own count, from a header).
    crashes: int = 0
    #: Lost once the channel it came on is gone; the edge that received it marks it.
    ownership: Ownership = field(default_factory=Ownership)


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of a command: an event to publish, or a retry due later."""

    command: Command | None
    event: OutcomeEvent | None = None
    #: Seconds after which the broker should deliver the command again.
    retry_in: float | None = None
    #: When (epoch seconds) the next attempt may start, with `retry_in`.
    retry_at: float | None = None
    attempts: int = 0
    #: Of `attempts`, those Graph refused without acting (429, 503, 509): not counted against
    #: RETRY_MAX_ATTEMPTS.
    throttled: int = 0
    token_failures: int = 0
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
    #: Set after a crash: the crashes counted so far, this one included.
    crashes: int = 0
    #: The delivery was lost (its channel is gone): publish nothing, settle nothing.
    abandoned: bool = False
    #: Of an abandoned command: its outcome was remembered for the redelivery.
    outcome_kept: bool = False


@dataclass(slots=True)
class _Progress:
    attempts: int
    first_received: float
    throttled: int = 0
    token_failures: int = 0
    retry_at: float | None = None
    http_status: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    #: The failure the next attempt would retry; raised when no attempt may start any more.
    last_error: InviteError | None = None
    #: The fleet's record says this process is sending the command.
    claimed: bool = False

    @classmethod
    def of(cls, delivery: Delivery, now: float) -> _Progress:
        progress = cls(
            delivery.prior_attempts,
            delivery.first_received or now,
            throttled=min(delivery.prior_throttled, delivery.prior_attempts),
            token_failures=delivery.prior_token_failures,
            retry_at=delivery.retry_at,
            http_status=delivery.last_status,
            error_type=delivery.last_error,
        )
        if progress.attempts or progress.token_failures:
            progress.last_error = _earlier_failure(delivery.last_status, delivery.last_error)
        return progress

    @property
    def retrying(self) -> bool:
        return self.attempts > 0 or self.token_failures > 0

    def note(self, error: InviteError) -> None:
        self.error_type = type(error).__name__
        self.last_error = error
        if isinstance(error, GraphError):
            self.http_status = error.status
            self.request_id = error.request_id


def _answered(span: Span, status: int | None, request_id: str | None, error: str | None) -> None:
    """Graph's answer on its request's span: the status, its request-id, and any failure."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if request_id is not None:
        span.set_attribute("http.response.header.request-id", (request_id,))
    if error is not None:
        # HTTP conventions: the status code is the error's type when there was an answer.
        fail(span, str(status) if status is not None else error, error)


_SPENT = "the retry budget (RETRY_MAX_ELAPSED) was spent before Graph could be tried again"


def _earlier_failure(status: int | None, error_type: str | None) -> InviteError:
    """An earlier delivery's last failure, from what its retry copy carries."""
    if error_type == "TokenUnavailable":
        return TokenUnavailable("token_unavailable", _SPENT, transient=True)
    if error_type == "GraphNoAnswer":
        return GraphNoAnswer(_SPENT)
    if status is not None:
        refusal = GraphAmbiguous if status in AMBIGUOUS_STATUSES else GraphRefused
        return refusal(status, None, _SPENT, None)
    return GraphUnreachable(_SPENT)


@dataclass(frozen=True, slots=True)
class _RetryLater:
    delay: float


class _AlreadySettled(Exception):
    """The command was settled (here, or anywhere in the fleet): its event, unless confirmed."""

    def __init__(self, event: OutcomeEvent | None) -> None:
        super().__init__("settled")
        self.event = event


def _already_settled(
    command: Command, fingerprint: bytes | None, event: OutcomeEvent | None
) -> None:
    """Raise `_AlreadySettled`, or `InvalidCommand` when the id was settled for another command.

    Reusing an id for other content is an upstream bug made visible: the id is the
    idempotency key of the command settled first.
    """
    if fingerprint != command.fingerprint():
        raise InvalidCommand([Problem("commandId", "was already used for a different command")])
    raise _AlreadySettled(event)


class _HeldElsewhere(Exception):
    """Another live process holds the command: it comes back later, and is never sent here."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"held by another process; back in {seconds:.1f} s")
        self.seconds = seconds


class _Orphaned(Exception):
    """A process that died was sending the command: the ambiguous outcome, final."""

    def __init__(self, error: GraphNoAnswer) -> None:
        super().__init__(str(error))
        self.error = error


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
        shared: SharedState | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._config = config
        self._tracer = tracer
        graph = urlsplit(config.graph_base_url)
        #: The attributes every Graph request's span starts with (HTTP client conventions).
        self._graph_span_name = f"POST {graph.path}/communications/calls/{{id}}/participants/invite"
        self._graph_attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "server.address": graph.hostname or "",
            "server.port": graph.port or 443,
            "url.template": graph.path + "/communications/calls/{id}/participants/invite",
        }
        self._tokens = tokens
        self._sender = sender
        self._limits = limits or TenantRateLimits(
            config.tenant_rate_limit, overrides=dict(config.tenant_rate_limits)
        )
        self._served = config.served_tenants
        self._shared = shared
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
        """False while the circuit is open (Graph looks down) or the shared state is away."""
        return self.circuit.allows_traffic and self.shared_state_available

    @property
    def shared_state_available(self) -> bool:
        """True without a shared state, or while it answers."""
        return self._shared is None or self._shared.available

    def on_shared_state_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback` with the shared state's availability whenever it changes."""
        if self._shared is not None:
            self._shared.on_availability_change(callback)

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

    async def remember_outcome(
        self, command: Command, event: OutcomeEvent, *, confirmed: bool
    ) -> None:
        """The outcome was published (`confirmed`) or not: a redelivery gets it, not Graph."""
        self.settled.remember(command.command_id, command.fingerprint(), event, confirmed=confirmed)
        if self._shared is not None:
            await self._shared.settle(command, event, confirmed=confirmed)

    def after_crash(self, delivery: Delivery) -> Handled:
        """What becomes of a delivery whose handling or settling raised unexpectedly.

        A crash is a bug, not a verdict on the command: it comes back after `CRASH_RETRY`
        seconds as a copy carrying the crash count, and after `max_redeliveries` crashed
        redeliveries it fails as poison (`invite.failed`, `redelivered_too_often`) and is
        dead-lettered. The count is the worker's own: RabbitMQ 4.3 no longer raises
        x-delivery-count when a message is requeued.
        """
        crashes = delivery.crashes + 1
        first_received = delivery.first_received or self._now().timestamp()
        command = self._readable(delivery)
        if crashes <= self._config.max_redeliveries:
            return Handled(
                command,
                retry_in=CRASH_RETRY,
                attempts=delivery.prior_attempts,
                first_received=first_received,
                error_type="crashed",
                crashes=crashes,
            )
        error = RedeliveredTooOften(crashes, crashed=True)
        event = outcomes.from_error(
            error,
            command,
            attempts=delivery.prior_attempts,
            duration_ms=0.0,
            client_request_id=None,
            source=self._config.event_source,
        )
        return Handled(
            command,
            event=event,
            attempts=delivery.prior_attempts,
            first_received=first_received,
            error_type=type(error).__name__,
            poison=True,
            crashes=crashes,
        )

    def _readable(self, delivery: Delivery) -> Command | None:
        """The command, for the ids of its outcome; None when it cannot be read at all."""
        try:
            return parse_command(
                delivery.body,
                content_type=delivery.content_type,
                default_tenant_id=self._config.default_tenant_id,
                max_bytes=self._config.max_command_bytes,
                body_size=delivery.body_size,
            )
        except Exception:  # the command crashed the worker once already
            return None

    async def abandon_if_lost(self, delivery: Delivery, handled: Handled) -> Handled:
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
            await self.remember_outcome(handled.command, handled.event, confirmed=False)
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
        return await self.abandon_if_lost(delivery, await self._handle(delivery))

    async def _handle(self, delivery: Delivery) -> Handled:
        started = self._clock()
        wall = self._now().timestamp()
        progress = _Progress.of(delivery, wall)
        command: Command | None = None
        try:
            command = parse_command(
                delivery.body,
                content_type=delivery.content_type,
                default_tenant_id=self._config.default_tenant_id,
                max_bytes=self._config.max_command_bytes,
                body_size=delivery.body_size,
            )
            if command.tenant_id not in self._served:
                # Checked before any token request: an upstream cannot make the app act in a
                # tenant nobody configured.
                raise InvalidCommand([Problem("tenantId", "is not a tenant this worker serves")])
            settled = self.settled.get(command.command_id)
            if settled is not None:
                _already_settled(command, settled.fingerprint, settled.event)
            if command.command_id in self._in_progress:
                return self._handled(command, progress, retry_in=_IN_PROGRESS_RETRY)
            if delivery.delivery_count > self._config.max_redeliveries:
                raise RedeliveredTooOften(delivery.delivery_count + 1)
            self._in_progress.add(command.command_id)
            try:
                result = await self._invite(command, progress, delivery.ownership)
                if isinstance(result, _RetryLater):
                    # Handed back to the broker: any process may take it up again.
                    await self._release(command, progress, may_have_acted=False)
            finally:
                self._in_progress.discard(command.command_id)
        except _AlreadySettled as settled:
            return Handled(
                command,
                event=settled.event,
                attempts=progress.attempts,
                first_received=progress.first_received,
                duplicate=settled.event is None,
                replayed=settled.event is not None,
            )
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
            # Counted by the consumer once the delayed copy is published (`where="broker"`).
            return self._handled(
                command,
                progress,
                retry_in=result.delay,
                retry_at=self._now().timestamp() + result.delay,
            )
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
        retry_at: float | None = None,
        poison: bool = False,
    ) -> Handled:
        return Handled(
            command,
            event=event,
            retry_in=retry_in,
            retry_at=retry_at,
            attempts=progress.attempts,
            throttled=progress.throttled,
            token_failures=progress.token_failures,
            first_received=progress.first_received,
            http_status=progress.http_status,
            request_id=progress.request_id,
            error_type=progress.error_type,
            poison=poison,
        )

    async def _invite(  # noqa: PLR0911, PLR0912 - each return is a different reason to wait
        self, command: Command, progress: _Progress, owner: Ownership
    ) -> GraphAccepted | _RetryLater:
        """Attempts until Graph accepts, a final error is raised, or a long wait is due.

        Raises `DeliveryLost` when the delivery is lost before a request is written.
        """
        limiter = self._limits.for_tenant(command.tenant_id)
        request = build_request(command)
        refreshed_token = False
        early = self._wait_before(command, progress)
        # A delayed retry comes back from the longest delay queue not longer than its wait;
        # the remainder is waited here, or in another delay queue.
        if early > 0 and (early > self.policy.in_process_limit or not await self._pause(early)):
            return _RetryLater(early)
        while True:
            owner.check()
            self._check_deadline(command)
            self._check_budget(progress)
            if not self.circuit.allows_traffic:
                return self._later(command, progress, max(self.circuit.reopens_in(), 1.0))
            blocked = limiter.blocked_for()
            if blocked > 0:
                # A throttled tenant's command whose deadline or budget ends during the pause
                # is finished now, not after the pause.
                self._later(command, progress, blocked)
                if blocked > self.policy.in_process_limit or not await self._pause(blocked):
                    return _RetryLater(blocked)
            try:
                return await self._attempt(command, request, progress, owner)
            except _TenantPaused as paused:
                return self._later(command, progress, paused.seconds)
            except _HeldElsewhere as held:
                # Not this process's to settle: no deadline or budget ends it here.
                return _RetryLater(held.seconds)
            except SharedStateUnavailable:
                return _RetryLater(SHARED_STATE_RETRY)
            except _Orphaned as orphaned:
                raise orphaned.error from None
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
                return self._later(command, progress, delay)
            self.metrics.retries_scheduled.inc("in_process")
            if not await self._pause(delay):
                return _RetryLater(delay)

    async def _attempt(
        self, command: Command, request: InviteRequest, progress: _Progress, owner: Ownership
    ) -> GraphAccepted:
        tenant = {"invite.tenant_id": command.tenant_id}
        with traced(self._tracer, "invite.token", attributes=tenant):
            token = await self._tokens.token(command.tenant_id)
        owner.check()
        limiter = self._limits.for_tenant(command.tenant_id)
        # From asking for an in-flight slot to holding the tenant's grant (or the fleet's claim).
        wait = started(self._tracer, "invite.wait", attributes=tenant)
        waiting = True
        try:
            async with self.slots.slot(command.tenant_id, owner):
                # The grant is taken last, right before sending, and stamped when the request
                # is written, so that the arrivals Graph sees keep the per-second promise.
                waited = self._clock()
                if self._shared is not None:
                    grant = None
                    await self._claim(self._shared, command, progress, owner)
                else:
                    grant = await limiter.acquire_unless_paused(self.policy.in_process_limit, owner)
                    if grant is None:
                        raise _TenantPaused(limiter.blocked_for())
                self.metrics.rate_limit_wait.observe(self._clock() - waited)
                waiting = False
                wait.end()
                return await self._send(
                    command, request, progress, token=token, grant=grant, owner=owner
                )
        except BaseException as exc:
            if waiting:
                fail(wait, type(exc).__name__)
                wait.end()
            raise

    async def _send(
        self,
        command: Command,
        request: InviteRequest,
        progress: _Progress,
        *,
        token: str,
        grant: Grant | None,
        owner: Ownership,
    ) -> GraphAccepted:
        """One request, in the slot and with the grant already held."""
        self.in_flight_requests += 1
        sent = self._clock()
        written = False

        def on_sent() -> None:
            nonlocal written
            written = True
            if grant is not None:
                grant.mark_sent()

        try:
            # The last moment the request can still be held back.
            owner.check()
            self._check_deadline(command)
            self._check_budget(progress)
            progress.attempts += 1
            answer = await self._traced_invite(request, token, on_sent, progress.attempts)
        except GraphError as error:
            self.metrics.graph_requests.inc(str(error.status or "none"), command.tenant_id)
            if isinstance(error, GraphRefused) and error.status == 429:
                await self._throttle(command, progress, error)
            await self._release_unless_acted(command, progress, error, written)
            raise
        except BaseException:
            # Held back (lost delivery, deadline, budget) or a crash: free when nothing
            # was written, otherwise orphaned (Graph may have acted).
            await self._release(command, progress, may_have_acted=written)
            raise
        finally:
            if grant is not None:
                grant.mark_sent()
            self.in_flight_requests -= 1
        self.metrics.graph_latency.observe(self._clock() - sent)
        self.metrics.graph_requests.inc(str(answer.status), command.tenant_id)
        self.circuit.record_success()
        return answer

    async def _traced_invite(
        self, request: InviteRequest, token: str, on_sent: Callable[[], None], attempt: int
    ) -> GraphAccepted:
        """The request in a client span (HTTP semantic conventions), with Graph's ids."""
        with span_of(self._tracer, self._graph_span_name, kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attributes(self._graph_attributes)
                span.set_attributes(
                    {
                        "url.full": self._config.graph_base_url + request.path,
                        "http.request.header.client-request-id": (request.client_request_id,),
                        "invite.attempt": attempt,
                    }
                )
            try:
                answer = await self._sender.invite(request, token, on_sent)
            except GraphError as error:
                _answered(span, error.status, error.request_id, type(error).__name__)
                raise
            except BaseException as exc:
                fail(span, type(exc).__name__)
                raise
            _answered(span, answer.status, answer.request_id, None)
            return answer

    async def _claim(
        self, shared: SharedState, command: Command, progress: _Progress, owner: Ownership
    ) -> None:
        """Claim the command in the fleet's record with its tenant's grant, or raise why not."""
        while True:
            owner.check()
            claim = await shared.begin_send(command, take_orphaned=self.policy.retry_ambiguous)
            match claim.verdict:
                case ClaimVerdict.GRANTED:
                    progress.claimed = True
                    return
                case ClaimVerdict.WAIT:
                    if claim.wait > self.policy.in_process_limit:
                        raise _TenantPaused(claim.wait)
                    if not await self._pause(claim.wait):
                        raise _TenantPaused(claim.wait)
                case ClaimVerdict.BUSY:
                    raise _HeldElsewhere(max(claim.wait, _IN_PROGRESS_RETRY))
                case ClaimVerdict.ORPHANED:
                    raise _Orphaned(
                        GraphNoAnswer(
                            "a worker that died was sending this invite: Graph may have acted"
                        )
                    )
                case ClaimVerdict.SETTLED:
                    _already_settled(command, claim.fingerprint, claim.event)

    async def _release_unless_acted(
        self, command: Command, progress: _Progress, error: GraphError, written: bool
    ) -> None:
        """Free the fleet's record when Graph did not act on the request, or it never left."""
        if (
            not written
            or self.policy.graph_did_not_act(error)
            or (isinstance(error, GraphRefused) and error.status == 401)
        ):
            await self._release(command, progress, may_have_acted=False)

    async def _throttle(self, command: Command, progress: _Progress, error: GraphRefused) -> None:
        """A 429 pauses the tenant for its Retry-After (or a backoff), on every process."""
        retry_after = error.retry_after
        self.metrics.throttled.inc(command.tenant_id)
        if retry_after is not None:
            self.metrics.retry_after.inc(amount=retry_after)
        wait = retry_after if retry_after is not None else self.policy.backoff(progress.attempts)
        self._limits.for_tenant(command.tenant_id).throttle(wait)
        if self._shared is not None:
            await self._shared.throttle(command.tenant_id, wait)

    async def _release(
        self, command: Command, progress: _Progress, *, may_have_acted: bool
    ) -> None:
        if self._shared is not None and progress.claimed:
            progress.claimed = False
            await self._shared.release(command, may_have_acted=may_have_acted)

    def _after_failure(
        self, error: GraphError | TokenUnavailable, command: Command, progress: _Progress
    ) -> float:
        """Seconds before the next attempt; raises `error` (or `DeadlinePassed`) when final."""
        progress.note(error)
        if isinstance(error, TokenUnavailable):
            progress.token_failures += 1
        elif self.policy.graph_did_not_act(error):
            progress.throttled += 1
        # A 429 throttled the tenant already, where it was answered (`_throttle`).
        if isinstance(error, GraphUnreachable | GraphNoAnswer) or (
            isinstance(error, GraphRefused) and error.status in _OUTAGE_STATUSES
        ):
            self.circuit.record_failure()
        elapsed = self._now().timestamp() - progress.first_received
        delay = self.policy.delay_before_next(
            error,
            attempts=progress.attempts,
            elapsed=elapsed,
            throttled=progress.throttled,
            token_failures=progress.token_failures,
        )
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

    def _wait_before(self, command: Command, progress: _Progress) -> float:
        """Seconds until a delayed retry that came back early may start (0: now)."""
        if progress.retry_at is None:
            return 0.0
        early = progress.retry_at - self._now().timestamp()
        if early <= 0:
            return 0.0
        self._later(command, progress, early)
        return early

    def _later(self, command: Command, progress: _Progress, delay: float) -> _RetryLater:
        """A retry due in `delay` seconds; raises when the deadline or budget ends first."""
        now = self._now().timestamp()
        deadline = command.deadline
        if deadline is not None and now + delay >= deadline.timestamp():
            raise DeadlinePassed("the deadline comes before Graph may be tried again")
        if (
            progress.retrying
            and progress.last_error is not None
            and now + delay - progress.first_received > self.policy.max_elapsed
        ):
            raise progress.last_error
        return _RetryLater(delay)

    def _check_budget(self, progress: _Progress) -> None:
        """No retry starts later than RETRY_MAX_ELAPSED after the first delivery."""
        elapsed = self._now().timestamp() - progress.first_received
        if (
            progress.retrying
            and progress.last_error is not None
            and elapsed > self.policy.max_elapsed
        ):
            raise progress.last_error

    def _check_deadline(self, command: Command) -> None:
        if command.deadline is not None and self._now() >= command.deadline:
            raise DeadlinePassed("the deadline passed before Graph was called")

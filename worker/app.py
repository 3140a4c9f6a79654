"""The worker process: wiring at start-up, running, and a graceful stop on SIGTERM.

Start-up builds every long-lived object once (settings, metrics, token provider, Graph
client, handler, broker connection, health server). On SIGTERM or SIGINT the worker stops
consuming, gives in-flight commands `SHUTDOWN_GRACE_PERIOD` seconds to finish (commands
waiting between attempts go to a delay queue at once), then abandons what is left without
publishing anything for it and closes the connection, so that the broker redelivers those
commands whole, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
import time

import aio_pika
import httpx
import redis.asyncio as aioredis
import structlog
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError

from worker import __version__
from worker.amqp.bodies import bounded_connection_class, dropped_above
from worker.amqp.consumer import CommandConsumer, PublisherFactory
from worker.amqp.topology import TopologyError
from worker.core.errors import SharedStateUnavailable
from worker.core.handler import HandlerConfig, InviteHandler
from worker.core.ports import TokenProvider
from worker.core.retry import RetryPolicy
from worker.fleet import RedisSharedState, packing_connection
from worker.graph.client import GraphClient
from worker.graph.tokens import MsalTokenProvider
from worker.observability import tracing
from worker.observability.health import HealthServer
from worker.observability.metrics import Metrics
from worker.settings import Settings

log = structlog.get_logger("worker.app")
#: Allocations between collections of the youngest generation (Python's default is 700).
GC_YOUNG_THRESHOLD = 10_000
#: Seconds between attempts to reach the broker at start-up, doubling up to the cap.
_CONNECT_RETRY = (1.0, 30.0)


#: HandlerConfig fields whose setting has another name; every other field is the setting's own.
_SETTING_FOR = {
    "default_tenant_id": "azure_tenant_id",
    "tenant_rate_limit": "graph_tenant_rate_limit",
    "max_in_flight": "graph_max_in_flight",
}


def handler_config(settings: Settings) -> HandlerConfig:
    """The core's view of the settings: the handler never reads `Settings` itself."""
    values = {
        field.name: getattr(settings, _SETTING_FOR.get(field.name, field.name))
        for field in dataclasses.fields(HandlerConfig)
        if field.name != "retry_policy"
    }
    policy = RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        max_elapsed=settings.retry_max_elapsed,
        base_delay=settings.retry_base_delay,
        max_delay=settings.retry_max_delay,
        in_process_limit=settings.retry_in_process_max,
        retry_ambiguous=settings.retry_ambiguous,
    )
    return HandlerConfig(**values, retry_policy=policy)


def shared_state(settings: Settings, metrics: Metrics) -> RedisSharedState | None:
    """The fleet's shared state when REDIS_URL is set; None keeps each process on its own."""
    if settings.redis_url is None:
        return None
    # One connection per command in hand at most (each holds one only for a call), and a few
    # for the lease: callers beyond that wait for a connection rather than fail, so that a
    # burst is never mistaken for Redis being away.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
        max_connections=settings.prefetch_count + 4,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        client_name="invite-worker",
    )
    pool.connection_class = packing_connection(pool.connection_class)
    client = aioredis.Redis(connection_pool=pool)
    return RedisSharedState(
        client,
        prefix=settings.redis_key_prefix,
        tenant_rate_limit=settings.graph_tenant_rate_limit,
        tenant_rate_limits=settings.tenant_rate_limits,
        idempotency_ttl=settings.idempotency_ttl,
        lease=settings.redis_lease,
        # A probe after a 429 holds the others back no longer than its request can last.
        probe_timeout=settings.graph_connect_timeout + settings.graph_read_timeout,
        metrics=metrics,
    )


def connection_name() -> str:
    """The broker connection's name: the version, and which process on which host (pod)."""
    return f"invite-worker {__version__} ({socket.gethostname()} pid {os.getpid()})"


class Worker:
    """One worker: a broker connection, a consumer, a Graph client and their handler."""

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        publisher: PublisherFactory | None = None,
        traces: tracing.Tracing | None = None,
    ) -> None:
        self.settings = settings
        #: Tracing as the OTEL_* settings ask (the no-op tracer without an exporter); a
        #: `traces` given by the caller stays the caller's to shut down.
        self._owns_tracing = traces is None
        self.tracing = traces or tracing.configure(
            enabled=settings.tracing_enabled,
            service_name=settings.otel_service_name,
            version=__version__,
            endpoint=settings.otel_traces_url,
        )
        tracer = self.tracing.tracer
        self.metrics = Metrics()
        self.tokens = tokens or MsalTokenProvider(settings, metrics=self.metrics)
        self.graph = GraphClient(settings, transport=transport)
        self.shared = shared_state(settings, self.metrics)
        self.handler = InviteHandler(
            handler_config(settings),
            tokens=self.tokens,
            sender=self.graph,
            metrics=self.metrics,
            shared=self.shared,
            tracer=tracer,
        )
        self.consumer = (
            CommandConsumer(settings, self.handler, metrics=self.metrics, tracer=tracer)
            if publisher is None
            else CommandConsumer(
                settings, self.handler, metrics=self.metrics, publisher=publisher, tracer=tracer
            )
        )
        self.health: HealthServer | None = None
        if settings.health_port:
            self.health = HealthServer(
                port=settings.health_port, metrics=self.metrics, ready=lambda: self.consumer.ready
            )
        self.metrics.gauge(
            "invite_graph_requests_in_flight",
            "Graph invite requests sent and not yet answered.",
            lambda: self.handler.in_flight_requests,
        )
        self.metrics.gauge(
            "invite_commands_in_progress",
            "Commands taken from the broker and not yet settled.",
            lambda: self.consumer.in_flight,
        )
        self.metrics.gauge(
            "invite_ready",
            "1 while the worker is connected, consuming and not draining.",
            lambda: 1 if self.consumer.ready else 0,
        )
        if self.shared is not None:
            shared = self.shared
            self.metrics.gauge(
                "invite_redis_available",
                "1 while the fleet's shared state (Redis) answers.",
                lambda: 1 if shared.available else 0,
            )
        self._connection: AbstractRobustConnection | None = None

    async def start(self, *, connect_attempts: int | None = 1) -> None:
        """Connect and consume, trying the broker `connect_attempts` times (None: no limit)."""
        started = time.monotonic()
        if self.health is not None:
            await self.health.start()
        if self.shared is not None:
            await self._start_shared_state(connect_attempts)
        self._connection = await self._connect(connect_attempts)
        await self.consumer.start(self._connection)
        log.info(
            "worker.ready",
            version=__version__,
            amqp_url=self.settings.redacted_amqp_url(),
            command_queue=self.settings.command_queue,
            outcome_exchange=self.settings.outcome_exchange,
            graph_base_url=self.settings.graph_base_url,
            tracing=self.tracing.enabled,
            max_in_flight=self.settings.graph_max_in_flight,
            prefetch=self.settings.prefetch_count,
            tenant_rate_limit=self.settings.graph_tenant_rate_limit,
            shared_state=self.settings.redacted_redis_url(),
            health_port=self.health.port if self.health else None,
            startup_ms=round((time.monotonic() - started) * 1000, 1),
            event_loop=event_loop_name(),
        )

    async def _start_shared_state(self, attempts: int | None) -> None:
        """Take this process's lease in Redis, retrying like the broker connection."""
        assert self.shared is not None  # noqa: S101 - only called with a shared state
        delay, cap = _CONNECT_RETRY
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.shared.start()
                return
            except SharedStateUnavailable:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("redis.unreachable", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)

    async def _connect(self, attempts: int | None) -> AbstractRobustConnection:
        delay, cap = _CONNECT_RETRY
        attempt = 0
        while True:
            attempt += 1
            try:
                return await aio_pika.connect_robust(
                    self.settings.amqp_url.get_secret_value(),
                    client_properties={"connection_name": connection_name()},
                    connection_class=bounded_connection_class(
                        dropped_above(self.settings.max_command_bytes)
                    ),
                )
            except (ConnectionError, AMQPError, OSError) as exc:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("broker.unreachable", error=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)

    async def stop(self, grace_period: float | None = None) -> None:
        grace = self.settings.shutdown_grace_period if grace_period is None else grace_period
        await self.consumer.stop_consuming()
        left = await self.consumer.drain(grace)
        if left:
            # Past the grace period: abandon the rest unsettled, with no outcome
            # published, so that the broker redelivers them whole to another worker.
            await self.consumer.abandon()
        if self._connection is not None:
            # Closing the connection hands every unsettled command back to the broker.
            await self._connection.close()
        await self.graph.aclose()
        self.tokens.close()
        if self.shared is not None:
            await self.shared.close()
        if self.health is not None:
            await self.health.stop()
        if self._owns_tracing and not await asyncio.to_thread(self.tracing.shutdown):
            log.warning("tracing.flush_timed_out", within=tracing.FLUSH_SECONDS)
        log.info("worker.stopped", unsettled_handed_back=left)


def event_loop_name() -> str:
    """The running event loop's library: "uvloop" or "asyncio" (`EVENT_LOOP`)."""
    return type(asyncio.get_running_loop()).__module__.split(".", 1)[0]


async def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; the exit code of the process."""
    try:
        worker = Worker(settings)
    except (ValueError, OSError) as exc:  # an unusable credential: nothing can work
        log.error("worker.invalid_credential", error=str(exc))
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(worker.start(connect_attempts=None))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Stopped while still starting (waiting for the broker): close what was opened.
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await worker.stop(grace_period=0)
        return 0
    stopped.cancel()
    error = starting.exception()
    if isinstance(error, TopologyError):
        # Not a traceback: one line naming what the platform must change.
        log.error(error.event, error=str(error), **error.fields)
        await worker.stop(grace_period=0)
        return 2
    if error is not None:
        log.error("worker.start_failed", error=repr(starting.exception()))
        await worker.stop(grace_period=0)
        return 1
    # Everything built at start-up lives as long as the process: keep it out of the
    # collector's full passes, whose pauses otherwise land on commands in flight. Young
    # garbage is collected less often, too: a command allocates a few thousand objects.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    await stop.wait()
    log.info("worker.stopping", grace_period=settings.shutdown_grace_period)
    await worker.stop()
    return 0

"""The worker process: wiring at start-up, running, and a graceful stop on SIGTERM.

Start-up builds every long-lived object once (settings, token provider, Graph client,
handler, broker connection). On SIGTERM or SIGINT the worker stops consuming, gives
in-flight commands `SHUTDOWN_GRACE_PERIOD` seconds to finish, then closes its channels so
that the broker redelivers whatever is left unsettled, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aio_pika
import httpx
import structlog
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError

from worker import __version__
from worker.consumer import CommandConsumer
from worker.graph import GraphClient
from worker.handler import InviteHandler
from worker.settings import Settings
from worker.tokens import MsalTokenProvider, TokenProvider

log = structlog.get_logger("worker.lifecycle")


class Worker:
    """One worker: a broker connection, a consumer, a Graph client and their handler."""

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens or MsalTokenProvider(settings)
        self.graph = GraphClient(settings, transport=transport)
        self.handler = InviteHandler(settings, tokens=self.tokens, sender=self.graph)
        self.consumer = CommandConsumer(settings, self.handler)
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        started = time.monotonic()
        self._connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": f"invite-worker {__version__}"},
        )
        await self.consumer.start(self._connection)
        log.info(
            "worker.ready",
            version=__version__,
            amqp_url=self.settings.redacted_amqp_url(),
            command_queue=self.settings.command_queue,
            outcome_exchange=self.settings.outcome_exchange,
            graph_base_url=self.settings.graph_base_url,
            max_in_flight=self.settings.graph_max_in_flight,
            prefetch=self.settings.prefetch_count,
            tenant_rate_limit=self.settings.graph_tenant_rate_limit,
            startup_ms=round((time.monotonic() - started) * 1000, 1),
        )

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
        if isinstance(self.tokens, MsalTokenProvider):
            self.tokens.close()
        log.info("worker.stopped", unsettled_handed_back=left)


async def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; the exit code of the process."""
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
    except (ConnectionError, AMQPError) as exc:
        log.error("worker.broker_unreachable", error=f"{type(exc).__name__}: {exc}")
        await worker.graph.aclose()
        return 1
    await stop.wait()
    log.info("worker.stopping", grace_period=settings.shutdown_grace_period)
    await worker.stop()
    return 0

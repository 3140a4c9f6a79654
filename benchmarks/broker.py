"""The benchmark's side of RabbitMQ: topology, commands in, outcome events out.

Each run gets queue and exchange names of its own (``bench-<hex>.…``), declared exactly as
the worker declares them (the worker's own `declare_topology`, with the worker's settings),
so that commands can be queued before the measured program starts; all of it is deleted
afterwards. Outcome events are collected from a private queue bound to the outcome exchange,
stamped with their arrival time on this process's monotonic clock, the same clock that
stamped the command's publication.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel

from benchmarks.processes import ROOT, Sample
from tests.support import outcomes
from worker.amqp.topology import declare_topology, topology_names
from worker.settings import Settings

EXAMPLE_COMMAND = ROOT / "schemas" / "examples" / "example-1-invite-one-participant.json"
TENANTS = tuple(f"{n:08x}-be00-4000-8000-000000000000" for n in range(1, 17))
_PRELOAD_BATCH = 5_000
_CONFIRM_TIMEOUT = 60.0

Command = tuple[str, bytes]
"""A command's id and its message body."""


def make_commands(count: int, tenants: int, example: Path = EXAMPLE_COMMAND) -> list[Command]:
    """``count`` valid commands shaped like Graph's first example, tenants taken in turn."""
    template = json.loads(example.read_bytes())
    commands = []
    for n in range(count):
        command_id = str(uuid.uuid4())
        body = {**template, "commandId": command_id, "tenantId": TENANTS[n % tenants]}
        commands.append((command_id, json.dumps(body).encode()))
    return commands


async def declare(channel: AbstractChannel, settings: Settings) -> None:
    await declare_topology(channel, settings)


async def delete(channel: AbstractChannel, settings: Settings) -> None:
    queues, exchanges = topology_names(settings)
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)


async def preload(
    channel: AbstractChannel, queue: str, commands: Sequence[Command], published: dict[str, float]
) -> None:
    """Queue every command, each confirmed by the broker (``channel`` has publisher confirms
    on); stamps each publication in ``published``."""
    for start in range(0, len(commands), _PRELOAD_BATCH):
        confirms = []
        for command_id, body in commands[start : start + _PRELOAD_BATCH]:
            published[command_id] = time.monotonic()
            confirms.append(_publish(channel, queue, command_id, body))
        await asyncio.gather(*confirms)


async def publish_paced(
    channel: AbstractChannel,
    queue: str,
    commands: Sequence[Command],
    rate: float,
    published: dict[str, float],
) -> None:
    """Publish at a steady ``rate`` per second, each stamped right before it is sent, and wait
    for the broker's confirms (without holding back the next publication)."""
    start = time.monotonic()
    confirms = []
    for n, (command_id, body) in enumerate(commands):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        published[command_id] = time.monotonic()
        confirms.append(asyncio.create_task(_publish(channel, queue, command_id, body)))
    await asyncio.gather(*confirms)


async def _publish(channel: AbstractChannel, queue: str, command_id: str, body: bytes) -> None:
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=command_id,
    )
    await channel.default_exchange.publish(message, routing_key=queue, timeout=_CONFIRM_TIMEOUT)


class OutcomeCollector(outcomes.OutcomeCollector):
    """Stamps every outcome event's arrival; samples the measured program at given counts.

    Keeps arrival times by commandId rather than every event: 100k events stay cheap.
    """

    def __init__(self, expected: int, sample_at: Collection[int]) -> None:
        super().__init__()
        self.expected = expected
        self.arrivals: dict[str, float] = {}
        """commandId (the outcome's correlation_id) -> arrival time."""
        self.routing_keys: Counter[str] = Counter()
        self.duplicates = 0
        self.samples: dict[int, Sample] = {}
        self._sample_at = frozenset(sample_at)
        self._sampler: Callable[[int, float], Sample] | None = None
        self._done = asyncio.Event()
        self._last_arrival = time.monotonic()

    def sample_with(self, sampler: Callable[[int, float], Sample]) -> None:
        """Take a `Sample` with ``sampler(outcomes, now)`` whenever a sample count is reached."""
        self._sampler = sampler

    def received(self, outcome: outcomes.Outcome) -> None:
        now = outcome.arrived
        self._last_arrival = now
        command_id = outcome.correlation_id or ""
        if command_id in self.arrivals:
            self.duplicates += 1
            return
        self.arrivals[command_id] = now
        self.routing_keys[outcome.routing_key] += 1
        count = len(self.arrivals)
        if count in self._sample_at and self._sampler is not None:
            self.samples[count] = self._sampler(count, now)
        if count >= self.expected:
            self._done.set()

    async def wait(self, idle_timeout: float, check: Callable[[], None]) -> None:
        """Until every expected outcome is in; raises TimeoutError after ``idle_timeout``
        seconds without a new one (counted from this call at first). ``check()`` is called
        every second, to raise when waiting is pointless (a process died)."""
        self._last_arrival = time.monotonic()
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 1.0)
            except TimeoutError:
                check()
                if time.monotonic() - self._last_arrival > idle_timeout:
                    raise TimeoutError(
                        f"{len(self.arrivals)} of {self.expected} outcomes arrived, then none "
                        f"for {idle_timeout:.0f} s"
                    ) from None

    def latencies(
        self, published: Mapping[str, float], subtract: float, since: float
    ) -> list[float]:
        """Seconds from each command's publication to its outcome, less ``subtract``, for the
        commands published at ``since`` or later."""
        return [
            arrived - published[command_id] - subtract
            for command_id, arrived in self.arrivals.items()
            if published.get(command_id, -math.inf) >= since
        ]

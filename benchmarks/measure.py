"""One measured run: a fresh topology, commands in, the program (worker or floor) started,
every outcome collected, the program stopped and the topology deleted.

A run is either pre-loaded (every command queued before the program starts: throughput,
CPU, memory) or paced (commands published at a steady rate while the program runs: latency).
Throughput and CPU are taken between the first and the last outcome, so that start-up is
not counted; latency is publish to outcome arrival, less the simulator's added latency.

A Redis-mode run also starts the worker with ``REDIS_URL`` and a key prefix of its own, reads
the Redis server's command counters before the start and after the stop, the worker's
``/metrics`` after the last outcome, and deletes the prefix's keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import httpx
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import broker
from benchmarks.processes import (
    Child,
    ChildFailed,
    Sample,
    SimulatorProcess,
    broker_pid,
    busy_cpu_seconds,
    cpu_seconds,
    cpu_seconds_if_running,
    memory_bytes,
)
from benchmarks.redis_server import RedisServer, RedisUse
from worker.settings import Settings

Program = Literal["worker", "floor"]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CLIENT_ID = "3f5d2c1b-0a9e-4d8c-b7a6-1e2f3a4b5c6d"
#: Seconds without a new outcome after which a run is given up.
IDLE_TIMEOUT = 60.0
#: Seconds to wait for the broker connection to come back after a broker restart.
RECONNECT_TIMEOUT = 120.0
#: The worker's counter of Redis round trips, read from its /metrics in a Redis-mode run.
REDIS_ROUND_TRIPS_METRIC = "invite_redis_round_trips_total"
_ARGV: dict[Program, list[str]] = {
    "worker": [sys.executable, "-m", "worker", "run"],
    "floor": [sys.executable, "-m", "benchmarks.floor"],
}


@dataclass(frozen=True)
class RunSpec:
    program: Program
    commands: int
    tenants: int
    simulator_latency: float
    in_flight: int
    """GRAPH_MAX_IN_FLIGHT; the prefetch is twice this, for the floor too."""
    rate_limit: int
    """GRAPH_TENANT_RATE_LIMIT (the floor has none)."""
    paced_rate: float | None = None
    """Commands per second published while the program runs; None: all queued beforehand."""
    warmup_seconds: float = 0.0
    """Latency leaves out the commands published this early (connections and tokens being
    set up)."""
    rss_at: tuple[int, ...] = ()
    """Sample the program's RSS when this many outcomes have arrived."""
    redis_url: str | None = None
    """Start the worker in Redis mode against this server (``redis://host:port/db``)."""
    environment: Mapping[str, str] = field(default_factory=dict)
    """Further variables for the program, set over the benchmark's own."""
    profile_to: Path | None = None
    """Sample the program with py-spy while it works, into this file (py-spy's raw format).
    The sampler shares the machine's cores: a profiled run's figures are not comparable."""

    def expected_outcomes(self) -> dict[str, int]:
        """Outcome events by routing key that a sound run ends with: every command valid, for
        a tenant served, answered 2xx by the simulator."""
        return {"invite.accepted": self.commands}


@dataclass
class RunResult:
    program: Program
    commands: int
    tenants: int
    simulator_latency_ms: float
    in_flight: int
    rate_limit: int
    paced_rate: float | None
    warmup_seconds: float
    cmds_per_second: float
    """Outcomes per second, first to last outcome."""
    cpu_seconds_per_1000: float
    """The program's user + system CPU seconds per 1,000 commands, first to last outcome."""
    cpu_cores: float
    """The program's CPU use in cores, first to last outcome."""
    peak_rss_bytes: int
    latency_ms: dict[str, float]
    """p50/p95/p99/p99.9 of publish -> outcome less the simulator's latency. In a pre-loaded run
    this is mostly time spent queued."""
    outcomes: dict[str, int]
    """Outcome events by routing key."""
    duplicate_outcomes: int
    ready_seconds: float
    exit_code: int | None
    simulator_cpu_cores: float
    """The simulator's CPU use, in cores, first to last outcome: near 1.0, it was the limit."""
    broker_cpu_cores: float
    """RabbitMQ's, likewise (NaN when it is not on this machine)."""
    harness_cpu_cores: float
    """This benchmark process's (publishing, collecting outcomes), likewise."""
    machine_busy_cores: float
    """The whole machine's CPU use, in cores, first to last outcome: what the programs above
    leave of it went to other processes."""
    rss_by_outcomes: dict[int, int] = field(default_factory=dict)
    expected_outcomes: dict[str, int] = field(default_factory=dict)
    redis: RedisUse | None = None
    """A Redis-mode run's use of the Redis server (start-up and shutdown included)."""
    redis_round_trips: float | None = None
    """The worker's own count of Redis round trips after the last outcome; None when its
    /metrics has no such metric."""

    @property
    def unexpected(self) -> str | None:
        """What is wrong with the outcomes, or None when they are exactly the expected ones."""
        problems = []
        if self.outcomes != self.expected_outcomes:
            problems.append(f"outcomes {self.outcomes}, expected {self.expected_outcomes}")
        if self.duplicate_outcomes:
            problems.append(f"{self.duplicate_outcomes} duplicate outcomes")
        return "; ".join(problems) or None


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """Nearest-rank p50, p95, p99 and p99.9, in milliseconds."""
    if not seconds:
        return {}
    ordered = sorted(seconds)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "p99.9": rank(99.9)}


class Bench:
    """The broker connection, the simulator and the log directory that every run shares."""

    def __init__(
        self, connection: AbstractRobustConnection, simulator: SimulatorProcess, logs: Path
    ) -> None:
        self.connection = connection
        self.simulator = simulator
        self.logs = logs
        self.broker_pid = broker_pid()

    def environment(self, prefix: str, spec: RunSpec) -> dict[str, str]:
        """What the worker (and the floor) is started with: the README's variables."""
        env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "COMMAND_QUEUE": f"{prefix}.invite.commands",
            "OUTCOME_EXCHANGE": f"{prefix}.invite.outcomes",
            "GRAPH_BASE_URL": self.simulator.graph_base_url,
            "AZURE_AUTHORITY_HOST": self.simulator.authority_host,
            "AZURE_TENANT_ID": broker.TENANTS[0],
            # Every tenant the run's commands name: a command the worker rejects skips the
            # token, the limiter and Graph, and would flatter its figures.
            "ALLOWED_TENANT_IDS": ",".join(broker.TENANTS[: spec.tenants]),
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_CLIENT_SECRET": "bench-client-secret",
            "SSL_CERT_FILE": self.simulator.ca_file,
            "REQUESTS_CA_BUNDLE": self.simulator.ca_file,
            "GRAPH_MAX_IN_FLIGHT": str(spec.in_flight),
            "GRAPH_TENANT_RATE_LIMIT": str(spec.rate_limit),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            # No /healthz server (its fixed port may be taken); the metrics are kept regardless.
            "HEALTH_PORT": "0",
        }
        env.pop("AZURE_CLIENT_CERTIFICATE_PATH", None)
        # Tracing only where the run asks for it (the tracing scenario), whatever the shell has.
        for name in [name for name in env if name.startswith("OTEL_")]:
            del env[name]
        # Redis mode only where the run asks for it, whatever the shell running this has set.
        env.pop("REDIS_URL", None)
        env.pop("REDIS_KEY_PREFIX", None)
        if spec.redis_url is not None:
            env["REDIS_URL"] = spec.redis_url
            env["REDIS_KEY_PREFIX"] = f"{prefix}:"
            env["HEALTH_PORT"] = str(_free_port())
        return {**env, **spec.environment}

    def child(self, name: str, program: Program, env: dict[str, str]) -> Child:
        return Child(_ARGV[program], env, self.logs / f"{name}.log", "worker.ready")

    async def run(self, name: str, spec: RunSpec) -> RunResult:
        """Measure one run; its program's log is ``<logs>/<name>.log``."""
        if spec.commands < 2:
            raise ValueError("a run needs at least 2 commands")
        env = self.environment(f"bench-{uuid.uuid4().hex[:8]}", spec)
        settings = Settings.model_validate(env)
        redis = None if spec.redis_url is None else RedisServer(spec.redis_url)
        try:
            return await self._run(name, spec, env, settings, redis)
        finally:
            if redis is not None:
                redis.delete_prefix(env["REDIS_KEY_PREFIX"])

    async def _run(
        self,
        name: str,
        spec: RunSpec,
        env: dict[str, str],
        settings: Settings,
        redis: RedisServer | None,
    ) -> RunResult:
        await self.simulator.prepare(spec.simulator_latency)
        collector = broker.OutcomeCollector(spec.commands, {1, spec.commands, *spec.rss_at})
        commands = broker.make_commands(spec.commands, spec.tenants)
        published: dict[str, float] = {}
        channel = await self.connection.channel(publisher_confirms=True)
        await broker.declare(channel, settings)
        try:
            await collector.subscribe(channel, settings.outcome_exchange)
            if spec.paced_rate is None:
                await broker.preload(channel, settings.command_queue, commands, published)
            child = self.child(name, spec.program, env)
            redis_before = None if redis is None else redis.stats()
            round_trips = None
            try:
                await child.spawn()
                pid = child.pid
                collector.sample_with(lambda count, now: self._sample(pid, count, now))
                await child.wait_ready()
                sampler = None if spec.profile_to is None else await _py_spy(pid, spec.profile_to)
                if spec.paced_rate is not None:
                    await broker.publish_paced(
                        channel, settings.command_queue, commands, spec.paced_rate, published
                    )
                await collector.wait(IDLE_TIMEOUT, lambda: self._check_alive(child))
                if sampler is not None and spec.profile_to is not None:
                    sampler.send_signal(signal.SIGINT)
                    if await sampler.wait() != 0 or not spec.profile_to.exists():
                        raise ChildFailed(
                            f"py-spy exited {sampler.returncode} without a profile; see "
                            f"{_py_spy_log(spec.profile_to)}"
                        )
                peak_rss = memory_bytes(pid, "VmHWM")
                if redis is not None:
                    round_trips = await _metric_total(env["HEALTH_PORT"], REDIS_ROUND_TRIPS_METRIC)
            finally:
                exit_code = await child.stop()
            redis_use = None
            if redis is not None and redis_before is not None:
                prefix = env["REDIS_KEY_PREFIX"]
                after = redis.stats()
                deleted = len(redis.keys(prefix))
                redis_use = RedisUse.between(redis.url, prefix, redis_before, after, deleted)
        finally:
            # After a lost connection the exclusive queue and the channel are gone already.
            with contextlib.suppress(AMQPError, ConnectionError, RuntimeError):
                await collector.unsubscribe()
                await channel.close()
            await self._delete(settings)
        first, last = collector.samples[1], collector.samples[spec.commands]
        elapsed, counted = last.at - first.at, spec.commands - 1
        cpu = last.cpu_seconds - first.cpu_seconds
        since = min(published.values()) + spec.warmup_seconds
        return RunResult(
            program=spec.program,
            commands=spec.commands,
            tenants=spec.tenants,
            simulator_latency_ms=spec.simulator_latency * 1000,
            in_flight=spec.in_flight,
            rate_limit=spec.rate_limit,
            paced_rate=spec.paced_rate,
            warmup_seconds=spec.warmup_seconds,
            cmds_per_second=counted / elapsed,
            cpu_seconds_per_1000=cpu / counted * 1000,
            cpu_cores=cpu / elapsed,
            peak_rss_bytes=peak_rss,
            latency_ms=percentiles_ms(
                collector.latencies(published, spec.simulator_latency, since)
            ),
            outcomes=dict(collector.routing_keys),
            duplicate_outcomes=collector.duplicates,
            ready_seconds=child.ready_seconds or math.nan,
            exit_code=exit_code,
            simulator_cpu_cores=(last.simulator_cpu_seconds - first.simulator_cpu_seconds)
            / elapsed,
            broker_cpu_cores=(last.broker_cpu_seconds - first.broker_cpu_seconds) / elapsed,
            harness_cpu_cores=(last.harness_cpu_seconds - first.harness_cpu_seconds) / elapsed,
            machine_busy_cores=(last.machine_busy_seconds - first.machine_busy_seconds) / elapsed,
            rss_by_outcomes={n: collector.samples[n].rss_bytes for n in sorted(spec.rss_at)},
            expected_outcomes=spec.expected_outcomes(),
            redis=redis_use,
            redis_round_trips=round_trips,
        )

    async def start_times(self, starts: int, spec: RunSpec) -> list[float]:
        """Seconds from spawning the worker to its ready line, ``starts`` times, one at a time,
        against a topology that already exists (as in production)."""
        env = self.environment(f"bench-{uuid.uuid4().hex[:8]}", spec)
        settings = Settings.model_validate(env)
        channel = await self.connection.channel()
        await broker.declare(channel, settings)
        times = []
        try:
            for n in range(starts):
                child = self.child(f"startup-{n + 1}", "worker", env)
                try:
                    await child.spawn()
                    await child.wait_ready()
                finally:
                    await child.stop()
                if child.ready_seconds is not None:
                    times.append(child.ready_seconds)
        finally:
            with contextlib.suppress(AMQPError, ConnectionError, RuntimeError):
                await channel.close()
            await self._delete(settings)
        return times

    async def _delete(self, settings: Settings) -> None:
        """Delete a run's queues and exchanges, on a channel of its own: the broker may have
        been restarted (by someone else) since the run's channel was opened."""
        await asyncio.wait_for(self.connection.connected.wait(), RECONNECT_TIMEOUT)
        channel = await self.connection.channel()
        await broker.delete(channel, settings)
        await channel.close()

    def _check_alive(self, child: Child) -> None:
        if not child.running:
            raise ChildFailed(f"{child.argv} exited {child.returncode}; see {child}")
        if not self.simulator.running:
            raise ChildFailed("the simulator exited")

    def _sample(self, pid: int, outcomes: int, now: float) -> Sample:
        return Sample(
            outcomes=outcomes,
            at=now,
            cpu_seconds=cpu_seconds(pid),
            rss_bytes=memory_bytes(pid, "VmRSS"),
            simulator_cpu_seconds=cpu_seconds(self.simulator.pid),
            broker_cpu_seconds=cpu_seconds_if_running(self.broker_pid),
            harness_cpu_seconds=time.process_time(),
            machine_busy_seconds=busy_cpu_seconds(),
        )


async def _py_spy(pid: int, output: Path) -> asyncio.subprocess.Process:
    """py-spy sampling `pid` until it is sent SIGINT (each sample pauses it briefly).

    Only the thread holding the GIL is sampled: Python code running, not threads waiting.
    """
    argv = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "200",
    ]
    argv += ["--gil", "--output", str(output)]
    with _fresh_output(output) as log:
        return await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)


def _fresh_output(output: Path) -> IO[bytes]:
    """No earlier profile at `output`; py-spy's own messages go to a log file beside it."""
    output.unlink(missing_ok=True)
    return _py_spy_log(output).open("wb")


def _py_spy_log(output: Path) -> Path:
    return output.with_name(output.name + ".log")


def _free_port() -> int:
    """A TCP port nothing listens on now, for the worker's health server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _metric_total(port: str, name: str) -> float | None:
    """The sum of a counter's samples on the program's ``/metrics``; None when it has none."""
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
        response.raise_for_status()
    values = [
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
    ]
    return sum(values) if values else None

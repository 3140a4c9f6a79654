"""Run the benchmark's scenarios and write ``latest.json`` and ``latest.md``.

``python -m benchmarks.run`` (what ``make bench`` runs) measures every scenario against the
local RabbitMQ and one Graph simulator process:

* ``startup``: spawn to ``worker.ready``, five times (the topology already exists);
* ``saturation``: 10,000 commands queued beforehand, simulator latency 0, 64 requests in
  flight, no binding rate limit; the floor (`benchmarks.floor`) and the worker, twice each
  (floor, worker, worker, floor), the worker's mean throughput stated as a ratio to the
  floor's;
* ``tracing``: the saturation load with tracing off (no exporter: the API's no-op tracer) and
  on (OTLP/HTTP to a receiver in this process that decodes and counts the spans), sampler
  ``parentbased_traceidratio`` at 1.0 and 0.1, in the order off, 1.0, 0.1, 0.1, 1.0, off: the
  throughput and CPU per command of each setting, the spans each run exported, and the no-op
  tracer's own cost per command timed in a loop (``benchmarks/noop_tracing.py``);
* ``redis``: the saturation load once more, the floor (which has no Redis), the worker without
  Redis and the worker in Redis mode (``REDIS_URL``, ``REDIS_KEY_PREFIX=bench-<hex>:``), twice
  each (floor, worker, Redis mode, Redis mode, worker, floor): Redis mode's mean throughput
  as a ratio to the floor's and to the worker's without Redis, its CPU per command, the Redis
  server's commands per command (the difference of ``INFO`` before and after, server-wide)
  and the worker's own count of Redis round trips per command from its ``/metrics`` (n/a
  when it has none). The prefix's keys are deleted afterwards;
* ``realistic``: simulator latency 100 ms, eight tenants, commands published at half the
  worker's saturation throughput while it runs (floor, then worker): the latency the worker
  adds. About 22 s of commands (1,000 to 10,000), the first 2 s not counted (warm-up);
* ``rate-bound``: 3,000 commands of one tenant limited to 200 requests/s; the simulator's
  arrival times give the achieved rate and the busiest one-second window;
* ``backlog``: 100,000 commands queued, RSS sampled after 10,000 and every tenth. At most
  5 minutes of them at the saturation throughput: fewer when the worker is slower than
  100,000 / 300 s, said so in the table.

``realistic`` and ``backlog`` take their rate from ``saturation``, which runs first whenever
either is selected. ``--scenario NAME`` (repeatable) picks scenarios; ``--commands N`` sets
every scenario's command count, for a quick run. Absolute figures depend on the machine and
on whatever else it runs: the ratios measured in one run are what count.

Every command of every run must end with the outcome its scenario expects (``invite.accepted``,
once; the worker serves every tenant its commands name): a run in which any other outcome or
a duplicate arrives stops the benchmark, which exits 1 and writes no results.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPError

from benchmarks import noop_tracing
from benchmarks.measure import AMQP_URL, RECONNECT_TIMEOUT, Bench, Program, RunResult, RunSpec
from benchmarks.processes import ROOT, SimulatorProcess
from benchmarks.profile import write_summary
from benchmarks.report import (
    Backlog,
    Failed,
    Profile,
    RateBound,
    Realistic,
    RedisMode,
    Saturation,
    ScenarioResult,
    Startup,
    TracedRun,
    TracingCost,
    table,
    targets,
)
from tests.support.otlp import OtlpReceiver

SCENARIOS = (
    "startup",
    "saturation",
    "tracing",
    "profile",
    "redis",
    "realistic",
    "rate-bound",
    "backlog",
)
#: No binding limit (3,000/s per tenant is the setting's maximum) and generous concurrency.
SATURATION = RunSpec(
    "worker", 10_000, tenants=4, simulator_latency=0.0, in_flight=64, rate_limit=3000
)
#: Each program twice, in an order that cancels a steady drift in the machine's load.
SATURATION_ORDER: tuple[Program, ...] = ("floor", "worker", "worker", "floor")
#: The redis scenario's runs: each program, and whether it runs in Redis mode.
REDIS_ORDER: tuple[tuple[Program, bool], ...] = (
    ("floor", False),
    ("worker", False),
    ("worker", True),
    ("worker", True),
    ("worker", False),
    ("floor", False),
)
#: Tracing off (no exporter), on with every trace sampled, on with one in ten; then mirrored.
TRACING_ORDER: tuple[float | None, ...] = (None, 1.0, 0.1, 0.1, 1.0, None)
#: Seconds of commands: the first few warm up (connections, tokens) and are not counted.
REALISTIC_SECONDS = 22.0
REALISTIC_WARMUP = 2.0
REALISTIC_TENANTS = 8
REALISTIC_LATENCY = 0.1
RATE_LIMIT = 200
RATE_BOUND_COMMANDS = 3_000
BACKLOG_COMMANDS = 100_000
BACKLOG_SECONDS = 300.0
#: The backlog's first RSS sample; growth is measured from here to the end.
BACKLOG_SETTLED = 10_000
#: The Redis-mode worker's server; keys go under a prefix of the run's own.
REDIS_URL = "redis://127.0.0.1:6379/11"

Scenario = Callable[["Session"], Coroutine[Any, Any, ScenarioResult]]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UnexpectedOutcomes(RuntimeError):
    """A run's outcomes are not the ones its scenario expects: its figures mean nothing."""


class Session:
    """One benchmark run: its options, its `Bench`, and the scenarios measured so far."""

    def __init__(
        self,
        bench: Bench,
        commands: int | None,
        starts: int,
        redis_url: str = REDIS_URL,
        receiver: OtlpReceiver | None = None,
    ) -> None:
        self.bench = bench
        #: Where the tracing scenario's worker exports its spans.
        self.receiver = receiver
        self.commands = commands
        self.starts = starts
        self.redis_url = redis_url
        self.results: dict[str, ScenarioResult] = {}
        self.started = time.monotonic()
        self.reconnects = 0
        bench.connection.reconnect_callbacks.add(self._count_reconnect)

    def _count_reconnect(self, _connection: AbstractRobustConnection | None, /) -> None:
        self.reconnects += 1

    async def measure(self, name: str, *, again: bool = True) -> ScenarioResult:
        """Run one scenario; once more if the broker connection was lost meanwhile: the broker
        is shared, and another suite restarting it spoils the run, not the worker."""
        reconnects = self.reconnects
        try:
            if await self.bench.simulator.ensure_running():
                self.say("the simulator was gone (ended by someone?); started it again")
            return await _SCENARIO_FUNCTIONS[name](self)
        except UnexpectedOutcomes:
            raise
        except Exception as exc:  # one failed scenario must not hide the others
            error = f"{type(exc).__name__}: {exc}"
            self.say(f"{name} failed: {error}")
            lost = isinstance(exc, AMQPError | ConnectionError) or self.reconnects != reconnects
            if not (again and (lost or not self.bench.simulator.running)):
                return Failed(error)
        self.say(f"{name}: lost the broker connection or the simulator meanwhile; once more")
        await asyncio.wait_for(self.bench.connection.connected.wait(), RECONNECT_TIMEOUT)
        return await self.measure(name, again=False)

    def say(self, message: str) -> None:
        _progress(f"[{time.monotonic() - self.started:6.1f} s] {message}")

    def saturation_rate(self) -> float:
        """The worker's saturation throughput measured earlier in this run."""
        measured = self.results.get("saturation")
        if not isinstance(measured, Saturation):
            raise RuntimeError("needs the saturation scenario's throughput, which failed")
        return measured.worker_rate

    async def run(self, name: str, spec: RunSpec) -> RunResult:
        self.say(f"{name}: {spec.commands:,} commands")
        result = await self.bench.run(name, spec)
        self.say(
            f"{name}: {result.cmds_per_second:,.0f} cmds/s, "
            f"{result.cpu_seconds_per_1000:.2f} CPU s/1000, outcomes {result.outcomes}"
        )
        if result.unexpected is not None:
            raise UnexpectedOutcomes(
                f"{name}: {result.unexpected}; see {self.bench.logs / name}.log"
            )
        return result


async def startup(session: Session) -> ScenarioResult:
    session.say(f"startup: {session.starts} starts")
    seconds = await session.bench.start_times(session.starts, SATURATION)
    return Startup(seconds, statistics.median(seconds), max(seconds))


async def saturation(session: Session) -> ScenarioResult:
    spec = dataclasses.replace(SATURATION, commands=session.commands or SATURATION.commands)
    runs = []
    for n, program in enumerate(SATURATION_ORDER, 1):
        program_spec = dataclasses.replace(spec, program=program)
        runs.append(await session.run(f"saturation-{n}-{program}", program_spec))
    return Saturation.of(runs)


async def tracing(session: Session) -> ScenarioResult:
    """The saturation load with tracing off and on: every command a trace of its own (no
    traceparent comes in), sampled by ratio, exported over OTLP/HTTP to a receiver in this
    process that decodes each request and counts its spans."""
    receiver = session.receiver
    if receiver is None:
        raise RuntimeError("the tracing scenario needs the OTLP receiver")
    spec = dataclasses.replace(SATURATION, commands=session.commands or SATURATION.commands)
    runs = []
    for n, ratio in enumerate(TRACING_ORDER, 1):
        environment = (
            {}
            if ratio is None
            else {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(ratio),
            }
        )
        label = "off" if ratio is None else f"ratio-{ratio}"
        before = receiver.span_count
        result = await session.run(
            f"tracing-{n}-{label}", dataclasses.replace(spec, environment=environment)
        )
        # The worker exported what it still held when it stopped, before it exited.
        runs.append(TracedRun(ratio, result, receiver.span_count - before))
        session.say(f"tracing-{n}-{label}: {runs[-1].spans / result.commands:.2f} spans/command")
    return TracingCost.of(
        runs,
        noop_tracing.seconds_per_command(),
        noop_tracing.seconds_per_command(with_traceparent=True),
    )


async def profile(session: Session) -> ScenarioResult:
    raw = session.bench.logs / "profile-worker.pyspy"
    spec = dataclasses.replace(
        SATURATION, commands=session.commands or SATURATION.commands, profile_to=raw
    )
    worker = await session.run("profile-worker", spec)
    output = session.bench.logs.parent / "profile.md"
    title = f"py-spy profile of the worker at saturation ({spec.commands:,} commands)"
    summary = write_summary(raw, output, title)
    working = max(1, summary.samples - summary.idle)
    own = [(frame, n / working) for frame, n in summary.own]
    shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    return Profile(worker, str(shown), summary.samples, own)


async def redis(session: Session) -> ScenarioResult:
    spec = dataclasses.replace(
        SATURATION, commands=session.commands or SATURATION.commands, redis_url=session.redis_url
    )
    runs = []
    for n, (program, shared) in enumerate(REDIS_ORDER, 1):
        run_spec = dataclasses.replace(
            spec, program=program, redis_url=spec.redis_url if shared else None
        )
        label = f"{program}-redis" if shared else program
        runs.append(await session.run(f"redis-{n}-{label}", run_spec))
    return RedisMode.of(runs)


async def realistic(session: Session) -> ScenarioResult:
    rate = session.saturation_rate() / 2
    commands = session.commands or min(10_000, max(1_000, round(rate * REALISTIC_SECONDS)))
    spec = RunSpec(
        "worker",
        commands,
        tenants=REALISTIC_TENANTS,
        simulator_latency=REALISTIC_LATENCY,
        # Twice what the rate and the latency keep busy, and each tenant at most half its
        # limit: neither limit is what is measured here.
        in_flight=min(1024, max(64, math.ceil(2 * rate * REALISTIC_LATENCY))),
        rate_limit=min(3000, max(100, math.ceil(2 * rate / REALISTIC_TENANTS))),
        paced_rate=rate,
        warmup_seconds=min(REALISTIC_WARMUP, commands / rate / 10),
    )
    floor = await session.run("realistic-floor", dataclasses.replace(spec, program="floor"))
    worker = await session.run("realistic-worker", spec)
    extra = worker.latency_ms["p99"] - floor.latency_ms["p99"]
    return Realistic(floor, worker, extra)


def achieved_rate(arrivals: Sequence[float]) -> float:
    """Arrivals per second over the whole one-second windows that follow the first arrival."""
    windows = math.floor(arrivals[-1] - arrivals[0])
    if windows < 1:
        return math.nan
    end = arrivals[0] + windows
    return sum(1 for t in arrivals if t < end) / windows


def busiest_window(arrivals: Sequence[float], window: float = 1.0) -> tuple[int, float]:
    """The most arrivals in any half-open interval of ``window`` seconds (sorted input), and
    when that interval starts, in seconds after the first arrival."""
    best, best_start, start = 0, 0.0, 0
    for end, t in enumerate(arrivals):
        while t - arrivals[start] >= window:
            start += 1
        if end - start + 1 > best:
            best, best_start = end - start + 1, arrivals[start] - arrivals[0]
    return best, best_start


async def rate_bound(session: Session) -> ScenarioResult:
    spec = RunSpec(
        "worker",
        session.commands or RATE_BOUND_COMMANDS,
        tenants=1,
        simulator_latency=0.0,
        in_flight=SATURATION.in_flight,
        rate_limit=RATE_LIMIT,
    )
    worker = await session.run("rate-bound-worker", spec)
    arrivals = await session.bench.simulator.invite_arrivals()
    busiest, busiest_at = busiest_window(arrivals)
    rate = achieved_rate(arrivals)
    return RateBound(worker, RATE_LIMIT, len(arrivals), rate, busiest, busiest_at)


async def backlog(session: Session) -> ScenarioResult:
    commands, budget = session.commands, None
    if commands is None:
        affordable = session.saturation_rate() * BACKLOG_SECONDS
        commands = min(BACKLOG_COMMANDS, max(2, math.floor(affordable / 10_000)) * 10_000)
        if commands < BACKLOG_COMMANDS:
            budget = BACKLOG_SECONDS
            session.say(
                f"backlog: {commands:,} commands, what {BACKLOG_SECONDS:.0f} s at the "
                f"saturation rate allow, instead of {BACKLOG_COMMANDS:,}"
            )
    settled = BACKLOG_SETTLED if commands >= 2 * BACKLOG_SETTLED else commands // 10
    every_tenth = (commands * n // 10 for n in range(1, 11))
    rss_at = tuple(sorted({settled, *every_tenth}))
    spec = dataclasses.replace(SATURATION, commands=commands, rss_at=rss_at)
    worker = await session.run("backlog-worker", spec)
    first, last = worker.rss_by_outcomes[settled], worker.rss_by_outcomes[commands]
    return Backlog(worker, settled, commands, first, last, last / first - 1, budget)


_SCENARIO_FUNCTIONS: dict[str, Scenario] = {
    "startup": startup,
    "saturation": saturation,
    "tracing": tracing,
    "profile": profile,
    "redis": redis,
    "realistic": realistic,
    "rate-bound": rate_bound,
    "backlog": backlog,
}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"kind": type(value).__name__, **fields}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


async def measure(
    selected: Sequence[str],
    commands: int | None,
    starts: int,
    logs: Path,
    redis_url: str = REDIS_URL,
) -> dict[str, ScenarioResult]:
    """Run the ``selected`` scenarios in order; raises `UnexpectedOutcomes` at the first run
    whose outcomes are not the expected ones."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    with tempfile.TemporaryDirectory(prefix="bench-simulator-") as directory:
        async with (
            connection,
            SimulatorProcess(Path(directory), logs) as sim,
            OtlpReceiver(keep=False) as receiver,
        ):
            bench = Bench(connection, sim, logs)
            session = Session(bench, commands, starts, redis_url, receiver)
            for name in selected:
                session.results[name] = await session.measure(name)
            return session.results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="The invite worker's benchmark; see benchmarks/run.py for the scenarios.",
    )
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="repeatable (default: all)"
    )
    parser.add_argument(
        "--commands", type=int, help="commands per run in every scenario, for a quick run"
    )
    parser.add_argument("--starts", type=int, default=5, help="start-ups measured (default: 5)")
    parser.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="the Redis server of the redis scenario (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where latest.json, latest.md and the programs' logs go (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.commands is not None and args.commands < 10:
        parser.error("--commands must be at least 10")
    if args.starts < 1:
        parser.error("--starts must be at least 1")
    chosen = set(args.scenario or SCENARIOS)
    if chosen & {"realistic", "backlog"}:
        chosen.add("saturation")
    selected = [name for name in SCENARIOS if name in chosen]
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.run", *given])
    logs = args.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started_at, started = datetime.now(UTC), time.monotonic()
    try:
        results = asyncio.run(measure(selected, args.commands, args.starts, logs, args.redis_url))
    except UnexpectedOutcomes as exc:
        _progress(f"FAIL: {exc}\nNo results written: figures of such a run mean nothing.")
        return 1
    minutes = (time.monotonic() - started) / 60
    found = targets(results)
    markdown = (
        f"`{command}` ({started_at:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores shared with "
        f"RabbitMQ and the simulator, {minutes:.1f} min):\n\n{table(results, found)}\n"
    )
    document = {
        "command": command,
        "started_at": started_at.isoformat(),
        "duration_seconds": minutes * 60,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "scenarios": _jsonable(results),
        "targets": _jsonable(found),
    }
    (args.output / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.output / "latest.md").write_text(markdown)
    print(markdown)
    return 1 if any(isinstance(result, Failed) for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What each scenario found, and the short markdown table of it with the targets' PASS/FAIL."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from benchmarks.measure import RunResult

MIB = 1024 * 1024
#: The worker's saturation throughput over the floor's, at least.
SATURATION_TARGET = 0.9
#: In Redis mode, over the floor's (which has no Redis), at least.
REDIS_TARGET = 0.75
#: The worker's p99 latency at half of its saturation load over the floor's, at most.
ADDED_P99_TARGET_MS = 20.0


@dataclass(frozen=True)
class Saturation:
    runs: list[RunResult]
    """In the order they ran: floor, worker, worker, floor, so that a drift in the machine's
    load over the scenario weighs on both alike."""
    floor_rate: float
    worker_rate: float
    ratio: float
    """The worker's mean throughput over the floor's."""

    @classmethod
    def of(cls, runs: list[RunResult]) -> Saturation:
        floor = statistics.mean(r.cmds_per_second for r in runs if r.program == "floor")
        worker = statistics.mean(r.cmds_per_second for r in runs if r.program == "worker")
        return cls(runs, floor, worker, worker / floor)


@dataclass(frozen=True)
class Realistic:
    floor: RunResult
    worker: RunResult
    added_p99_over_floor_ms: float


@dataclass(frozen=True)
class RedisMode:
    runs: list[RunResult]
    """In the order they ran: floor, worker, worker in Redis mode twice, worker, floor, so that
    a drift in the machine's load over the scenario weighs on all three alike."""
    floor_rate: float
    without_rate: float
    """The worker's mean throughput without Redis."""
    redis_rate: float
    """The worker's mean throughput in Redis mode."""
    ratio: float
    """In Redis mode over the floor's (which has no Redis)."""
    ratio_to_worker_without: float
    """In Redis mode over the worker's without Redis: what the shared state costs."""

    @classmethod
    def of(cls, runs: list[RunResult]) -> RedisMode:
        floor = statistics.mean(r.cmds_per_second for r in runs if r.program == "floor")
        workers = [r for r in runs if r.program == "worker"]
        without = statistics.mean(r.cmds_per_second for r in workers if r.redis is None)
        shared = statistics.mean(r.cmds_per_second for r in workers if r.redis is not None)
        return cls(runs, floor, without, shared, shared / floor, shared / without)


@dataclass(frozen=True)
class RateBound:
    worker: RunResult
    limit: int
    invites: int
    achieved_rate: float
    """Invites per second, averaged over the whole one-second windows from the first arrival."""
    busiest_window: int
    """Most invite arrivals in any one-second window."""
    busiest_window_at: float
    """Where that window starts: seconds after the first arrival."""


@dataclass(frozen=True)
class Backlog:
    worker: RunResult
    rss_from: int
    rss_to: int
    rss_from_bytes: int
    rss_to_bytes: int
    rss_growth: float
    budget_seconds: float | None
    """Set when the worker was too slow for the full backlog in this many seconds."""


@dataclass(frozen=True)
class Startup:
    seconds: list[float]
    median_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class TracedRun:
    sampler_ratio: float | None
    """OTEL_TRACES_SAMPLER_ARG of parentbased_traceidratio; None: tracing off (no exporter)."""
    run: RunResult
    spans: int
    """Spans the OTLP receiver got from this run."""


@dataclass(frozen=True)
class TracingCost:
    runs: list[TracedRun]
    """Off, ratio 1.0, ratio 0.1, then the same in reverse: a drift weighs on each alike."""
    rates: dict[str, float]
    """Mean throughput by setting ("off", "1.0", "0.1")."""
    cpu_per_1000: dict[str, float]
    """Mean CPU seconds per 1,000 commands by setting."""
    noop_us_per_command: float
    """The no-op tracer's calls for one command, CPU microseconds (`benchmarks.noop_tracing`)."""
    noop_traceparent_us_per_command: float
    """The same for a command that carries a traceparent (read, and carried to its outcome)."""

    @classmethod
    def of(cls, runs: list[TracedRun], noop: float, noop_traced: float) -> TracingCost:
        settings = {_setting(r.sampler_ratio) for r in runs}
        rates = {
            k: statistics.mean(
                r.run.cmds_per_second for r in runs if _setting(r.sampler_ratio) == k
            )
            for k in settings
        }
        cpu = {
            k: statistics.mean(
                r.run.cpu_seconds_per_1000 for r in runs if _setting(r.sampler_ratio) == k
            )
            for k in settings
        }
        return cls(runs, rates, cpu, noop * 1e6, noop_traced * 1e6)


def _setting(ratio: float | None) -> str:
    return "off" if ratio is None else f"{ratio:.1f}"


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Profile:
    worker: RunResult
    """The profiled run: py-spy shared the cores, so its figures are not compared."""
    path: str
    """The summary's file (markdown), beside the results."""
    samples: int
    own: list[tuple[str, float]]
    """The frames with the most own samples, and their share of the working samples."""


ScenarioResult = (
    Saturation
    | RedisMode
    | Realistic
    | RateBound
    | Backlog
    | Startup
    | TracingCost
    | Profile
    | Failed
)


@dataclass(frozen=True)
class Target:
    target: str
    measured: str
    passed: bool


def targets(scenarios: Mapping[str, ScenarioResult]) -> list[Target]:
    """The issue's targets, for the scenarios that ran without an error."""
    found: list[Target] = []
    for result in scenarios.values():
        match result:
            case Saturation(ratio=ratio, worker_rate=worker, floor_rate=floor):
                found.append(
                    Target(
                        f"Saturation throughput ≥ {SATURATION_TARGET} x floor "
                        "(means of 2 runs each)",
                        f"{ratio:.2f} x ({worker:,.0f} / {floor:,.0f} cmds/s)",
                        ratio >= SATURATION_TARGET,
                    )
                )
            case RedisMode(ratio=ratio, redis_rate=shared, floor_rate=floor):
                found.append(
                    Target(
                        f"Redis mode throughput ≥ {REDIS_TARGET} x floor (means of 2 runs each)",
                        f"{ratio:.2f} x ({shared:,.0f} / {floor:,.0f} cmds/s); "
                        f"{result.ratio_to_worker_without:.2f} x the worker without Redis "
                        f"({result.without_rate:,.0f} cmds/s)",
                        ratio >= REDIS_TARGET,
                    )
                )
            case RateBound(limit=limit, achieved_rate=achieved, busiest_window=busiest):
                found.append(
                    Target(
                        f"Rate-bound: achieved rate ≥ 0.97 x {limit}/s",
                        f"{achieved:.1f}/s ({achieved / limit:.3f} x)",
                        achieved >= 0.97 * limit,
                    )
                )
                found.append(
                    Target(
                        f"Rate-bound: no one-second window above {limit}",
                        f"busiest window {busiest}",
                        busiest <= limit,
                    )
                )
            case Realistic(worker=worker, floor=floor, added_p99_over_floor_ms=extra):
                found.append(
                    Target(
                        "p99 latency at half of saturation load ≤ the floor's p99 "
                        f"+ {ADDED_P99_TARGET_MS:.0f} ms",
                        f"{extra:+.1f} ms (worker {worker.latency_ms['p99']:.1f} ms, floor "
                        f"{floor.latency_ms['p99']:.1f} ms; p99.9 worker "
                        f"{worker.latency_ms['p99.9']:.1f} ms, floor "
                        f"{floor.latency_ms['p99.9']:.1f} ms)",
                        extra <= ADDED_P99_TARGET_MS,
                    )
                )
            case Backlog():
                found.append(
                    Target(
                        f"RSS growth < 10% from {result.rss_from:,} to {result.rss_to:,} commands",
                        f"{result.rss_from_bytes / MIB:.1f} → {result.rss_to_bytes / MIB:.1f} MiB "
                        f"({result.rss_growth:+.1%})",
                        result.rss_growth < 0.10,
                    )
                )
            case Startup(max_seconds=worst, median_seconds=median):
                found.append(
                    Target(
                        f"Start to ready ≤ 2 s (slowest of {len(result.seconds)})",
                        f"{worst:.2f} s (median {median:.2f} s)",
                        worst <= 2.0,
                    )
                )
    return found


def _number(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _run_row(scenario: str, run: RunResult, ratio: float | None, note: str) -> str:
    # A pre-loaded run's publish-to-outcome time is queueing; it stays in the JSON only.
    latency = run.latency_ms if run.paced_rate is not None else {}
    return _row(
        scenario,
        run.program,
        f"{run.commands:,}",
        _number(run.cmds_per_second),
        "-" if ratio is None else f"{ratio:.2f}",
        _number(run.cpu_seconds_per_1000, 2),
        *(_number(latency.get(p, math.nan), 1) for p in ("p50", "p95", "p99", "p99.9")),
        _number(run.peak_rss_bytes / MIB, 1),
        note,
    )


def _cpu_note(run: RunResult) -> str:
    return (
        f"CPU cores: {run.program} {run.cpu_cores:.2f}, simulator {run.simulator_cpu_cores:.2f}, "
        f"broker {_number(run.broker_cpu_cores, 2)}, harness {run.harness_cpu_cores:.2f}, "
        f"machine {run.machine_busy_cores:.2f}"
    )


def redis_note(run: RunResult) -> str:
    """Per command: the Redis server's commands (and the busiest ones), the worker's own count
    of round trips, the server's CPU."""
    if run.redis is None:
        return "no Redis"
    use, per = run.redis, 1 / run.commands
    busiest = ", ".join(f"{name} {count * per:.2f}" for name, count in list(use.calls.items())[:4])
    trips = "n/a" if run.redis_round_trips is None else f"{run.redis_round_trips * per:.2f}"
    return (
        f"Redis commands/command {use.commands * per:.2f} (server-wide INFO difference"
        f"{': ' + busiest if busiest else ''}); round trips/command {trips}; "
        f"Redis CPU s/1000 {_number(use.cpu_seconds * per * 1000, 2)}; "
        f"keys under {use.key_prefix} after the stop: {use.keys_left:,}, deleted"
    )


def _rows(name: str, result: ScenarioResult) -> list[str]:  # noqa: PLR0911 - one per kind
    match result:
        case Saturation(runs=runs, floor_rate=floor_rate):
            return [
                _run_row(
                    f"saturation {n}/{len(runs)}: latency 0, {run.tenants} tenants",
                    run,
                    run.cmds_per_second / floor_rate,
                    _cpu_note(run),
                )
                for n, run in enumerate(runs, 1)
            ]
        case Profile(worker=worker, path=path, own=own):
            frames = ", ".join(f"{frame} {share:.0%}" for frame, share in own[:3])
            note = f"sampled by py-spy, not compared; top own frames: {frames}; see {path}"
            return [_run_row(f"profile: latency 0, {worker.tenants} tenants", worker, None, note)]
        case RedisMode(runs=runs, floor_rate=floor_rate):
            return [
                _run_row(
                    f"redis {n}/{len(runs)}: latency 0, {run.tenants} tenants"
                    + (", Redis mode" if run.redis is not None else ""),
                    run,
                    run.cmds_per_second / floor_rate,
                    (redis_note(run) + "; " if run.redis is not None else "no Redis; ")
                    + _cpu_note(run),
                )
                for n, run in enumerate(runs, 1)
            ]
        case Realistic(floor=floor, worker=worker, added_p99_over_floor_ms=extra):
            latency = worker.simulator_latency_ms
            label = (
                f"realistic: latency {latency:.0f} ms, "
                f"{worker.tenants} tenants, paced {worker.paced_rate or 0:.0f}/s"
            )
            warmup = f"first {worker.warmup_seconds:.1f} s not counted"
            return [
                _run_row(label, floor, None, f"latency less {latency:.0f} ms, {warmup}"),
                _run_row(label, worker, None, f"p99 {extra:+.1f} ms over the floor's; {warmup}"),
            ]
        case RateBound(worker=worker, limit=limit, achieved_rate=rate, busiest_window=busiest):
            note = (
                f"invites {rate:.1f}/s; busiest one-second window {busiest}, from "
                f"+{result.busiest_window_at:.2f} s; {_cpu_note(worker)}"
            )
            return [_run_row(f"rate-bound: 1 tenant, {limit}/s", worker, None, note)]
        case Backlog(worker=worker, budget_seconds=budget):
            samples = ", ".join(
                f"{count:,}: {rss / MIB:.1f}" for count, rss in worker.rss_by_outcomes.items()
            )
            label = f"backlog: {worker.commands:,} queued"
            if budget is not None:
                label += f" (what {budget / 60:.0f} min at the saturation rate allow)"
            return [_run_row(label, worker, None, f"RSS MiB after n outcomes: {samples}")]
        case Startup(seconds=seconds, median_seconds=median, max_seconds=worst):
            each = ", ".join(f"{s:.2f}" for s in seconds)
            note = f"start → ready: median {median:.2f} s, max {worst:.2f} s ({each})"
            return [_row(f"start-up: {len(seconds)} starts", "worker", *[""] * 9, note)]
        case TracingCost(runs=runs, rates=rates):
            return _tracing_rows(result, runs, rates["off"])
        case Failed(error=error):
            return [_row(name, "-", *[""] * 9, f"ERROR: {error}")]


def _tracing_rows(result: TracingCost, runs: list[TracedRun], off: float) -> list[str]:
    rows = []
    for n, traced in enumerate(runs, 1):
        run = traced.run
        setting = (
            "tracing off"
            if traced.sampler_ratio is None
            else f"tracing on, sampler ratio {traced.sampler_ratio:.1f}"
        )
        note = f"spans/command {traced.spans / run.commands:.2f}; {_cpu_note(run)}"
        rows.append(
            _run_row(
                f"tracing {n}/{len(runs)}: latency 0, {run.tenants} tenants, {setting}",
                run,
                run.cmds_per_second / off,
                note + ("; x = over tracing off" if n == 1 else ""),
            )
        )
    rows.append(
        _row(
            "tracing: the no-op tracer's calls per command",
            "worker",
            *[""] * 3,
            f"{result.noop_us_per_command / 1000:.4f}",
            *[""] * 5,
            f"{result.noop_us_per_command:.1f} µs of CPU per command without a traceparent, "
            f"{result.noop_traceparent_us_per_command:.1f} µs with one (timed in a loop: "
            "benchmarks/noop_tracing.py)",
        )
    )
    return rows


def table(scenarios: Mapping[str, ScenarioResult], found: list[Target]) -> str:
    """Markdown: one row per measured run, then the targets."""
    lines = [
        "| Scenario | Program | Commands | cmds/s | x floor | CPU s/1000 | p50 ms | p95 ms "
        "| p99 ms | p99.9 ms | Peak RSS MiB | Notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, result in scenarios.items():
        lines += _rows(name, result)
    lines += ["", "| Target | Measured | Result |", "|---|---|---|"]
    lines += [_row(t.target, t.measured, "PASS" if t.passed else "FAIL") for t in found]
    return "\n".join(lines)

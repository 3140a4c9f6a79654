"""The benchmark (`benchmarks/`), in small: every scenario through the real measuring code,
the real worker and floor processes, the local RabbitMQ, Redis and the simulator."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import broker, measure, run
from benchmarks.redis_server import RedisServer, RedisUse

pytestmark = pytest.mark.integration

#: Commands per measured run: enough for every scenario's arithmetic, few enough to be quick.
COMMANDS = 30


def _runs(value: Any) -> Iterator[dict[str, Any]]:
    """Every measured run (worker or floor) in a scenario of ``latest.json``."""
    if isinstance(value, dict):
        if "program" in value and "outcomes" in value:
            yield value
        for item in value.values():
            yield from _runs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _runs(item)


def _ready_line(log: Path) -> dict[str, Any]:
    """The `worker.ready` line a program (worker or floor) wrote to its log."""
    for raw in log.read_text().splitlines():
        if '"worker.ready"' in raw:
            line: dict[str, Any] = json.loads(raw)
            return line
    raise AssertionError(f"no worker.ready line in {log}")


@pytest.mark.timeout(300)
def test_every_benchmark_scenario_gets_an_accepted_outcome_for_each_command(
    rabbitmq: str, tmp_path: Path
) -> None:
    code = run.main(["--commands", str(COMMANDS), "--starts", "1", "--output", str(tmp_path)])

    assert code == 0
    document = json.loads((tmp_path / "latest.json").read_text())
    scenarios = document["scenarios"]
    assert set(scenarios) == set(run.SCENARIOS)
    for name, scenario in scenarios.items():
        assert scenario["kind"] != "Failed", f"{name}: {scenario}"
        measured = list(_runs(scenario))
        assert measured or name == "startup", name
        for result in measured:
            assert result["outcomes"] == {"invite.accepted": result["commands"]}, (
                f"{name} ({result['program']}): {result['outcomes']}"
            )
            assert result["duplicate_outcomes"] == 0, name
            # CPU per command, for the worker and the floor alike.
            cpu = result["cpu_seconds_per_1000"]
            assert cpu is not None, name
            assert math.isfinite(cpu), name
            assert cpu >= 0, name

    # Tracing on exported every command's spans (ratio 1.0: five per command); off, none.
    traced = {run["sampler_ratio"]: run for run in scenarios["tracing"]["runs"]}
    assert traced[None]["spans"] == 0
    assert traced[1.0]["spans"] == 5 * traced[1.0]["run"]["commands"]
    assert "no-op tracer" in (tmp_path / "latest.md").read_text()

    # The floor runs on the event loop the worker runs on by default: uvloop speeds aio-pika
    # and aiohttp in both, and the ratio compares like with like.
    logs = [
        log for log in (tmp_path / "logs").glob("*.log") if log.stem.endswith(("-worker", "-floor"))
    ]
    loops = {log.stem: _ready_line(log)["event_loop"] for log in logs}
    assert {stem.rsplit("-", 1)[1] for stem in loops} == {"worker", "floor"}, sorted(loops)
    assert set(loops.values()) == {"uvloop"}, loops

    # The profile of the worker at saturation: its top frames, written beside the results.
    profile = (tmp_path / "profile.md").read_text()
    assert "| Own % | Frame" in profile
    assert "| Total % | Frame" in profile

    # The redis scenario: the floor and the worker without Redis, and Redis mode, twice each.
    redis = scenarios["redis"]
    runs = redis["runs"]
    modes = [(r["program"], r["redis"] is not None) for r in runs]
    assert modes == list(run.REDIS_ORDER)
    for use in (r["redis"] for r in runs if r["redis"] is not None):
        assert use["url"] == run.REDIS_URL
        assert use["key_prefix"].startswith("bench-")
        assert use["key_prefix"].endswith(":")
        assert use["commands"] >= 0
        assert RedisServer(run.REDIS_URL).keys(use["key_prefix"]) == []
    assert redis["ratio"] > 0
    assert redis["ratio_to_worker_without"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    assert "Redis commands/command" in markdown
    assert "round trips/command" in markdown


@pytest.mark.timeout(120)
def test_a_benchmark_run_with_unexpected_outcomes_exits_1_and_writes_no_results(
    rabbitmq: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker serving one tenant of the saturation scenario's four: three in four commands
    # are rejected, without a token request or a Graph call.
    narrowed = dataclasses.replace(
        run.SATURATION, environment={"ALLOWED_TENANT_IDS": broker.TENANTS[0]}
    )
    monkeypatch.setattr(run, "SATURATION", narrowed)
    earlier = tmp_path / "latest.md"
    earlier.write_text("the results of an earlier run\n")

    code = run.main(["--scenario", "saturation", "--commands", "20", "--output", str(tmp_path)])

    assert code == 1
    assert earlier.read_text() == "the results of an earlier run\n"
    assert not (tmp_path / "latest.json").exists()


def test_redis_readings_count_other_clients_commands_and_the_prefix_is_deleted() -> None:
    server = RedisServer(run.REDIS_URL)
    prefix = f"bench-test-{uuid.uuid4().hex[:8]}:"
    before = server.stats()
    client = [shutil.which("redis-cli") or "redis-cli", "-n", "11"]
    for n in range(5):
        # Another client than the readings': each connection SELECTs, then SETs.
        subprocess.run([*client, "SET", f"{prefix}{n}", "x"], check=True, capture_output=True)  # noqa: S603
    after = server.stats()

    # Other clients of a shared server may add more.
    use = RedisUse.between(run.REDIS_URL, prefix, before, after, len(server.keys(prefix)))
    assert use.commands >= 10
    assert use.calls["set"] >= 5
    assert use.keys_left == 5
    assert server.delete_prefix(prefix) == 5
    assert server.keys(prefix) == []


@pytest.mark.timeout(120)
def test_the_redis_scenario_reads_the_round_trips_counter_from_the_workers_metrics(
    rabbitmq: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A counter the worker has today, one per command: the same reading as the round trips'.
    monkeypatch.setattr(measure, "REDIS_ROUND_TRIPS_METRIC", "invite_outcomes_total")

    code = run.main(["--scenario", "redis", "--commands", "20", "--output", str(tmp_path)])

    assert code == 0
    document = json.loads((tmp_path / "latest.json").read_text())
    runs = document["scenarios"]["redis"]["runs"]
    assert [r["redis_round_trips"] for r in runs if r["redis"] is not None] == [20, 20]
    assert "round trips/command 1.00" in (tmp_path / "latest.md").read_text()

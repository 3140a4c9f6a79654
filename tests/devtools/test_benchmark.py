"""The benchmark (`benchmarks/`), in small: every scenario through the real measuring code,
the real worker and floor processes, the local RabbitMQ and the simulator."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import broker, run

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

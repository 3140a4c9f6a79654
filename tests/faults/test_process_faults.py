"""The worker process dying mid-run: SIGKILL (a crash), and SIGTERM (a deployment).

After a crash the broker redelivers what the dead process held, and the README allows Graph
to be called again for those commands (at-least-once): no more than the prefetch of commands,
each with one extra call, and their second outcome carries an event id of its own. A SIGTERM
drains: in-flight commands finish within SHUTDOWN_GRACE_PERIOD, the process exits 0, and a
second worker finishes the rest without duplicates.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.faults.harness import EXIT_SLACK, Scenario
from worker.devtools.simulator import FaultRule, SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 200
LATENCY = 0.2


@pytest.mark.timeout(90)
async def test_a_worker_killed_mid_run_is_replaced_and_only_its_in_flight_commands_repeat(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "SIGKILL mid-run, then a new worker",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
    ) as scenario:
        await scenario.publish_commands(COMMANDS)
        simulator.latency = LATENCY
        first = await scenario.start_worker()
        await scenario.wait_for_outcomes(COMMANDS // 3)
        scenario.crash_worker(first)
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    held = scenario.settings.prefetch_count
    # The dead process's commands count its Graph calls only in the simulator's books.
    assert not books.check(max_calls=2, new_id_duplicates=held, attempts_match_calls=False)
    repeated = [key for key, calls in books.calls_by_command().items() if calls > 1]
    assert len(repeated) <= held
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}
    for key in books.sent:
        assert books.outcomes_for(key)[-1].data["attempts"] >= 1


@pytest.mark.timeout(90)
async def test_sigterm_mid_run_drains_exits_zero_in_time_and_a_second_worker_finishes(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "SIGTERM mid-run, then a new worker",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
    ) as scenario:
        sent = await scenario.publish_commands(COMMANDS, tenants=10)
        # Every seventh command is throttled once: at any moment some wait in the process for
        # their Retry-After, and SIGTERM must hand those to a delay queue, not drop them.
        throttled = {s.key for s in sent[3::7]}
        simulator.set_faults(
            [
                FaultRule(call_id=s.call_id, status=429, retry_after="1", remaining=1)
                for s in sent
                if s.key in throttled
            ]
        )
        simulator.latency = LATENCY
        first = await scenario.start_worker()
        await scenario.wait_for_outcomes(COMMANDS // 3)
        since = first.send(signal.SIGTERM)
        grace = scenario.settings.shutdown_grace_period
        code = await first.wait_exit(grace + EXIT_SLACK, since=since)
        assert code == 0, f"exit code {code} ({grace + EXIT_SLACK}s after SIGTERM)"
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    [stopped] = first.events("worker.stopped")
    handed_back = int(stopped["unsettled_handed_back"])
    # Abandoned commands (none, unless the grace period ran out) may be sent to Graph again.
    bounds = {key: (2 if key in throttled else 1) + (handed_back > 0) for key in books.sent}
    assert not books.check(
        max_calls=bounds,
        new_id_duplicates=handed_back,
        attempts_match_calls=handed_back == 0,
    )
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}
    for key in throttled:
        assert [c.status for c in books.calls_for(key)][:2] == [429, 200]

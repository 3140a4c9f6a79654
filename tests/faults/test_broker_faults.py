"""The broker misbehaving mid-run: every connection closed by force, and a broker restart.

The worker's robust connection must come back and finish the backlog. The README allows
duplicate outcomes around a lost connection only in one shape: an outcome the broker did not
confirm is published again with the same event id (the process remembers it), so Graph is not
called again and no second event id appears.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, rabbitmqctl, restart_broker_app
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 200
#: Slow enough that the fault lands while commands are in flight.
LATENCY = 0.2


@pytest.mark.timeout(90)
async def test_closing_every_connection_mid_run_loses_no_command_and_calls_graph_once_each(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "rabbitmqctl close_all_connections",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
    ) as scenario:
        await scenario.publish_commands(COMMANDS)
        simulator.latency = LATENCY
        worker = await scenario.start_worker()
        await scenario.wait_for_outcomes(COMMANDS // 3)
        # The suite's virtual host only: other users of the local broker keep their connections.
        await asyncio.to_thread(
            rabbitmqctl, "close_all_connections", "-p", fault_vhost, "--limit", "1000", "fault test"
        )
        books = await scenario.finish(timeout=30)

    in_flight = scenario.settings.prefetch_count
    assert not books.check(max_calls=1, same_id_duplicates=in_flight)
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}
    assert worker.events("broker.connection_lost"), "the connection was not closed under it"
    assert worker.events("broker.reconnected")


@pytest.mark.timeout(120)
async def test_a_broker_restart_mid_run_loses_no_command_and_calls_graph_once_each(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "RabbitMQ restart",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
    ) as scenario:
        await scenario.publish_commands(COMMANDS)
        simulator.latency = LATENCY
        worker = await scenario.start_worker()
        await scenario.wait_for_outcomes(COMMANDS // 3)
        await restart_broker_app()
        books = await scenario.finish(timeout=30)

    in_flight = scenario.settings.prefetch_count
    assert not books.check(max_calls=1, same_id_duplicates=in_flight)
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}
    assert worker.events("broker.reconnected")
    assert scenario.broker.reconnects >= 1, "the test's own connection never saw the restart"

"""Commands whose ids do not fit an AMQP short string, thrown at the real worker process.

A commandId of 256 ASCII characters, or of 200 two-byte ones, cannot be an outcome's
`correlation_id` (255 bytes at most). Each such command must still be rejected with exactly one
outcome, correlated by its message_id, and dead-lettered once; no delivery may stay
unacknowledged holding a prefetch slot, and a valid command sent after more of them than the
prefetch is still accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, Sent
from tests.support.queues import wait_for_counts
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

LONG_IDS = 75


@pytest.mark.timeout(120)
async def test_long_ids_are_each_rejected_once_and_leave_nothing_unacknowledged(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "long ids", amqp_url=amqp_url, simulator=simulator, directory=tmp_path
    ) as scenario:
        # More long ids than the prefetch (2 x GRAPH_MAX_IN_FLIGHT = 16 here, 64 by default).
        for index in range(LONG_IDS):
            command_id = "a" * 256 if index % 2 else "é" * 200
            body = json.dumps({"commandId": command_id, "callId": "x"}).encode()
            key = f"long-{index:03d}"
            await scenario.publish(Sent(key, key, body, "application/json"))
        [valid] = await scenario.publish_commands(1)
        worker = await scenario.start_worker()
        await scenario.wait_for_outcomes(LONG_IDS + 1, timeout=60)
        counts = await wait_for_counts(
            scenario.settings.command_queue, (0, 0), timeout=20, vhost=fault_vhost
        )
        books = await scenario.finish(timeout=30)

    assert counts == (0, 0), "(ready, unacknowledged) in the command queue"
    assert not books.check(max_calls=1, dead_letters=LONG_IDS)
    assert books.first_outcome(valid.key).routing_key == "invite.accepted"
    long_outcomes = [o for o in books.outcomes if o.correlation_id != valid.key]
    assert {o.routing_key for o in long_outcomes} == {"invite.rejected"}
    assert {len(o.data["commandId"]) for o in long_outcomes} == {200, 256}
    assert {d.headers["x-invite-fault-reason"] for d in books.dead_letters} == {"rejected"}
    assert not worker.events("command.crashed")

"""A commandId reused for a different command, against the real worker process.

Reusing an idempotency key with other content is an upstream bug: the second command must
end `invite.rejected` ("commandId was already used for a different command"), be
dead-lettered, and cause no Graph call; the first command's outcome stands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, Sent
from tests.support.harness import command
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 20
REUSED = 10


@pytest.mark.timeout(120)
async def test_a_command_id_reused_for_another_command_is_rejected_without_a_graph_call(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "id reuse", amqp_url=amqp_url, simulator=simulator, directory=tmp_path
    ) as scenario:
        first = await scenario.publish_commands(COMMANDS)
        await scenario.start_worker()
        await scenario.wait_for_outcomes(COMMANDS, timeout=30)
        for sent in first[:REUSED]:
            call_id = f"other-{sent.call_id}"
            body = json.dumps(command(command_id=sent.key, call_id=call_id)).encode()
            await scenario.publish(
                Sent(sent.key, sent.key, body, "application/json", call_id, sent.key)
            )
        await scenario.wait_until(
            lambda: len(scenario.outcomes) >= COMMANDS + REUSED,
            timeout=30,
            what=f"{COMMANDS + REUSED} outcome events",
        )
        books = await scenario.finish(timeout=30)

    # Each reused id carries a second, rejected outcome of its own: allowed as new-id events;
    # that outcome says attempts=0 beside the first command's one call, hence no match check.
    assert not books.check(
        max_calls=1, new_id_duplicates=REUSED, dead_letters=REUSED, attempts_match_calls=False
    )
    assert len(simulator.invites) == COMMANDS
    for sent in first[:REUSED]:
        kinds = [o.routing_key for o in books.outcomes_for(sent.key)]
        assert kinds == ["invite.accepted", "invite.rejected"], sent.key
        rejected = books.outcomes_for(sent.key)[1]
        assert rejected.data["problems"] == [
            {"field": "commandId", "problem": "was already used for a different command"}
        ]
    for sent in first[REUSED:]:
        assert [o.routing_key for o in books.outcomes_for(sent.key)] == ["invite.accepted"]

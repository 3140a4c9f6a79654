"""Bodies far over MAX_COMMAND_BYTES against the real worker process: memory stays bounded.

AMQP hands the worker each message whole, so a 15 MiB body is in memory before
MAX_COMMAND_BYTES can refuse it; the broker's `max_message_size` is the place to cap it
(README, `k8s/README.md`). What the worker itself does: reject each one once, dead-letter it
through the broker without a copy of its own, and keep no more than the prefetched bodies in
memory (measured: a 484 MiB peak when each was copied to the dead-letter exchange, 362 MiB
without the copy, at a prefetch of 16; under the Deployment's 256 MiB only with the broker's
cap).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, Sent, memory_mib
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

BODIES = 20
BODY_BYTES = 15 * 1024 * 1024
#: Bounds the prefetched bodies plus one copy in assembly; a second copy per body (the
#: dead-letter republish) goes past it.
PEAK_LIMIT_MIB = 420


@pytest.mark.timeout(180)
async def test_twenty_bodies_of_15_mib_are_rejected_with_peak_memory_under_the_limit(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "20 bodies of 15 MiB", amqp_url=amqp_url, simulator=simulator, directory=tmp_path
    ) as scenario:
        filler = "x" * BODY_BYTES
        for index in range(BODIES):
            key = f"huge-{index:02d}"
            body = json.dumps({"commandId": key, "callId": "c", "pad": filler}).encode()
            await scenario.publish(Sent(key, key, body, "application/json"))
        [valid] = await scenario.publish_commands(1)
        worker = await scenario.start_worker()
        await scenario.wait_for_outcomes(BODIES + 1, timeout=120)
        peak = memory_mib(worker.pid, "VmHWM")
        books = await scenario.finish(timeout=60)

    print(f"\nworker peak RSS (VmHWM) {peak:.0f} MiB with {BODIES} bodies of 15 MiB")
    assert peak < PEAK_LIMIT_MIB
    assert not books.check(max_calls=1, dead_letters=BODIES)
    assert books.first_outcome(valid.key).routing_key == "invite.accepted"
    huge = [o for o in books.outcomes if o.correlation_id != valid.key]
    assert {o.routing_key for o in huge} == {"invite.rejected"}

"""Bodies far over MAX_COMMAND_BYTES against the real worker process: memory stays bounded.

AMQP hands the worker each message whole; the worker drops a body far over
MAX_COMMAND_BYTES frame by frame as it arrives (`worker.amqp.bodies`), rejects the command
once and lets the broker dead-letter the message it still holds. The broker's
`max_message_size` caps such bodies before they are sent at all (README, `k8s/README.md`).
Measured at a prefetch of 16: a 484 MiB peak when each body was assembled and copied to the
dead-letter exchange, 362 MiB assembled without the copy, and the worker's resting size when
dropped as they arrive.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, Sent, memory_mib
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

BODIES = 20
BODY_BYTES = 15 * 1024 * 1024
DEPLOYMENT = Path(__file__).parents[2] / "k8s" / "base" / "deployment.yaml"


def deployment_memory_limit_mib() -> int:
    """The worker container's memory limit in the Deployment (`limits: memory: NMi`)."""
    limits = DEPLOYMENT.read_text().split("limits:", 1)[1]
    match = re.search(r"memory:\s*(\d+)Mi", limits)
    assert match, "the Deployment sets a memory limit in Mi"
    return int(match.group(1))


@pytest.mark.timeout(180)
async def test_twenty_bodies_of_15_mib_are_rejected_with_peak_memory_under_the_limit(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "20 bodies of 15 MiB", amqp_url=amqp_url, simulator=simulator, directory=tmp_path
    ) as scenario:
        filler = "x" * BODY_BYTES
        sizes = set()
        for index in range(BODIES):
            key = f"huge-{index:02d}"
            body = json.dumps({"commandId": key, "callId": "c", "pad": filler}).encode()
            sizes.add(len(body))
            await scenario.publish(Sent(key, key, body, "application/json"))
        [valid] = await scenario.publish_commands(1)
        worker = await scenario.start_worker()
        await scenario.wait_for_outcomes(BODIES + 1, timeout=120)
        peak = memory_mib(worker.pid, "VmHWM")
        books = await scenario.finish(timeout=60)

    print(f"\nworker peak RSS (VmHWM) {peak:.0f} MiB with {BODIES} bodies of 15 MiB")
    # One assembled 15 MiB body per prefetch slot alone (16 x 15 MiB) is over the limit.
    assert peak < deployment_memory_limit_mib()
    assert not books.check(max_calls=1, dead_letters=BODIES)
    assert books.first_outcome(valid.key).routing_key == "invite.accepted"
    huge = [o for o in books.outcomes if o.correlation_id != valid.key]
    assert {o.routing_key for o in huge} == {"invite.rejected"}
    # Each rejection names the size the publisher sent, and the broker dead-lettered the
    # message whole although the worker kept none of it.
    for outcome in huge:
        assert any(f"body is {size} bytes" in json.dumps(outcome.event) for size in sizes)
    assert {len(letter.body) for letter in books.dead_letters} <= sizes
    assert all(
        letter.headers["x-death"][0]["reason"] == "rejected" for letter in books.dead_letters
    )

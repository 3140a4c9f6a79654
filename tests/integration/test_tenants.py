"""Many tenants, one worker: a throttled tenant does not take the others' capacity."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.conftest import make_settings
from tests.support.harness import TENANT_A, TENANT_B, Broker, command, running_worker
from worker.devtools.simulator import FaultRule, SimulatorThread
from worker.settings import Settings

pytestmark = pytest.mark.integration

TENANT_C = "33333333-3333-4333-8333-333333333333"
PER_TENANT = 60
RATE = 20


@dataclass(frozen=True)
class Figures:
    throughput: float
    p99: float


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def publish(
    broker: Broker, settings: Settings, tenants: list[str]
) -> dict[str, dict[str, float]]:
    """PER_TENANT commands for each tenant, interleaved; their publish times by tenant and id."""
    published: dict[str, dict[str, float]] = {tenant: {} for tenant in tenants}
    for _ in range(PER_TENANT):
        for tenant in tenants:
            command_id = str(uuid.uuid4())
            published[tenant][command_id] = time.monotonic()
            await broker.publish(settings, command(command_id=command_id, tenantId=tenant))
    return published


async def test_a_throttled_tenant_leaves_the_others_their_throughput_and_latency(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(
        simulator,
        ALLOWED_TENANT_IDS=f"{TENANT_A},{TENANT_B},{TENANT_C}",
        GRAPH_TENANT_RATE_LIMIT=RATE,
        GRAPH_MAX_IN_FLIGHT=16,
    )
    simulator.latency = 0.05

    async with running_worker(settings, broker) as (worker, collector):

        async def figures(published: dict[str, float], timeout: float = 30) -> Figures:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                arrived = {o.data["commandId"]: o.arrived for o in collector.outcomes}
                if all(c in arrived for c in published):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("outcomes missing")
            start = min(published.values())
            end = max(arrived[c] for c in published)
            latencies = [arrived[c] - t for c, t in published.items()]
            return Figures(len(published) / (end - start), p99(latencies))

        alone = await publish(broker, settings, [TENANT_B, TENANT_C])
        baseline = {t: await figures(alone[t]) for t in (TENANT_B, TENANT_C)}
        # Let the per-second windows of the first phase pass.
        await asyncio.sleep(1.2)

        simulator.set_faults([FaultRule(tenant_id=TENANT_A, status=429, retry_after="20")])
        crowded = await publish(broker, settings, [TENANT_A, TENANT_B, TENANT_C])
        during = {t: await figures(crowded[t]) for t in (TENANT_B, TENANT_C)}
        held_by_a = worker.handler.slots.held_by(TENANT_A)
        simulator.set_faults([])
        # A's commands wait in a delay queue for Retry-After, then all succeed.
        await figures(crowded[TENANT_A], timeout=60)

    for tenant in (TENANT_B, TENANT_C):
        ratio = during[tenant].throughput / baseline[tenant].throughput
        growth = during[tenant].p99 / baseline[tenant].p99
        print(
            f"tenant {tenant[:8]}: throughput {baseline[tenant].throughput:.1f} -> "
            f"{during[tenant].throughput:.1f}/s ({ratio:.2f}x), p99 {baseline[tenant].p99:.3f} -> "
            f"{during[tenant].p99:.3f} s ({growth:.2f}x)"
        )
        assert ratio >= 0.9
        assert growth <= 1.2
    assert held_by_a == 0
    by_id = {o.data["commandId"]: o for o in collector.outcomes}
    assert all(by_id[c].routing_key == "invite.accepted" for c in crowded[TENANT_A])
    a_calls = [i for i in simulator.invites if i.tenant_id == TENANT_A]
    # One 429 paused tenant A; its other commands waited in the broker without calling Graph.
    assert [i.status for i in a_calls].count(429) <= settings.graph_max_in_flight
    assert sorted(t.tenant_id for t in simulator.token_requests) == sorted(
        [TENANT_A, TENANT_B, TENANT_C]
    )

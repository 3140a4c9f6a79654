"""Delivery guarantees with the real broker: retries through delay queues, duplicates,
dead-letter headers and replay, health and metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import aio_pika
import httpx
import pytest

from tests.conftest import make_settings
from tests.support.harness import TENANT_A, Broker, command, running_worker
from tests.support.queues import wait_for_counts
from worker.devtools.simulator import FaultRule, SimulatorThread
from worker.ops import deadletters
from worker.settings import Settings

pytestmark = pytest.mark.integration


def new_id() -> str:
    return str(uuid.uuid4())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_long_retry_after_waits_in_a_delay_queue_and_the_command_then_succeeds(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator, RETRY_IN_PROCESS_MAX=0.5)
    simulator.set_faults([FaultRule(status=429, retry_after="1.5", remaining=1)])
    command_id = new_id()
    async with running_worker(settings, broker) as (worker, collector):
        await broker.publish(settings, command(command_id=command_id))
        [outcome] = await collector.wait_for(1, timeout=30)
        assert worker.metrics.retries_scheduled.value("broker") == 1
        assert worker.metrics.throttled.value(TENANT_A) == 1
    assert outcome.routing_key == "invite.accepted"
    assert outcome.data["attempts"] == 2
    assert [i.status for i in simulator.invites] == [429, 200]
    gap = simulator.invites[1].arrived_monotonic - simulator.invites[0].arrived_monotonic
    assert gap >= 1.5


async def test_a_command_published_twice_calls_graph_once_and_gets_one_outcome(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    body = command(command_id=new_id())
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, body)
        await collector.wait_for(1)
        await broker.publish(settings, body)
        # The second copy is settled without an outcome: wait until nothing is ready or
        # unacknowledged (the ready depth alone would count a copy still being handled).
        counts = await wait_for_counts(settings.command_queue, (0, 0), timeout=15)
        await asyncio.sleep(0.3)
        outcomes = list(collector.outcomes)
    assert counts == (0, 0)
    assert len(outcomes) == 1
    assert len(simulator.invites) == 1


async def test_dead_letters_carry_why_and_can_be_replayed_by_command_id(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator)
    rejected_id, kept_id = new_id(), new_id()
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, command(command_id=rejected_id, callId="a/b"))
        await broker.publish(settings, command(command_id=kept_id, callId="c/d"))
        await collector.wait_for(2)
        for _ in range(100):
            if await broker.queue_depth(settings.dead_letter_queue) == 2:
                break
            await asyncio.sleep(0.05)
        letters = {
            letter.command_id: letter for letter in await deadletters.list_dead_letters(settings)
        }
        assert set(letters) == {rejected_id, kept_id}
        headers = letters[rejected_id].headers
        assert headers["x-invite-fault-reason"] == "rejected"
        assert "callId" in str(headers["x-invite-problems"])
        assert headers["x-invite-outcome-id"]
        # Listing leaves them where they are.
        assert await broker.queue_depth(settings.dead_letter_queue) == 2

        replayed = await deadletters.replay(settings, {rejected_id})
        assert [letter.command_id for letter in replayed] == [rejected_id]
        # Still invalid, so rejected again; the other one stayed in the dead-letter queue.
        outcomes = await collector.wait_for(3)
    assert [o.data["commandId"] for o in outcomes].count(rejected_id) == 2
    assert [letter.command_id for letter in await deadletters.list_dead_letters(settings)].count(
        kept_id
    ) == 1


async def test_health_endpoints_report_liveness_readiness_and_metrics(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    port = free_port()
    settings = make_settings(simulator, HEALTH_PORT=port)
    base = f"http://127.0.0.1:{port}"
    async with (
        running_worker(settings, broker) as (worker, collector),
        httpx.AsyncClient(base_url=base) as http,
    ):
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        await broker.publish(settings, command(command_id=new_id()))
        await collector.wait_for(1)
        metrics = (await http.get("/metrics")).text
        tenant = f'tenant="{TENANT_A}"'
        assert f'invite_outcomes_total{{outcome="invite.accepted",{tenant}}} 1' in metrics
        assert f'invite_graph_requests_total{{status="200",{tenant}}} 1' in metrics
        assert f'invite_token_acquisitions_total{{result="success",{tenant}}} 1' in metrics
        assert "invite_graph_request_duration_seconds_count 1" in metrics
        await worker.consumer.stop_consuming()
        # Draining: alive, but not ready for more work.
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200


async def test_a_rejected_command_in_the_dead_letter_queue_is_the_message_as_published(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator)
    body = json.dumps(command(command_id=new_id(), participants=[])).encode()
    async with running_worker(settings, broker) as (_, collector):
        assert broker.channel is not None
        await broker.channel.default_exchange.publish(
            aio_pika.Message(body, content_type="application/json", headers={"x-upstream": "crm"}),
            routing_key=settings.command_queue,
        )
        await collector.wait_for(1)
        [dead] = await broker.drain_queue(settings.dead_letter_queue, expect=1)
    assert dead.body == body
    assert dead.headers["x-upstream"] == "crm"
    assert dead.headers["x-invite-fault-reason"] == "rejected"

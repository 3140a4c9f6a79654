"""The worker end to end: real RabbitMQ, real MSAL and httpx, the HTTPS Graph simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.support.harness import TENANT_A, TENANT_B, Broker, command, running_worker
from worker.devtools.simulator import FaultRule, SimulatorThread
from worker.settings import Settings

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "schemas" / "examples").glob("*.json"))


def new_id() -> str:
    return str(uuid.uuid4())


async def test_document_examples_reach_graph_unchanged_and_are_accepted(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    examples = [json.loads(path.read_text()) for path in EXAMPLES]
    assert len(examples) == 5
    async with running_worker(settings, broker) as (_, collector):
        for example in examples:
            await broker.publish(settings, example, message_id=example["commandId"])
        outcomes = await collector.wait_for(5)

    invites = {invite.client_request_id: invite for invite in simulator.invites}
    for example in examples:
        invite = invites[example["commandId"]]
        assert invite.body == {
            "participants": example["participants"],
            "clientContext": example["clientContext"],
        }
        assert invite.call_id == example["callId"]
        assert invite.tenant_id == TENANT_A
    for outcome in outcomes:
        assert outcome.routing_key == "invite.accepted"
        assert outcome.correlation_id == outcome.data["commandId"]
        assert outcome.event["specversion"] == "1.0"
        assert outcome.event["type"] == "invite.accepted"
        assert outcome.data["operationStatus"] == "Running"
        assert outcome.data["operationId"]
        assert outcome.data["location"].endswith(outcome.data["operationId"])
        assert outcome.data["requestId"]
        assert outcome.data["attempts"] == 1
        assert outcome.data["tenantId"] == TENANT_A
    assert sorted(o.data["commandId"] for o in outcomes) == sorted(e["commandId"] for e in examples)
    assert await broker.queue_depth(settings.command_queue) == 0


async def test_document_example_2_as_written_is_rejected_and_dead_lettered(
    settings: Settings, broker: Broker, simulator: SimulatorThread, examples_dir: Path
) -> None:
    example = json.loads((examples_dir / "rejected" / "example-2-as-written.json").read_text())
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, example)
        [outcome] = await collector.wait_for(1)
        dead = await broker.drain_queue(settings.dead_letter_queue, expect=1)
    assert outcome.routing_key == "invite.rejected"
    assert outcome.data["commandId"] == example["commandId"]
    [problem] = outcome.data["problems"]
    assert problem["field"] == "participants"
    assert "replacesCallId" in problem["problem"]
    assert simulator.invites == []
    assert [json.loads(m.body) for m in dead] == [example]


@dataclass(frozen=True)
class Invalid:
    body: bytes
    content_type: str | None
    #: The field its problem must name.
    field: str
    #: The correlation id its outcome must carry: the commandId, or the message_id.
    key: str
    message_id: str | None = None


def _invalid_commands() -> dict[str, Invalid]:
    def variant(field: str, content_type: str | None = None, **changes: object) -> Invalid:
        body = command(command_id=new_id())
        body.update(changes)
        body = {k: v for k, v in body.items() if v is not None}
        return Invalid(json.dumps(body).encode(), content_type, field, str(body["commandId"]))

    def raw(body: bytes, content_type: str | None, name: str) -> Invalid:
        return Invalid(body, content_type, "(message)", name, message_id=name)

    user = {"identity": {"user": {"id": "278405a3-f568-4b3e-b684-009193463064"}}}
    return {
        "not json": raw(b"{not json", "application/json", "not-json"),
        "not utf-8": raw(b'{"commandId": "\xff\xfe"}', "application/json", "not-utf-8"),
        "too big": raw(b'{"x": "' + b"a" * 70_000 + b'"}', "application/json", "too-big"),
        "a json array": raw(b"[1, 2]", None, "array"),
        "deep nesting": raw(b"[" * 5000 + b"]" * 5000, None, "deep"),
        # A body of the wrong content type is not read: it correlates by its message_id.
        "not a json content type": raw(
            json.dumps(command(command_id=new_id())).encode(), "text/plain", "text-plain"
        ),
        "missing callId": variant("callId", callId=None),
        "mistyped participants": variant("participants", participants="everyone"),
        "mistyped hidden": variant(
            "participants[0].hidden", participants=[dict(user, hidden="yes")]
        ),
        "unknown top-level field": variant("priority", priority="high"),
        "callId with ../": variant("callId", callId="../../users"),
        "callId with /": variant("callId", callId="abc/def"),
        "callId with ?": variant("callId", callId="abc?x=1"),
        "callId with %2F": variant("callId", callId="abc%2Fdef"),
        "tenantId with ../": variant("tenantId", tenantId="../common"),
        "no participants": variant("participants", participants=[]),
        "six participants": variant("participants", participants=[user] * 6),
        "participantId with two participants": variant(
            "participants", participants=[dict(user, participantId="p1"), user]
        ),
        "replacesCallId with two participants": variant(
            "participants", participants=[dict(user, replacesCallId="c1"), user]
        ),
        "phone not E.164": variant(
            "participants[0].identity.phone",
            participants=[{"identity": {"phone": {"id": "0800 123 456"}}}],
        ),
        "clientContext over 256 characters": variant("clientContext", clientContext="c" * 257),
        "deadline without offset": variant("deadline", deadline="2030-01-01T00:00:00"),
        "commandId not a uuid": variant("commandId", commandId="42"),
    }


async def test_invalid_commands_are_rejected_dead_lettered_and_the_worker_keeps_consuming(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    cases = _invalid_commands()
    valid_id = new_id()
    async with running_worker(settings, broker) as (_, collector):
        for case in cases.values():
            await broker.publish(
                settings, case.body, content_type=case.content_type, message_id=case.message_id
            )
        await broker.publish(settings, command(command_id=valid_id))
        outcomes = await collector.wait_for(len(cases) + 1)
        dead = await broker.drain_queue(settings.dead_letter_queue, expect=len(cases))

    by_key = {o.correlation_id: o for o in outcomes}
    assert by_key[valid_id].routing_key == "invite.accepted"
    for name, case in cases.items():
        outcome = by_key[case.key]
        assert outcome.routing_key == "invite.rejected", name
        fields = [p["field"] for p in outcome.data["problems"]]
        assert case.field in fields, (name, outcome.data["problems"])
    assert sorted(m.body for m in dead) == sorted(c.body for c in cases.values())
    assert [i.client_request_id for i in simulator.invites] == [valid_id]


async def test_many_invites_for_one_tenant_share_one_token_request(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    ids = [new_id() for _ in range(40)]
    async with running_worker(settings, broker) as (_, collector):
        for command_id in ids:
            await broker.publish(settings, command(command_id=command_id))
        outcomes = await collector.wait_for(len(ids))
    assert {o.routing_key for o in outcomes} == {"invite.accepted"}
    assert [(t.tenant_id, t.client_id) for t in simulator.token_requests] == [
        (TENANT_A, settings.azure_client_id)
    ]
    assert len(simulator.invites) == len(ids)


async def test_two_tenants_get_one_token_each_and_each_invite_uses_its_tenants_token(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    commands = {new_id(): tenant for tenant in (TENANT_A, TENANT_B) for _ in range(10)}
    async with running_worker(settings, broker) as (_, collector):
        for command_id, tenant in commands.items():
            await broker.publish(settings, command(command_id=command_id, tenantId=tenant))
        outcomes = await collector.wait_for(len(commands))
    assert {o.routing_key for o in outcomes} == {"invite.accepted"}
    assert sorted(t.tenant_id for t in simulator.token_requests) == [TENANT_A, TENANT_B]
    # The simulator records the tenant of the token each invite carried.
    assert {i.client_request_id: i.tenant_id for i in simulator.invites} == commands


async def test_a_command_past_its_deadline_expires_without_calling_graph(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    expired, alive = new_id(), new_id()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, command(command_id=expired, deadline=past))
        await broker.publish(settings, command(command_id=alive, deadline=future))
        outcomes = await collector.wait_for(2)
    by_id = {o.data["commandId"]: o for o in outcomes}
    assert by_id[expired].routing_key == "invite.expired"
    assert by_id[expired].data["attempts"] == 0
    assert by_id[expired].data["deadline"] is not None
    assert by_id[alive].routing_key == "invite.accepted"
    assert [i.client_request_id for i in simulator.invites] == [alive]
    assert await broker.queue_depth(settings.dead_letter_queue) == 0


async def test_graph_4xx_gives_failed_with_graphs_status_code_and_request_id(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    forbidden = "forbidden-call-0001"
    simulator.set_faults(
        [FaultRule(call_id=forbidden, status=403, code="Forbidden", message="Missing role")]
    )
    command_id = new_id()
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, command(command_id=command_id, call_id=forbidden))
        [outcome] = await collector.wait_for(1)
    assert outcome.routing_key == "invite.failed"
    assert outcome.data["reason"] == "graph_refused"
    assert outcome.data["httpStatus"] == 403
    assert outcome.data["errorCode"] == "Forbidden"
    assert outcome.data["errorMessage"] == "Missing role"
    assert outcome.data["requestId"]
    assert outcome.data["clientRequestId"] == command_id
    assert outcome.data["attempts"] == 1
    # A failed invite is a settled command: acknowledged, not dead-lettered.
    assert await broker.queue_depth(settings.command_queue) == 0
    assert await broker.queue_depth(settings.dead_letter_queue) == 0


async def test_transport_failures_give_truthful_failed_outcomes(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    reset, hang = "reset-call-0001", "hang-call-0001"
    simulator.set_faults([FaultRule(call_id=reset, reset=True), FaultRule(call_id=hang, hang=True)])
    fast = make_settings(simulator, GRAPH_READ_TIMEOUT=0.5)
    ids = {reset: new_id(), hang: new_id()}
    async with running_worker(fast, broker) as (_, collector):
        for call_id, command_id in ids.items():
            await broker.publish(fast, command(command_id=command_id, call_id=call_id))
        outcomes = await collector.wait_for(2)
    by_call = {o.data["callId"]: o for o in outcomes}
    for call_id in ids:
        assert by_call[call_id].routing_key == "invite.failed"
        # The request was sent: Graph may have acted, and the outcome says so.
        assert by_call[call_id].data["reason"] == "graph_no_answer"
        assert by_call[call_id].data["httpStatus"] is None


async def test_graph_unreachable_gives_failed_graph_unreachable(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator, GRAPH_BASE_URL="https://127.0.0.1:9/v1.0")
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, command(command_id=new_id()))
        [outcome] = await collector.wait_for(1)
    assert outcome.routing_key == "invite.failed"
    assert outcome.data["reason"] == "graph_unreachable"


async def test_revoked_consent_fails_the_tenants_commands_with_the_token_error(
    broker: Broker, simulator_session: SimulatorThread, rabbitmq: str, tmp_path: Path
) -> None:
    with SimulatorThread(directory=tmp_path, revoked_tenants=[TENANT_B]) as simulator:
        settings = make_settings(simulator)
        ok, revoked = new_id(), new_id()
        async with running_worker(settings, broker) as (_, collector):
            await broker.publish(settings, command(command_id=revoked, tenantId=TENANT_B))
            await broker.publish(settings, command(command_id=ok))
            outcomes = await collector.wait_for(2)
        by_id = {o.data["commandId"]: o for o in outcomes}
        assert by_id[ok].routing_key == "invite.accepted"
        assert by_id[revoked].routing_key == "invite.failed"
        assert by_id[revoked].data["reason"] == "token_unavailable"
        assert by_id[revoked].data["errorCode"]
        assert [i.client_request_id for i in simulator.invites] == [ok]


async def test_an_outcome_the_broker_does_not_confirm_leaves_the_command_on_the_queue(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    command_id = new_id()
    async with running_worker(settings, broker) as (worker, _):
        # A bound queue that refuses every message makes the broker nack the outcome.
        assert broker.channel is not None
        full = await broker.channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(settings.outcome_exchange, routing_key="#")
        await broker.publish(settings, command(command_id=command_id))
        for _ in range(100):
            if simulator.invites:
                break
            await asyncio.sleep(0.05)
        # Let the command be redelivered at least once while the broker keeps refusing.
        await asyncio.sleep(2.5)
        refused = worker.metrics.outcome_publish_failures.value()
    # The worker stopped: the unacknowledged command is back on the queue, whole.
    assert await broker.queue_depth(settings.command_queue) == 1
    [message] = await broker.drain_queue(settings.command_queue, expect=1)
    assert json.loads(message.body)["commandId"] == command_id
    # Redeliveries republished the known outcome (each refused again) instead of inviting again.
    assert refused >= 2
    assert [i.client_request_id for i in simulator.invites] == [command_id]


#: Seconds the simulator's arrival stamps may lag behind the write (see the test below).
SCHEDULING_SLACK = 0.05


async def test_no_one_second_window_holds_more_invites_than_the_tenant_rate_limit(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    limit = 15
    settings = make_settings(simulator, GRAPH_TENANT_RATE_LIMIT=limit, GRAPH_MAX_IN_FLIGHT=16)
    count = 3 * limit + 5
    async with running_worker(settings, broker) as (_, collector):
        for _ in range(count):
            await broker.publish(settings, command(command_id=new_id()))
        await collector.wait_for(count, timeout=30)
    arrivals = sorted(i.arrived_monotonic for i in simulator.invites)
    assert len(arrivals) == count
    # Any one-second window holding limit+1 requests would have two of them, `limit`
    # apart in arrival order, less than a second apart.
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[limit:], strict=False)]
    # The simulator stamps an arrival when its event loop gets to the request, in a thread
    # that shares this process's GIL with the worker under test: a stamp can lag the moment the
    # request was written by the loop's scheduling delay, which shortens some gaps a little.
    # Without the limiter the gaps are a few milliseconds.
    assert min(gaps) >= 1.0 - SCHEDULING_SLACK

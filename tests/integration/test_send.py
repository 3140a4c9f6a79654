"""`invite-worker send` against the real broker, a running worker and the Graph simulator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from tests.support.harness import TENANT_A, Broker, command, running_worker
from worker.amqp.topology import declare_topology
from worker.devtools.simulator import FaultRule, SimulatorThread
from worker.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "schemas" / "examples" / "example-1-invite-one-participant.json"
USER = "278405a3-f568-4b3e-b684-009193463064"


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


async def send(settings: Settings, *args: str, stdin: bytes | None = None) -> Result:
    """`invite-worker send ARGS` as its own process, configured like the worker."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AMQP_URL": settings.amqp_url.get_secret_value(),
        "COMMAND_QUEUE": settings.command_queue,
        "OUTCOME_EXCHANGE": settings.outcome_exchange,
        "AZURE_TENANT_ID": settings.azure_tenant_id,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "send",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 45)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def test_a_file_is_published_and_its_acceptance_is_printed_with_exit_0(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    example = json.loads(EXAMPLE.read_text())
    async with running_worker(settings, broker):
        result = await send(settings, str(EXAMPLE), "--timeout", "20")
    assert result.code == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("invite.accepted ")
    assert f"commandId={example['commandId']}" in line
    [invite] = simulator.invites
    assert invite.body["participants"] == example["participants"]
    assert invite.client_request_id == example["commandId"]


async def test_standard_input_with_json_prints_the_outcome_event(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    body = command(command_id=str(uuid.uuid4()))
    async with running_worker(settings, broker):
        result = await send(settings, "-", "--json", stdin=json.dumps(body).encode())
    assert result.code == 0, result.stderr
    event = json.loads(result.stdout)
    assert event["type"] == "invite.accepted"
    assert event["subject"] == body["commandId"]
    assert event["data"]["tenantId"] == TENANT_A


async def test_flags_build_the_command_that_graph_receives(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    call_id = str(uuid.uuid4())
    replaced = str(uuid.uuid4())
    async with running_worker(settings, broker):
        result = await send(
            settings,
            "--call-id",
            call_id,
            "--user",
            USER,
            "--tenant",
            TENANT_A,
            "--replaces-call-id",
            replaced,
        )
    assert result.code == 0, result.stderr
    [invite] = simulator.invites
    assert invite.call_id == call_id
    assert invite.tenant_id == TENANT_A
    assert invite.body["participants"] == [
        {"identity": {"user": {"id": USER}}, "replacesCallId": replaced}
    ]


async def test_a_failed_or_expired_outcome_exits_1(
    settings: Settings, broker: Broker, simulator: SimulatorThread, tmp_path: Path
) -> None:
    refused = str(uuid.uuid4())
    simulator.set_faults([FaultRule(call_id=refused, status=403, code="Forbidden")])
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = tmp_path / "expired.json"
    expired.write_text(json.dumps(command(command_id=str(uuid.uuid4()), deadline=past)))
    async with running_worker(settings, broker):
        failed = await send(settings, "--call-id", refused, "--phone", "+12345678901")
        late = await send(settings, str(expired))
    assert failed.code == 1, failed.stderr
    assert failed.stdout.startswith("invite.failed ")
    assert "httpStatus=403" in failed.stdout
    assert "+12345678901" not in failed.stdout
    assert late.code == 1, late.stderr
    assert late.stdout.startswith("invite.expired ")


async def test_an_invalid_command_exits_2_naming_the_field_and_nothing_is_published(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    async with running_worker(settings, broker):
        result = await send(settings, "--call-id", "a/../b", "--user", USER, "--user", USER)
        bad_json = await send(settings, "-", stdin=b"{not json")
        depth = await broker.queue_depth(settings.command_queue)
    assert result.code == 2
    assert "callId" in result.stderr
    assert "not published" in result.stderr
    assert bad_json.code == 2
    assert "not JSON" in bad_json.stderr
    assert depth == 0
    assert simulator.invites == []


async def test_no_outcome_within_the_timeout_exits_3(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    """The topology exists but no worker consumes: the command waits, send gives up."""
    broker.clean_up_after(settings)
    assert broker.channel is not None
    await declare_topology(broker.channel, settings)
    result = await send(settings, "--call-id", "c1", "--user", USER, "--timeout", "1")
    assert result.code == 3
    assert "no outcome" in result.stderr
    assert await broker.queue_depth(settings.command_queue) == 1


async def test_a_missing_command_queue_exits_4_instead_of_waiting(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    """A mandatory publish that no queue takes is returned by the broker: reported, not lost."""
    broker.clean_up_after(settings)
    assert broker.channel is not None
    await declare_topology(broker.channel, settings)
    await broker.channel.queue_delete(settings.command_queue)
    result = await send(settings, "--call-id", "c1", "--user", USER, "--timeout", "30")
    assert result.code == 4
    assert settings.command_queue in result.stderr


async def test_only_the_outcome_whose_correlation_id_is_the_command_id_counts(
    settings: Settings, broker: Broker, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """Other commands' outcomes on the same exchange are passed over."""
    broker.clean_up_after(settings)
    assert broker.channel is not None
    _, outcomes, _ = await declare_topology(broker.channel, settings)
    mine = str(uuid.uuid4())
    path = tmp_path / "command.json"
    path.write_text(json.dumps(command(command_id=mine)))
    sending = asyncio.create_task(send(settings, str(path), "--timeout", "20"))
    # The command reaches the queue only after send's outcome queue is bound.
    for _ in range(200):
        if await broker.queue_depth(settings.command_queue) == 1:
            break
        await asyncio.sleep(0.05)

    async def outcome(kind: str, correlation_id: str) -> None:
        event = {"type": kind, "subject": correlation_id, "data": {"commandId": correlation_id}}
        await outcomes.publish(
            aio_pika.Message(json.dumps(event).encode(), correlation_id=correlation_id),
            routing_key=kind,
        )

    await outcome("invite.failed", str(uuid.uuid4()))
    await outcome("invite.accepted", mine)
    result = await sending
    assert result.code == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"invite.accepted commandId={mine} ")

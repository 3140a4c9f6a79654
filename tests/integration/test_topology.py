"""DECLARE_TOPOLOGY: declared by the worker, or provisioned by the platform and only checked.

The real `invite-worker run` process against the real broker: a topology it cannot use ends
it with exit code 2 and one log line that names what is wrong, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.support.harness import AMQP_URL, TENANT_A, Broker, isolated_settings
from worker.amqp.topology import declare_topology
from worker.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def worker_values(**overrides: str) -> dict[str, str]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    values = {
        "AMQP_URL": AMQP_URL,
        "COMMAND_QUEUE": f"{prefix}.commands",
        "OUTCOME_EXCHANGE": f"{prefix}.outcomes",
        "AZURE_TENANT_ID": TENANT_A,
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "HEALTH_PORT": "0",
        "LOG_FORMAT": "json",
    }
    values.update(overrides)
    return values


def run_worker(
    values: dict[str, str], timeout: float = 60
) -> tuple[int, list[dict[str, Any]], str]:
    """`python -m worker run` until it exits: its code, JSON lines, and all of its output."""
    settings_names = {str(f.validation_alias) for f in Settings.model_fields.values()}
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings_names} | values
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    lines = []
    for line in output.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return result.returncode, lines, output


def errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("level") == "error"]


async def test_with_declare_topology_false_a_missing_queue_exits_2_naming_it(
    broker: Broker, rabbitmq: str
) -> None:
    values = worker_values()
    settings = isolated_settings(dict(values))
    broker.clean_up_after(settings)
    assert broker.channel is not None
    await declare_topology(broker.channel, settings)
    await broker.channel.queue_delete(settings.delay_queue(60))

    code, lines, output = await asyncio.to_thread(
        run_worker, values | {"DECLARE_TOPOLOGY": "false"}
    )
    assert code == 2, output[-2000:]
    [line] = errors(lines)
    assert line["event"] == "topology.missing"
    assert line["missing"] == [f"queue '{settings.delay_queue(60)}'"]
    assert "Traceback" not in output
    # Nothing was declared: the deleted queue is still missing.
    channel = await broker.connection.channel() if broker.connection else None
    assert channel is not None
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(settings.delay_queue(60), passive=True)


async def test_with_declare_topology_false_a_complete_topology_starts(
    broker: Broker, rabbitmq: str
) -> None:
    values = worker_values(SHUTDOWN_GRACE_PERIOD="0")
    settings = isolated_settings(dict(values))
    broker.clean_up_after(settings)
    assert broker.channel is not None
    await declare_topology(broker.channel, settings)
    env = {k: v for k, v in os.environ.items() if k.upper() not in values}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        env=env | values | {"DECLARE_TOPOLOGY": "false"},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        seen = b""
        while b'"worker.ready"' not in seen:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, seen.decode(errors="replace")[-2000:]
            seen += line
        assert b'"topology.' not in seen
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0


@pytest.mark.parametrize("declare", ["true", "false"])
async def test_an_existing_queue_with_another_delivery_limit_exits_2_naming_both_values(
    broker: Broker, rabbitmq: str, declare: str
) -> None:
    values = worker_values(COMMAND_DELIVERY_LIMIT="20")
    settings = isolated_settings(dict(values))
    broker.clean_up_after(settings)
    assert broker.channel is not None
    # The platform's queue: everything as the worker wants it but its delivery limit.
    await declare_topology(
        broker.channel, isolated_settings(values | {"COMMAND_DELIVERY_LIMIT": 7})
    )

    code, lines, output = await asyncio.to_thread(
        run_worker, values | {"DECLARE_TOPOLOGY": declare}
    )
    assert code == 2, output[-2000:]
    [line] = errors(lines)
    assert line["event"] == "topology.mismatch"
    assert line["object"] == f"queue '{settings.command_queue}'"
    assert line["argument"] == "x-delivery-limit"
    assert (line["expected"], line["found"]) == ("'20'", "'7'")
    assert "Traceback" not in output

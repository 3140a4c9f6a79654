"""The README's publisher examples, run as written against the real broker and worker.

Each example is read from the README's "Publishing commands" section; only the queue and
exchange names are replaced by the test's own, so that an example that stops working (a
property left out, a confirmation misread, a duplicate not skipped) fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from tests.support.harness import Broker, running_worker
from worker.devtools.simulator import SimulatorThread
from worker.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PUBLISHERS = ROOT / "tests" / "support" / "publishers"
CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
USER = "278405a3-f568-4b3e-b684-009193463064"


def readme_example(heading: str, language: str) -> str:
    """The first `language` code block after the line `heading` in the README."""
    text = README.read_text()
    match = re.search(
        rf"^{re.escape(heading)}\n\n```{language}\n(.*?)\n```$", text, re.MULTILINE | re.DOTALL
    )
    assert match, f"the README has a {language} block after {heading!r}"
    return match.group(1)


def python_publisher(
    settings: Settings, *, command_queue: str, outcome_queue: str, printed: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """The README's Python example, its names replaced, with `print` recorded."""
    source = readme_example("Python (aio-pika):", "python")
    for name, own in (
        ("invite.commands", command_queue),
        ("invite.outcomes", settings.outcome_exchange),
        ("crm.invite-outcomes", outcome_queue),
    ):
        assert f'"{name}"' in source
        source = source.replace(f'"{name}"', json.dumps(own))
    namespace: dict[str, Any] = {"print": lambda *args: printed.append(args)}
    exec(compile(source, f"{README}: Python publisher", "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


async def eventually(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def queue_exists(channel: AbstractChannel, name: str) -> bool:
    try:
        await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return False
    return True


async def test_the_readme_python_publisher_gets_its_outcome_once_and_skips_a_duplicate(
    settings: Settings, broker: Broker, simulator: SimulatorThread
) -> None:
    outcome_queue = f"{settings.command_queue}.crm-outcomes"
    printed: list[tuple[Any, ...]] = []
    example = python_publisher(
        settings,
        command_queue=settings.command_queue,
        outcome_queue=outcome_queue,
        printed=printed,
    )
    assert broker.connection is not None
    async with running_worker(settings, broker) as (_, collector):
        channel = await broker.connection.channel()
        seen: set[str] = set()
        consuming = asyncio.create_task(example["consume_outcomes"](channel, seen))
        try:
            probe = await broker.connection.channel()
            deadline = asyncio.get_running_loop().time() + 10
            while not await queue_exists(probe, outcome_queue):
                assert asyncio.get_running_loop().time() < deadline
                probe = await broker.connection.channel()
                await asyncio.sleep(0.05)

            first = await example["invite"](channel, CALL_ID, USER)
            await eventually(lambda: len(printed) == 1)
            # The same event again, as a redelivery of an unconfirmed outcome would carry it,
            # then a second command: the consumer reads them in order and prints only the new.
            [event] = collector.outcomes
            assert broker.channel is not None
            exchange = await broker.channel.get_exchange(settings.outcome_exchange)
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(event.event).encode(),
                    correlation_id=event.correlation_id,
                    message_id=event.event_id,
                ),
                routing_key=event.routing_key,
            )
            second = await example["invite"](channel, CALL_ID, USER)
            await eventually(lambda: len(printed) == 2)
        finally:
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
            cleanup = await broker.connection.channel()
            await cleanup.queue_delete(outcome_queue)

    assert [(key, correlation) for key, correlation, _ in printed] == [
        ("invite.accepted", first),
        ("invite.accepted", second),
    ]
    assert len(seen) == 2
    assert [invite.client_request_id for invite in simulator.invites] == [first, second]
    assert all(
        invite.body["participants"][0]["identity"]["user"]["id"] == USER
        for invite in simulator.invites
    )


async def test_the_readme_python_publisher_raises_when_no_queue_takes_the_command(
    settings: Settings, broker: Broker
) -> None:
    example = python_publisher(
        settings,
        command_queue=f"{settings.command_queue}.missing",
        outcome_queue=f"{settings.command_queue}.unused",
        printed=[],
    )
    assert broker.connection is not None
    channel = await broker.connection.channel()
    with pytest.raises(RuntimeError, match="command not routed"):
        await example["invite"](channel, CALL_ID, USER)


#: What the README's Node.js example leaves to its reader: the command, a de-duplication
#: store and a handler (which prints what it was given, for the test to read).
NODE_PRELUDE = """
const callId = process.env.CALL_ID;
const userId = process.env.USER_ID;
const seen = new Set();
async function firstTime(id) { const first = !seen.has(id); seen.add(id); return first; }
async function handle(routingKey, correlationId, data) {
  console.log(JSON.stringify({ routingKey, correlationId, data }));
}
"""


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """amqplib as `tests/support/publishers/package-lock.json` pins it (`npm ci`)."""
    directory = tmp_path_factory.mktemp("node-publisher")
    for name in ("package.json", "package-lock.json"):
        shutil.copy(PUBLISHERS / name, directory / name)
    npm = shutil.which("npm")
    assert npm, "npm is needed to run the README's Node.js example"
    subprocess.run(  # noqa: S603 - npm ci on this repository's lock file
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        check=True,
        timeout=300,
    )
    return directory


async def test_the_readme_node_publisher_sends_a_command_the_worker_accepts(
    settings: Settings, broker: Broker, simulator: SimulatorThread, node_modules: Path
) -> None:
    source = readme_example("Node.js (amqplib, an ES module):", "js")
    outcome_queue = f"{settings.command_queue}.crm-outcomes"
    for name, own in (
        ("amqp://guest:guest@127.0.0.1:5672", settings.amqp_url.get_secret_value()),
        ("invite.commands", settings.command_queue),
        ("invite.outcomes", settings.outcome_exchange),
        ("crm.invite-outcomes", outcome_queue),
    ):
        assert f'"{name}"' in source
        source = source.replace(f'"{name}"', json.dumps(own))
    script = node_modules / "publisher.mjs"
    script.write_text(NODE_PRELUDE + source)
    assert broker.connection is not None
    async with running_worker(settings, broker):
        node = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node",
            str(script),
            cwd=node_modules,
            env={**os.environ, "CALL_ID": CALL_ID, "USER_ID": USER},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert node.stdout is not None
            line = await asyncio.wait_for(node.stdout.readline(), 30)
        finally:
            node.kill()
            _, errors = await node.communicate()
            cleanup = await broker.connection.channel()
            await cleanup.queue_delete(outcome_queue)

    assert line, errors.decode()
    printed = json.loads(line)
    [invite] = simulator.invites
    assert printed["routingKey"] == "invite.accepted"
    assert printed["correlationId"] == invite.client_request_id
    assert printed["data"]["commandId"] == invite.client_request_id
    assert invite.body["participants"] == [{"identity": {"user": {"id": USER}}}]

"""Slowloris on the health port of the real worker process.

400 connections each announce a 1 MiB body on `GET /healthz` and send 900 KiB of it, and
stay open. The worker's memory must stay flat, `/healthz` must keep answering, and commands
published meanwhile must all be accepted.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.faults.harness import Scenario, memory_mib
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

CONNECTIONS = 400
ANNOUNCED = 1024 * 1024
SENT = 900 * 1024
COMMANDS = 100
#: RSS the attack may add; the hand-written server it replaced grew by about 380 MiB.
MAX_GROWTH_MIB = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _attacker(port: int, held: list[asyncio.StreamWriter]) -> None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: worker\r\nContent-Length: %d\r\n\r\n" % ANNOUNCED
        )
        chunk = b"x" * 65536
        for _ in range(SENT // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        held.append(writer)
    except (ConnectionError, OSError):
        pass  # closed by the worker: what it should do with a body it does not want


def _healthz(port: int) -> int:
    """The first answer within a few tries, as a kubelet probe with a failure threshold gets:
    while the attack holds every connection the worker allows, new ones are refused."""
    for _ in range(20):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                status: int = answer.status
                return status
        except OSError:
            time.sleep(0.25)
    return 0


@pytest.mark.timeout(180)
async def test_slowloris_on_the_health_port_leaves_memory_flat_and_commands_flowing(
    amqp_url: str, fault_vhost: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    port = _free_port()
    async with Scenario(
        "slowloris on the health port",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        HEALTH_PORT=port,
    ) as scenario:
        worker = await scenario.start_worker()
        await asyncio.sleep(0.5)
        before = memory_mib(worker.pid)
        held: list[asyncio.StreamWriter] = []
        await asyncio.gather(*(_attacker(port, held) for _ in range(CONNECTIONS)))
        peak = max(before, memory_mib(worker.pid))
        await scenario.publish_commands(COMMANDS)
        status = await asyncio.to_thread(_healthz, port)
        await scenario.wait_for_outcomes(COMMANDS, timeout=60)
        peak = max(peak, memory_mib(worker.pid))
        for writer in held:
            writer.close()
        books = await scenario.finish(timeout=30)

    print(f"\nworker RSS {before:.0f} MiB before, {peak:.0f} MiB at the peak of the attack")
    assert status == 200
    assert peak - before < MAX_GROWTH_MIB
    assert not books.check(max_calls=1)
    assert books.row().outcomes == {"invite.accepted": COMMANDS}

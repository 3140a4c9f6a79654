"""What the broker says about a queue, including what `queue.declare` cannot: unacked messages."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess


def queue_counts(name: str, vhost: str = "/") -> tuple[int, int] | None:
    """(ready, unacknowledged) from `rabbitmqctl list_queues`; None when the queue is absent."""
    program = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    argv = [program, "-q", "list_queues", "-p", vhost, "name", "messages_ready"]
    argv.append("messages_unacknowledged")
    if os.geteuid() != 0:
        argv = ["sudo", "-n", *argv]
    result = subprocess.run(  # noqa: S603 - a fixed program, arguments from the test
        argv, capture_output=True, text=True, timeout=60, check=True
    )
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None


async def wait_for_counts(
    name: str, expected: tuple[int, int], *, timeout: float = 30.0, vhost: str = "/"
) -> tuple[int, int] | None:
    """Poll until the queue's (ready, unacked) are `expected`; the last counts seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        counts = await asyncio.to_thread(queue_counts, name, vhost)
        if counts == expected or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.5)

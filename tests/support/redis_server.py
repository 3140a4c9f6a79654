"""A redis-server of a test's own on a spare port, for scenarios that kill and restart it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def spare_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """Start Debian's redis-server on `port`, without persistence; wait until it answers."""
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed (CI installs Debian's redis-server)"
    process = subprocess.Popen(  # noqa: S603 - the installed redis-server, fixed arguments
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"redis-server did not start on port {port}")

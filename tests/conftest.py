"""Shared fixtures: the local RabbitMQ, the Graph simulator, and settings pointing at both."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.support.harness import AMQP_URL, TENANT_A, TENANT_B, Broker, isolated_settings
from worker.devtools.simulator import SimulatorThread
from worker.settings import Settings

CLIENT_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"
CLIENT_SECRET = "test-client-secret-value"


def _broker_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The local broker; its absence fails the test (CI must start it), never skips it."""
    if not _broker_reachable():
        pytest.fail("RabbitMQ is not reachable at 127.0.0.1:5672 (run `.ci/rabbitmq ensure`)")
    return AMQP_URL


REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The local Redis; its absence fails the test (CI must start it), never skips it."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2):
            pass
    except OSError:
        pytest.fail("Redis is not reachable at 127.0.0.1:6379 (run `.ci/redis`)")
    return REDIS_URL


@pytest_asyncio.fixture
async def redis_prefix(redis_server: str) -> AsyncIterator[str]:
    """A key prefix of the test's own; every key under it is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aioredis.Redis.from_url(redis_server)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def simulator_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorThread]:
    directory = tmp_path_factory.mktemp("simulator")
    with SimulatorThread(directory=directory, client_secret=CLIENT_SECRET) as sim:
        yield sim


@pytest.fixture
def simulator(simulator_session: SimulatorThread) -> SimulatorThread:
    """The session's simulator, with no records, faults or latency left by other tests."""
    simulator_session.reset()
    simulator_session.latency = 0.0
    return simulator_session


def make_settings(simulator: SimulatorThread, **overrides: Any) -> Settings:
    """Settings for one test: its own queue and exchange names, the simulator for Graph."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    ca_file = str(simulator.ca_file)
    values: dict[str, Any] = {
        "AMQP_URL": AMQP_URL,
        "COMMAND_QUEUE": f"{prefix}.commands",
        "OUTCOME_EXCHANGE": f"{prefix}.outcomes",
        "GRAPH_BASE_URL": simulator.graph_base_url,
        "AZURE_AUTHORITY_HOST": simulator.authority_host,
        "AZURE_TENANT_ID": TENANT_A,
        "ALLOWED_TENANT_IDS": f"{TENANT_A},{TENANT_B}",
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "SSL_CERT_FILE": ca_file,
        "REQUESTS_CA_BUNDLE": ca_file,
        "SHUTDOWN_GRACE_PERIOD": 5,
        # No health server unless a test asks for one: a fixed port would be shared.
        "HEALTH_PORT": 0,
    }
    values.update(overrides)
    # The machine's environment does not leak in: each test states all it depends on.
    return isolated_settings(values)


@pytest.fixture
def settings(simulator: SimulatorThread, rabbitmq: str) -> Settings:
    return make_settings(simulator)


@pytest_asyncio.fixture
async def broker(rabbitmq: str) -> AsyncIterator[Broker]:
    async with Broker(rabbitmq) as broker:
        yield broker


@pytest.fixture
def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "schemas" / "examples"

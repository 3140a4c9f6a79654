"""Fixtures of the fault-injection suite, and the table of the books printed at its end.

The suite runs in a virtual host of its own, created for the session and deleted afterwards:
`rabbitmqctl close_all_connections` then closes only the suite's connections, not those of
whoever else uses the local broker, and deleting the virtual host removes every queue the
scenarios declared (delay queues included). A broker restart still affects everyone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.faults.harness import BOOKS_TABLE, kill_leftover_workers, rabbitmqctl, render_table


@pytest.fixture(scope="session")
def fault_vhost(rabbitmq: str) -> Iterator[str]:
    """A virtual host for the session (the `rabbitmq` fixture fails the tests without a broker)."""
    name = f"invite-faults-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        kill_leftover_workers()
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
def amqp_url(fault_vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{fault_vhost}"


@pytest.fixture(autouse=True)
def _no_worker_survives_a_test() -> Iterator[None]:
    yield
    kill_leftover_workers()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not BOOKS_TABLE:
        return
    failed = {
        report.nodeid
        for outcome in ("failed", "error")
        for report in terminalreporter.stats.get(outcome, [])
        if hasattr(report, "nodeid")
    }
    terminalreporter.section("fault-injection books")
    for line in render_table(BOOKS_TABLE, failed):
        terminalreporter.write_line(line)

"""The fault-injection harness: the real worker process, a broker client that outlives faults,
and the books that say what became of every command.

A `Scenario` declares a topology of its own in the suite's virtual host, pre-loads commands,
starts `python -m worker run` processes against the Graph simulator, lets a test inject a fault,
then closes the books: the outcome events (taken from a durable queue of the test's own, bound to
the outcome exchange before anything was published), the dead-letter queue, the simulator's record
of Graph calls, the workers' exit codes and what was left in the command and delay queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.support.harness import TENANT_A, command
from tests.support.outcomes import Outcome
from worker.amqp.topology import DELAY_BUCKETS, declare_topology
from worker.devtools.simulator import RecordedInvite, SimulatorThread
from worker.settings import Settings

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = frozenset({"invite.accepted", "invite.failed", "invite.rejected", "invite.expired"})
#: What a broken or restarting broker raises at a client.
BROKER_ERRORS = (AMQPError, ConnectionError, OSError, RuntimeError, TimeoutError)
#: Seconds a worker gets to exit after SIGTERM beyond its SHUTDOWN_GRACE_PERIOD.
EXIT_SLACK = 5.0
#: Every setting the worker reads, so that none leaks in from the test's own environment.
WORKER_VARIABLES = frozenset(
    str(info.validation_alias) for info in Settings.model_fields.values() if info.validation_alias
)


# --- The broker from the outside ---------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 90.0) -> str:
    """Run rabbitmqctl (through `sudo -n` when not root); a failure fails the test."""
    program = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    argv = [program, *args] if os.geteuid() == 0 else ["sudo", "-n", program, *args]
    try:
        result = subprocess.run(  # noqa: S603 - a fixed program, arguments from the suite
            argv, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{' '.join(argv)} could not run: {exc!r}") from exc
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-2000:]}"
        )
    return result.stdout


def port_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def wait_for_broker(timeout: float = 60.0) -> None:
    """Wait until the broker's port answers and the node says it has started."""
    deadline = time.monotonic() + timeout
    while not port_answers():
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ did not answer on 127.0.0.1:5672 within {timeout}s")
        await asyncio.sleep(0.2)
    await asyncio.to_thread(rabbitmqctl, "-q", "await_startup", timeout=timeout)


async def restart_broker_app(down_for: float = 1.0) -> None:
    """`rabbitmqctl stop_app`, a pause, `start_app`, and wait until the node answers again.

    Whatever happens, the app is started again before this returns or raises.
    """
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.sleep(down_for)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    await wait_for_broker()


class FaultTolerantBroker:
    """A connection of the test's own that is re-opened whenever a fault broke it.

    Every operation is retried until its deadline, on a fresh connection when the old one is
    gone, so the books survive `close_all_connections` and a broker restart. Messages are
    taken with basic.get and acknowledged one by one; one that comes back because an
    acknowledgement was lost with its connection (`redelivered`, already recorded) is not
    counted twice, while a duplicate the worker published is a new message and is counted.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._seen: set[tuple[str, str | None, bytes]] = set()
        #: Connections of the test's own that a fault broke.
        self.reconnects = 0

    async def _live_channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                if self._connection is not None:
                    self.reconnects += 1
                self._connection = await aio_pika.connect(self.url, timeout=5)
            self._channel = await self._connection.channel(publisher_confirms=True)
        return self._channel

    async def _drop(self) -> None:
        channel, connection = self._channel, self._connection
        self._channel = self._connection = None
        for closable in (channel, connection):
            if closable is not None:
                with contextlib.suppress(*BROKER_ERRORS, asyncio.CancelledError):
                    await asyncio.wait_for(closable.close(), 2)

    async def run(
        self,
        operation: Callable[[AbstractChannel], Awaitable[T]],
        *,
        what: str,
        timeout: float = 60.0,
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                channel = await self._live_channel()
                return await asyncio.wait_for(operation(channel), 30)
            except BROKER_ERRORS as exc:
                if self._connection is not None:
                    self.reconnects += 1
                await self._drop()
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: the broker stayed unusable: {exc!r}") from exc
                await asyncio.sleep(0.25)

    async def close(self) -> None:
        await self._drop()

    async def depth(self, queue: str) -> int:
        """Ready messages in a queue (those delivered and unacknowledged are not counted)."""

        async def passive(channel: AbstractChannel) -> int:
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            return count or 0

        return await self.run(passive, what=f"depth of {queue}")

    async def take(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message waiting in `queue`, acknowledged, each counted once."""
        taken: list[AbstractIncomingMessage] = []

        async def drain(channel: AbstractChannel) -> None:
            source = await channel.get_queue(queue, ensure=False)
            while True:
                message = await source.get(fail=False, no_ack=False, timeout=10)
                if message is None:
                    return
                key = (queue, message.message_id, message.body)
                if not (message.redelivered and key in self._seen):
                    self._seen.add(key)
                    taken.append(message)
                await message.ack()

        await self.run(drain, what=f"taking from {queue}")
        return taken

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        content_type: str | None,
        message_id: str,
    ) -> None:
        async def send(channel: AbstractChannel) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=content_type,
                    message_id=message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key,
                timeout=10,
            )

        await self.run(send, what=f"publishing {message_id}")


# --- The worker process ------------------------------------------------------------------

_LIVE_PROCESSES: set[subprocess.Popen[bytes]] = set()


def kill_leftover_workers() -> None:
    """SIGKILL every worker process this suite started and that still runs."""
    for process in list(_LIVE_PROCESSES):
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        _LIVE_PROCESSES.discard(process)


class WorkerProcess:
    """`python -m worker run`, its stdout (JSON log lines) in a file of its own."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.exit_code: int | None = None
        self.exit_seconds: float | None = None
        #: The test SIGKILLed it on purpose: its exit code is expected to be -9.
        self.killed = False
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"],
                env=dict(env),
                cwd=PROJECT_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _LIVE_PROCESSES.add(self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        """The log lines that are JSON objects (a traceback or a partial line is skipped)."""
        parsed: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    parsed.append(value)
        return parsed

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def tail(self, count: int = 30, width: int = 400) -> str:
        if not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line[:width] for line in lines[-count:])

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.events("worker.ready"):
            if not self.alive():
                raise AssertionError(f"{self.name} exited {self.process.returncode} before ready")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} was not ready within {timeout}s")
            await asyncio.sleep(0.05)

    def send(self, sig: signal.Signals) -> float:
        """Send a signal; returns when (monotonic) it was sent."""
        self.process.send_signal(sig)
        return time.monotonic()

    async def wait_exit(self, timeout: float, *, since: float | None = None) -> int | None:
        """The exit code, or None when the process still runs after `timeout` seconds."""
        started = time.monotonic() if since is None else since
        deadline = started + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if code is not None:
            self.exit_code = code
            self.exit_seconds = time.monotonic() - started
            _LIVE_PROCESSES.discard(self.process)
        return code

    def kill(self) -> None:
        """SIGKILL (if it still runs); the test's clean-up, or a crash the test injects."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.exit_code is None:
            self.exit_code = self.process.returncode
        _LIVE_PROCESSES.discard(self.process)


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc/<pid>/status: VmRSS now, or VmHWM, its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


# --- What a test expects and what it got ---------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One message the test published, and the key its outcome must carry."""

    key: str
    """The outcome's expected correlation_id: the commandId, or the message_id."""
    message_id: str
    body: bytes
    content_type: str | None
    call_id: str | None = None
    command_id: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    headers: dict[str, Any]
    body: bytes


@dataclass(frozen=True)
class BooksRow:
    test: str
    scenario: str
    commands: int
    outcomes: dict[str, int]
    duplicates_same_id: int
    duplicates_new_id: int
    graph_calls: int
    max_calls_per_command: int
    invited_twice: int
    ambiguous: int
    dead_letters: int
    exit_codes: list[int | None]
    seconds: float
    violations: int


#: One row per scenario that closed its books; printed at the end of the session.
BOOKS_TABLE: list[BooksRow] = []


@dataclass
class Books:
    """Everything that happened to a scenario's commands, and the checks the README implies."""

    scenario: str
    test: str
    sent: dict[str, Sent]
    outcomes: list[Outcome]
    dead_letters: list[DeadLetter]
    invites: list[RecordedInvite]
    exit_codes: list[int | None]
    seconds: float
    #: What each exit code should be: 0 after SIGTERM, -9 for a worker the test SIGKILLed.
    expected_exit_codes: list[int] = field(default_factory=list)
    leftovers: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def outcomes_for(self, key: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.correlation_id == key]

    def first_outcome(self, key: str) -> Outcome:
        return self.outcomes_for(key)[0]

    def calls_for(self, command_id: str) -> list[RecordedInvite]:
        return [i for i in self.invites if i.client_request_id == command_id]

    def calls_by_command(self) -> Counter[str]:
        return Counter(i.client_request_id or "" for i in self.invites)

    def invited_twice(self) -> list[str]:
        """Commands Graph carried out more than once: a person rung twice."""
        acted = Counter(i.client_request_id or "" for i in self.invites if i.acted)
        return sorted(key for key, count in acted.items() if count > 1)

    @property
    def ambiguous_failures(self) -> int:
        """`invite.failed` events for which Graph may have acted (no answer, 500/502/504)."""
        return sum(
            1
            for o in self.outcomes
            if o.routing_key == "invite.failed"
            and (o.event.get("data") or {}).get("reason") in {"graph_no_answer", "graph_ambiguous"}
        )

    @property
    def missing(self) -> list[str]:
        return [
            key
            for key in self.sent
            if not any(o.routing_key in TERMINAL for o in self.outcomes_for(key))
        ]

    @property
    def duplicates_same_id(self) -> int:
        """Extra events that repeat an event id already published for the command."""
        seen: set[tuple[str | None, str | None]] = set()
        extra = 0
        for outcome in self.outcomes:
            key = (outcome.correlation_id, outcome.event_id)
            extra += key in seen
            seen.add(key)
        return extra

    @property
    def duplicates_new_id(self) -> int:
        """Extra events, with an event id of their own, for a command that already had one."""
        ids: dict[str | None, set[str | None]] = {}
        for outcome in self.outcomes:
            ids.setdefault(outcome.correlation_id, set()).add(outcome.event_id)
        return sum(len(event_ids) - 1 for event_ids in ids.values())

    def duplicated_keys(self) -> list[str]:
        counts = Counter(o.correlation_id for o in self.outcomes)
        return sorted(str(key) for key, count in counts.items() if count > 1)

    def _outcome_problems(self, conflicts_allowed: bool) -> list[str]:
        """Every command settled; every event well-formed and for a command that was sent."""
        problems: list[str] = []
        if missing := self.missing:
            problems.append(f"{len(missing)} command(s) without a terminal outcome: {missing[:5]}")
        unknown = [o.correlation_id for o in self.outcomes if o.correlation_id not in self.sent]
        if unknown:
            problems.append(f"outcomes for keys never published: {unknown[:5]}")
        problems += [
            f"{o.correlation_id}: routing key {o.routing_key!r}, type {o.event.get('type')!r}"
            for o in self.outcomes
            if o.routing_key not in TERMINAL or o.event.get("type") != o.routing_key
        ]
        conflicting = [
            key for key in self.sent if len({o.routing_key for o in self.outcomes_for(key)}) > 1
        ]
        if conflicting and not conflicts_allowed:
            problems.append(f"commands with outcomes of different kinds: {conflicting[:5]}")
        return problems

    def _duplicate_problems(self, same_id: int, new_id: int) -> list[str]:
        problems: list[str] = []
        if self.duplicates_same_id > same_id:
            problems.append(
                f"{self.duplicates_same_id} duplicate outcome(s) repeating an event id "
                f"(allowed {same_id}): {self.duplicated_keys()[:5]}"
            )
        if self.duplicates_new_id > new_id:
            problems.append(
                f"{self.duplicates_new_id} duplicate outcome(s) with a new event id "
                f"(allowed {new_id}): {self.duplicated_keys()[:5]}"
            )
        return problems

    def _call_problems(
        self, max_calls: int | Mapping[str, int], *, attempts_match_calls: bool
    ) -> list[str]:
        """Graph calls per command within the bound, and as many as the outcome says."""
        problems: list[str] = []
        calls = self.calls_by_command()
        for key, sent in self.sent.items():
            if sent.command_id is None:
                continue
            bound = max_calls if isinstance(max_calls, int) else max_calls.get(key, 1)
            made = calls.get(sent.command_id, 0)
            if made > bound:
                problems.append(f"{key}: {made} Graph calls, more than {bound}")
            if attempts_match_calls:
                problems += [
                    f"{key}: outcome says attempts={o.data.get('attempts')}, "
                    f"the simulator saw {made} call(s)"
                    for o in self.outcomes_for(key)
                    if o.data.get("attempts") != made
                ]
        strangers = set(calls) - {s.command_id for s in self.sent.values()}
        if strangers:
            problems.append(f"Graph calls for unknown client-request-ids: {sorted(strangers)[:5]}")
        return problems

    def row(self) -> BooksRow:
        calls = self.calls_by_command()
        return BooksRow(
            test=self.test,
            scenario=self.scenario,
            commands=len(self.sent),
            outcomes=dict(sorted(Counter(o.routing_key for o in self.outcomes).items())),
            duplicates_same_id=self.duplicates_same_id,
            duplicates_new_id=self.duplicates_new_id,
            graph_calls=len(self.invites),
            max_calls_per_command=max(calls.values(), default=0),
            invited_twice=len(self.invited_twice()),
            ambiguous=self.ambiguous_failures,
            dead_letters=len(self.dead_letters),
            exit_codes=self.exit_codes,
            seconds=round(self.seconds, 1),
            violations=len(self.violations),
        )

    def check(
        self,
        *,
        max_calls: int | Mapping[str, int],
        same_id_duplicates: int = 0,
        new_id_duplicates: int = 0,
        attempts_match_calls: bool = True,
        dead_letters: int = 0,
    ) -> list[str]:
        """The README's promises, as a list of violations (empty when all hold).

        `max_calls` bounds the Graph calls per command (a mapping gives some commands more);
        the duplicate arguments bound the extra outcome events of each kind.
        """
        problems = [
            *self._outcome_problems(new_id_duplicates > 0),
            *self._duplicate_problems(same_id_duplicates, new_id_duplicates),
            *self._call_problems(max_calls, attempts_match_calls=attempts_match_calls),
        ]
        if len(self.dead_letters) != dead_letters:
            problems.append(f"{len(self.dead_letters)} dead letter(s), expected {dead_letters}")
        expected_exits = self.expected_exit_codes or [0] * len(self.exit_codes)
        if self.exit_codes != expected_exits:
            problems.append(f"worker exit codes {self.exit_codes}, expected {expected_exits}")
        left = {queue: count for queue, count in self.leftovers.items() if count}
        if left:
            problems.append(f"messages left behind: {left}")
        self.violations = problems
        record(self)
        return problems


def record(books: Books) -> None:
    """Put the scenario's row in the table printed at the end of the session."""
    row = books.row()
    BOOKS_TABLE[:] = [r for r in BOOKS_TABLE if r.scenario != row.scenario]
    BOOKS_TABLE.append(row)


def render_table(rows: Iterable[BooksRow], failed: Collection[str] = ()) -> list[str]:
    """The books as text lines; `failed` names the tests (node ids) that failed."""
    headers = (
        "result",
        "scenario",
        "commands",
        "outcomes by kind",
        "dup same-id",
        "dup new-id",
        "graph calls total/max",
        "invited twice",
        "ambiguous",
        "dead letters",
        "exit codes",
        "seconds",
        "violations",
    )
    table = [
        (
            "FAILED" if row.test in failed else "ok",
            row.scenario,
            str(row.commands),
            " ".join(f"{k.removeprefix('invite.')}={v}" for k, v in row.outcomes.items()) or "-",
            str(row.duplicates_same_id),
            str(row.duplicates_new_id),
            f"{row.graph_calls}/{row.max_calls_per_command}",
            str(row.invited_twice),
            str(row.ambiguous),
            str(row.dead_letters),
            ",".join("-" if c is None else str(c) for c in row.exit_codes) or "-",
            f"{row.seconds:.1f}",
            str(row.violations),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: Iterable[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return [line(headers), "-+-".join("-" * w for w in widths), *(line(r) for r in table)]


# --- A scenario ----------------------------------------------------------------------------


#: Tenants a scenario may spread its commands over.
SUITE_TENANTS = 16


def tenant_id(index: int) -> str:
    """A tenant of the suite's own; tenant 0 is TENANT_A, the workers' default."""
    return TENANT_A if index == 0 else str(uuid.UUID(int=0xFA0175 << 96 | index, version=4))


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Scenario:
    """One fault scenario: its own queues and exchanges, its workers, its books."""

    def __init__(
        self,
        name: str,
        *,
        amqp_url: str,
        simulator: SimulatorThread,
        directory: Path,
        **overrides: object,
    ) -> None:
        self.name = name
        self.test = os.environ.get("PYTEST_CURRENT_TEST", name).rsplit(" (", 1)[0]
        self.simulator = simulator
        self.directory = directory
        prefix = f"faults-{uuid.uuid4().hex[:10]}"
        ca_file = str(simulator.ca_file)
        values: dict[str, object] = {
            "AMQP_URL": amqp_url,
            "COMMAND_QUEUE": f"{prefix}.commands",
            "OUTCOME_EXCHANGE": f"{prefix}.outcomes",
            "GRAPH_BASE_URL": simulator.graph_base_url,
            "AZURE_AUTHORITY_HOST": simulator.authority_host,
            "AZURE_TENANT_ID": TENANT_A,
            # Every tenant a scenario may name is served.
            "ALLOWED_TENANT_IDS": ",".join(tenant_id(i) for i in range(SUITE_TENANTS)),
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_CLIENT_SECRET": CLIENT_SECRET,
            "SSL_CERT_FILE": ca_file,
            "REQUESTS_CA_BUNDLE": ca_file,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "HEALTH_PORT": 0,
            # Small numbers keep a few hundred commands busy for a few seconds: a fault
            # injected after a third of the outcomes lands while commands are in flight.
            "GRAPH_MAX_IN_FLIGHT": 8,
            "GRAPH_READ_TIMEOUT": 5,
            "SHUTDOWN_GRACE_PERIOD": 3,
            "RETRY_MAX_ATTEMPTS": 5,
            "RETRY_MAX_ELAPSED": 60,
            "RETRY_BASE_DELAY": 0.1,
            "RETRY_MAX_DELAY": 1,
            "CIRCUIT_OPEN_SECONDS": 0.2,
            "CIRCUIT_MAX_OPEN_SECONDS": 0.4,
        }
        values.update(overrides)
        self.values = {key: _text(value) for key, value in values.items()}
        # model_validate reads no environment: the same values the worker process gets.
        self.settings = Settings.model_validate(self.values)
        base = {k: v for k, v in os.environ.items() if k.upper() not in WORKER_VARIABLES}
        self.env = {**base, **self.values}
        self.broker = FaultTolerantBroker(amqp_url)
        self.books_queue = f"{prefix}.books"
        self.sent: dict[str, Sent] = {}
        self.outcomes: list[Outcome] = []
        self.dead_letters: list[DeadLetter] = []
        self.workers: list[WorkerProcess] = []
        self.started = time.monotonic()

    # -- set-up --

    async def __aenter__(self) -> Scenario:
        self.simulator.reset()
        self.simulator.latency = 0.0
        await self.broker.run(self._declare, what="declaring the topology")
        return self

    async def _declare(self, channel: AbstractChannel) -> None:
        # The worker's own declarations, so the arguments are exactly the worker's.
        _, outcomes, _ = await declare_topology(channel, self.settings)
        books = await channel.declare_queue(
            self.books_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await books.bind(outcomes, routing_key="#")

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        for worker in self.workers:
            worker.kill()
        if exc is not None:
            for worker in self.workers:
                print(f"\n----- {self.name}: tail of {worker.name} ({worker.log_path}) -----")
                print(worker.tail())
            print(f"simulator saw {len(self.simulator.invites)} Graph call(s)")
            # The books as far as they go, so the table shows the failed scenario too.
            with contextlib.suppress(Exception):
                books = await asyncio.wait_for(self.close_books(), 20)
                books.violations = [f"failed: {exc}"]
                record(books)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.broker.run(self._delete, what="clean-up", timeout=10), 15)
        await self.broker.close()

    async def _delete(self, channel: AbstractChannel) -> None:
        # The virtual host goes at the end of the session; the quorum queues go now.
        for queue in (
            *self.command_queues(),
            self.settings.dead_letter_queue,
            self.settings.unrouted_outcome_queue,
            self.books_queue,
        ):
            await channel.queue_delete(queue)
        for exchange in (
            self.settings.outcome_exchange,
            self.settings.dead_letter_exchange,
            self.settings.unrouted_outcome_queue,
        ):
            await channel.exchange_delete(exchange)

    def command_queues(self) -> list[str]:
        """The command queue and every delay queue: all must end empty."""
        return [
            self.settings.command_queue,
            *(self.settings.delay_queue(seconds) for seconds in DELAY_BUCKETS),
        ]

    async def publish_commands(self, count: int, *, tenants: int = 1) -> list[Sent]:
        """Publish `count` valid commands, each with its own callId; message_id = commandId.

        With `tenants` > 1 the commands name that many tenants in turn (the first being
        AZURE_TENANT_ID, the default).
        """
        published = []
        for index in range(count):
            command_id = str(uuid.uuid4())
            call_id = f"call-{index:04d}-{uuid.uuid4().hex[:8]}"
            fields: dict[str, Any] = {}
            if tenants > 1:
                fields["tenantId"] = tenant_id(index % tenants)
            body = json.dumps(command(command_id=command_id, call_id=call_id, **fields)).encode()
            sent = Sent(command_id, command_id, body, "application/json", call_id, command_id)
            await self.publish(sent)
            published.append(sent)
        return published

    async def publish(self, sent: Sent) -> None:
        self.sent[sent.key] = sent
        await self.broker.publish(
            self.settings.command_queue,
            sent.body,
            content_type=sent.content_type,
            message_id=sent.message_id,
        )

    # -- workers --

    async def start_worker(self, *, ready_timeout: float = 30.0) -> WorkerProcess:
        name = f"worker-{len(self.workers) + 1}"
        worker = WorkerProcess(name, self.env, self.directory / f"{name}.log")
        self.workers.append(worker)
        await worker.wait_ready(ready_timeout)
        return worker

    def crash_worker(self, worker: WorkerProcess) -> None:
        """SIGKILL: no drain, no goodbye; the broker redelivers what it held."""
        worker.killed = True
        worker.kill()

    async def stop_worker(self, worker: WorkerProcess) -> int | None:
        """SIGTERM, then wait SHUTDOWN_GRACE_PERIOD plus a few seconds for the exit."""
        if not worker.alive():
            return await worker.wait_exit(0)
        since = worker.send(signal.SIGTERM)
        limit = self.settings.shutdown_grace_period + EXIT_SLACK
        code = await worker.wait_exit(limit, since=since)
        if code is None:
            worker.kill()
            raise AssertionError(f"{worker.name} still ran {limit}s after SIGTERM")
        return code

    # -- watching --

    async def poll(self) -> None:
        for message in await self.broker.take(self.books_queue):
            self.outcomes.append(Outcome.from_message(message))

    def settled_keys(self) -> set[str]:
        return {
            o.correlation_id
            for o in self.outcomes
            if o.routing_key in TERMINAL and o.correlation_id is not None
        }

    async def wait_until(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        interval: float = 0.1,
    ) -> None:
        """Poll the books until `condition` holds; a worker dying on its own fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            if condition():
                return
            for worker in self.workers:
                if worker.exit_code is None and not worker.alive():
                    raise AssertionError(
                        f"{worker.name} exited {worker.process.returncode} on its own "
                        f"while waiting for {what}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {what} within {timeout}s; {await self.state()}"
                )
            await asyncio.sleep(interval)

    async def state(self) -> str:
        """Where things stand, for a failure message."""
        settled = len(self.settled_keys() & set(self.sent))
        ready = {q: n for q in self.command_queues() if (n := await self.broker.depth(q))}
        workers = ", ".join(
            f"{w.name} {'running' if w.alive() else f'exited {w.process.returncode}'}, "
            f"last log event {(w.lines() or [{}])[-1].get('event', '-')!r}"
            for w in self.workers
        )
        return (
            f"{settled}/{len(self.sent)} commands settled, ready messages {ready or 'none'}, "
            f"{len(self.simulator.invites)} Graph calls; {workers or 'no worker'}"
        )

    async def wait_for_outcomes(self, count: int, *, timeout: float = 30.0) -> None:
        """Wait until `count` of the published commands have a terminal outcome."""
        await self.wait_until(
            lambda: len(self.settled_keys() & set(self.sent)) >= count,
            timeout=timeout,
            what=f"{count} settled commands",
        )

    async def queues_empty(self) -> bool:
        for queue in self.command_queues():
            if await self.broker.depth(queue):
                return False
        return True

    # -- the books --

    async def finish(self, *, timeout: float = 40.0) -> Books:
        """Wait for every outcome and empty queues, SIGTERM the workers, close the books."""
        await self.wait_for_outcomes(len(self.sent), timeout=timeout)
        # Retry copies still on their way back (none, normally) get a moment to settle.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if await self.queues_empty():
                break
            await asyncio.sleep(0.2)
        for worker in self.workers:
            if worker.exit_code is None:
                await self.stop_worker(worker)
        return await self.close_books()

    async def close_books(self) -> Books:
        """Drain the books and the dead-letter queue; count what is left anywhere else."""
        await self.poll()
        for message in await self.broker.take(self.settings.dead_letter_queue):
            self.dead_letters.append(
                DeadLetter(message.message_id, dict(message.headers or {}), message.body)
            )
        leftovers = {queue: await self.broker.depth(queue) for queue in self.command_queues()}
        leftovers[self.settings.unrouted_outcome_queue] = await self.broker.depth(
            self.settings.unrouted_outcome_queue
        )
        return Books(
            scenario=self.name,
            test=self.test,
            sent=dict(self.sent),
            outcomes=list(self.outcomes),
            dead_letters=list(self.dead_letters),
            invites=self.simulator.invites,
            exit_codes=[worker.exit_code for worker in self.workers],
            expected_exit_codes=[-signal.SIGKILL if w.killed else 0 for w in self.workers],
            seconds=time.monotonic() - self.started,
            leftovers=leftovers,
        )

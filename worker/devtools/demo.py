"""`invite-worker demo`: the whole job on one machine, end to end, in under a minute.

Starts the Graph simulator, starts the real worker process (`invite-worker run`) pointed at
it and at the local RabbitMQ, publishes the Graph document's five examples and one invalid
command, prints one line per outcome as it arrives, stops the worker with SIGTERM, ends with a
table of what became of each command (and what Graph received for it) and exits 0 when every
command got the outcome it should. `--verbose` also prints each outcome event whole and the
worker's canonical log lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aio_pika

from worker.amqp.topology import topology_names
from worker.devtools.simulator import RecordedInvite, SimulatorThread
from worker.settings import Settings

TENANT = "8a1c1f43-6b7e-4b38-9b7d-5c2a3e4f5a6b"
CLIENT_ID = "3f5d2c1b-0a9e-4d8c-b7a6-1e2f3a4b5c6d"
_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Row:
    """One command's line in the closing table."""

    example: str
    command_id: str
    expected: str
    outcome: str | None = None
    attempts: int | None = None
    duration_ms: float | None = None


def main(
    *, amqp_url: str, examples: Path, worker_log: Path | None = None, verbose: bool = False
) -> int:
    return asyncio.run(_demo(amqp_url, examples, worker_log, verbose))


def _commands(examples: Path) -> list[tuple[str, bytes, str]]:
    """(name, body, expected routing key) for every command the demo publishes."""
    commands = [
        (path.stem, path.read_bytes(), "invite.accepted")
        for path in sorted(examples.glob("*.json"))
    ]
    commands += [
        (f"rejected/{path.stem}", path.read_bytes(), "invite.rejected")
        for path in sorted((examples / "rejected").glob("*.json"))
    ]
    return commands


async def _demo(amqp_url: str, examples: Path, worker_log: Path | None, verbose: bool) -> int:
    commands = _commands(examples)
    if not commands:
        print(f"no example commands in {examples}", file=sys.stderr)
        return 1
    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        print(
            f"RabbitMQ is not reachable at {amqp_url}: {exc} (`make demo` starts it)",
            file=sys.stderr,
        )
        return 1
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    # Names of the demo's own, so that it never touches a real deployment's queues.
    names = Settings.model_validate(
        {
            "COMMAND_QUEUE": f"{prefix}.invite.commands",
            "OUTCOME_EXCHANGE": f"{prefix}.invite.outcomes",
        }
    )
    with tempfile.TemporaryDirectory() as tmp, SimulatorThread(directory=Path(tmp)) as sim:
        log_path = worker_log or Path(tmp) / "worker.log"
        env = {
            **os.environ,
            "AMQP_URL": amqp_url,
            "COMMAND_QUEUE": names.command_queue,
            "OUTCOME_EXCHANGE": names.outcome_exchange,
            "GRAPH_BASE_URL": sim.graph_base_url,
            "AZURE_AUTHORITY_HOST": sim.authority_host,
            "AZURE_TENANT_ID": TENANT,
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_CLIENT_SECRET": "demo-client-secret",
            "SSL_CERT_FILE": str(sim.ca_file),
            "REQUESTS_CA_BUNDLE": str(sim.ca_file),
            "LOG_FORMAT": "json",
            "HEALTH_PORT": "0",
        }
        env.pop("AZURE_CLIENT_CERTIFICATE_PATH", None)
        print(f"simulator: {sim.base_url} (CA {sim.ca_file})")
        with log_path.open("w") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"], env=env, stdout=log_file, stderr=log_file
            )
            rows: list[Row] = []
            try:
                ok = await _run(
                    connection, worker, log_path, names, commands, rows=rows, verbose=verbose
                )
            finally:
                code = _stop(worker)
                await _clean_up(connection, names)
        if verbose:
            print(f"worker: exited {code} after SIGTERM; its canonical log lines:")
            _print_settled_lines(log_path)
        else:
            print(f"worker: exited {code} after SIGTERM")
        tokens = len(sim.token_requests)
        print(f"graph simulator saw {len(sim.invites)} invites and {tokens} token request(s)\n")
        print(summary_table(rows, sim.invites))
    return 0 if ok and code == 0 else 1


async def _run(
    connection: aio_pika.abc.AbstractConnection,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    topology: Settings,
    commands: list[tuple[str, bytes, str]],
    *,
    rows: list[Row],
    verbose: bool,
) -> bool:
    if not await _wait_ready(worker, log_path):
        print("worker: did not become ready; its log:", file=sys.stderr)
        print(log_path.read_text(), file=sys.stderr)
        return False
    channel = await connection.channel()
    exchange = await channel.get_exchange(topology.outcome_exchange)
    outcomes = await channel.declare_queue(exclusive=True, auto_delete=True)
    await outcomes.bind(exchange, routing_key="#")
    names: dict[str, tuple[str, str]] = {}
    for name, body, expected in commands:
        command_id = json.loads(body).get("commandId")
        names[command_id] = (name, expected)
        rows.append(Row(name, command_id, expected))
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.command_queue,
        )
        print(f"published {name}  commandId={command_id}")
    ok = True
    async with outcomes.iterator(timeout=_TIMEOUT) as messages:
        async for message in messages:
            await message.ack()
            event = json.loads(message.body)
            data = event["data"]
            name, expected = names.pop(data["commandId"], ("?", "?"))
            mark = "ok" if message.routing_key == expected else f"EXPECTED {expected}"
            ok = ok and message.routing_key == expected
            print(f"outcome {message.routing_key} for {name} [{mark}]")
            if verbose:
                print(json.dumps(_summary(event), indent=2))
            for index, row in enumerate(rows):
                if row.command_id == data["commandId"]:
                    rows[index] = Row(
                        row.example,
                        row.command_id,
                        row.expected,
                        message.routing_key,
                        data.get("attempts"),
                        data.get("durationMs"),
                    )
            if not names:
                break
    if names:
        print(f"no outcome for: {', '.join(n for n, _ in names.values())}", file=sys.stderr)
    return ok and not names


def _summary(event: dict[str, Any]) -> dict[str, Any]:
    keep = ("specversion", "type", "source", "subject", "time")
    return {**{k: event[k] for k in keep}, "data": event["data"]}


def summary_table(rows: list[Row], invites: list[RecordedInvite]) -> str:
    """The closing table: each command, its outcome, and what Graph received for it."""
    received = {invite.client_request_id: invite for invite in invites}
    header = ("example", "command id", "outcome", "attempts", "ms", "Graph received")
    lines = [header]
    for row in rows:
        outcome = row.outcome or "none"
        if row.outcome != row.expected:
            outcome += f" (expected {row.expected})"
        invite = received.get(row.command_id)
        lines.append(
            (
                row.example,
                row.command_id,
                outcome,
                "-" if row.attempts is None else str(row.attempts),
                "-" if row.duration_ms is None else f"{row.duration_ms:.1f}",
                _received(invite),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    return "\n".join([text[0], rule, *text[1:]])


def _received(invite: RecordedInvite | None) -> str:
    """One cell: the call, and who was invited (phone numbers shortened to their last digits)."""
    if invite is None:
        return "nothing (no request)"
    who = [_participant(p) for p in invite.body.get("participants", [])]
    return f"HTTP {invite.status}: call {invite.call_id[:8]}…, {', '.join(who)}"


def _participant(participant: dict[str, Any]) -> str:
    identity = participant.get("identity") or {}
    kinds = [k for k in identity if not k.startswith("@") and isinstance(identity[k], dict)]
    described = []
    for kind in kinds:
        ident = str(identity[kind].get("id", ""))
        described.append(f"{kind} …{ident[-4:]}" if kind == "phone" else f"{kind} {ident[:8]}")
    extra = [key for key in ("replacesCallId", "participantId") if key in participant]
    return " + ".join(described) + (f" ({', '.join(extra)})" if extra else "")


async def _wait_ready(worker: subprocess.Popen[bytes], log_path: Path) -> bool:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline and worker.poll() is None:
        if '"worker.ready"' in log_path.read_text():
            return True
        await asyncio.sleep(0.1)
    return False


def _stop(worker: subprocess.Popen[bytes]) -> int | None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        return None


async def _clean_up(connection: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    channel = await connection.channel()
    queues, exchanges = topology_names(settings)
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
    await connection.close()


def _print_settled_lines(log_path: Path, out: IO[str] = sys.stdout) -> None:
    for line in log_path.read_text().splitlines():
        if '"command.settled"' in line:
            print(f"  {line}", file=out)

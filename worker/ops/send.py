"""`invite-worker send`: publish one command the way a publisher should, and wait for its outcome.

The command comes from a file, from standard input (`-`), or is built from flags. It is
validated first with the worker's own rules (`worker.core.commands.parse_command`): an invalid
one is reported field by field and not published. Before publishing, a temporary exclusive
queue is bound to the outcome exchange, so the outcome cannot be missed; the command is then
published persistent, mandatory and confirmed, and the outcome whose AMQP correlation_id is the
commandId ends the wait.

Exit codes: 0 invite.accepted; 1 invite.failed, invite.rejected or invite.expired; 2 invalid
(nothing published); 3 no outcome within the timeout; 4 not published (broker unreachable,
command queue or outcome exchange missing, publish not confirmed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError
from pamqp.commands import Basic

from worker.core.commands import parse_command
from worker.core.errors import InvalidCommand
from worker.core.outcomes import OutcomeKind
from worker.settings import Settings

EXIT_ACCEPTED = 0
EXIT_NOT_ACCEPTED = 1
EXIT_INVALID = 2
EXIT_TIMEOUT = 3
EXIT_NOT_PUBLISHED = 4


class SendError(Exception):
    """The command was not published; the message says why."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The outcome event received for the command."""

    routing_key: str
    event: dict[str, Any]

    @property
    def exit_code(self) -> int:
        accepted = self.routing_key == OutcomeKind.ACCEPTED.value
        return EXIT_ACCEPTED if accepted else EXIT_NOT_ACCEPTED

    def line(self) -> str:
        """One line for a person: the outcome and what matters about it."""
        data: dict[str, Any] = self.event.get("data") or {}
        parts = [
            self.routing_key,
            f"commandId={data.get('commandId')}",
            f"attempts={data.get('attempts')}",
            f"durationMs={data.get('durationMs')}",
        ]
        match self.routing_key:
            case OutcomeKind.ACCEPTED.value:
                parts += [
                    f"operationId={data.get('operationId')}",
                    f"status={data.get('operationStatus')}",
                ]
            case OutcomeKind.FAILED.value:
                parts += [
                    f"reason={data.get('reason')}",
                    f"httpStatus={data.get('httpStatus')}",
                    f"errorCode={data.get('errorCode')}",
                    f"errorMessage={json.dumps(data.get('errorMessage'))}",
                ]
            case OutcomeKind.REJECTED.value:
                problems = data.get("problems") or []
                parts += [f"{p.get('field')}: {p.get('problem')}" for p in problems]
            case OutcomeKind.EXPIRED.value:
                parts.append(f"deadline={data.get('deadline')}")
        return " ".join(parts)


def build_command(
    *,
    call_id: str,
    users: Sequence[str] = (),
    phones: Sequence[str] = (),
    tenant_id: str | None = None,
    replaces_call_id: str | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """A command body from flags: one participant per user id and per phone number."""
    participants: list[dict[str, Any]] = [{"identity": {"user": {"id": u}}} for u in users]
    participants += [{"identity": {"phone": {"id": p}}} for p in phones]
    if replaces_call_id is not None:
        for participant in participants:
            participant["replacesCallId"] = replaces_call_id
    body: dict[str, Any] = {
        "commandId": command_id or str(uuid.uuid4()),
        "callId": call_id,
        "participants": participants,
    }
    if tenant_id is not None:
        body["tenantId"] = tenant_id
    return body


def validated(body: bytes, settings: Settings) -> str:
    """The body's commandId once the worker's rules accept it; raises `InvalidCommand`."""
    command = parse_command(
        body,
        content_type="application/json",
        default_tenant_id=settings.azure_tenant_id,
        max_bytes=settings.max_command_bytes,
    )
    return command.command_id


async def send(
    settings: Settings, body: bytes, command_id: str, wait_seconds: float
) -> Outcome | None:
    """Publish the command and return its outcome, or None when none came in `wait_seconds`.

    Raises `SendError` when the command could not be published.
    """
    try:
        connection = await aio_pika.connect(
            settings.amqp_url.get_secret_value(),
            timeout=10,
            client_properties={"connection_name": "invite-worker send"},
        )
    except (OSError, AMQPError, TimeoutError) as exc:
        raise SendError(f"broker unreachable at {settings.redacted_amqp_url()}: {exc}") from None
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(settings.outcome_exchange, ensure=True)
        except AMQPError:
            raise SendError(f"no outcome exchange '{settings.outcome_exchange}'") from None
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for kind in OutcomeKind:
            await queue.bind(exchange.name, routing_key=kind.value)
        received: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if message.correlation_id != command_id or received.done():
                return
            try:
                event = json.loads(message.body)
            except ValueError:
                event = {}
            received.set_result(Outcome(message.routing_key or "", event))

        await queue.consume(on_message, no_ack=True, exclusive=True)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=command_id,
            app_id="invite-worker send",
        )
        try:
            confirmation = await channel.default_exchange.publish(
                message, routing_key=settings.command_queue, mandatory=True, timeout=10
            )
        except (AMQPError, TimeoutError) as exc:
            raise SendError(f"the broker did not confirm the command: {exc!r}") from None
        if not isinstance(confirmation, Basic.Ack):
            raise SendError(f"no queue '{settings.command_queue}': the command was returned")
        try:
            return await asyncio.wait_for(received, wait_seconds)
        except TimeoutError:
            return None


def run(
    settings: Settings,
    body: bytes,
    *,
    timeout: float,
    as_json: bool,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Validate, publish, wait, print; the exit code (see the module docstring)."""
    try:
        command_id = validated(body, settings)
    except InvalidCommand as exc:
        print("invalid command, not published:", file=err)
        for problem in exc.problems:
            print(f"  {problem.field}: {problem.problem}", file=err)
        return EXIT_INVALID
    try:
        outcome = asyncio.run(send(settings, body, command_id, timeout))
    except SendError as exc:
        print(f"not published: {exc}", file=err)
        return EXIT_NOT_PUBLISHED
    if outcome is None:
        print(f"no outcome for commandId={command_id} within {timeout:g} s", file=err)
        return EXIT_TIMEOUT
    print(json.dumps(outcome.event) if as_json else outcome.line(), file=out)
    return outcome.exit_code

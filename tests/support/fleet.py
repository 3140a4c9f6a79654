"""Commands and outcome events for tests of the fleet's shared state."""

from __future__ import annotations

import json
import uuid

from tests.support.harness import command
from worker.core.commands import Command, parse_command
from worker.core.outcomes import OutcomeEvent, accepted

TENANT = "11111111-1111-1111-1111-111111111111"


def make_command(
    key: str,
    call_id: str = "57dab8b1-894c-409a-b240-bd8beae78896",
    *,
    tenant_id: str = TENANT,
) -> Command:
    """A command whose id is a UUID named by `key`."""
    command_id = str(uuid.uuid5(uuid.NAMESPACE_URL, key))
    body = json.dumps(command(command_id=command_id, call_id=call_id)).encode()
    return parse_command(
        body, content_type="application/json", default_tenant_id=tenant_id, max_bytes=65_536
    )


def outcome(cmd: Command, *, operation_id: str = "op", source: str = "urn:test") -> OutcomeEvent:
    """An `invite.accepted` event for `cmd`."""
    return accepted(
        cmd,
        operation_id=operation_id,
        operation_status="running",
        location=None,
        request_id="r",
        client_request_id=cmd.command_id,
        attempts=1,
        duration_ms=1.0,
        source=source,
    )

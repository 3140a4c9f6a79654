"""The published JSON Schemas match the models, and the examples and events follow them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from worker.core import outcomes
from worker.core.commands import parse_command
from worker.core.errors import (
    DeadlinePassed,
    GraphRefused,
    InvalidCommand,
    Problem,
    TokenUnavailable,
)
from worker.ops import schemas

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def load(name: str) -> dict[str, object]:
    schema: dict[str, object] = json.loads((SCHEMAS / name).read_text())
    return schema


def test_schema_files_are_what_the_models_generate() -> None:
    assert schemas.drifted(SCHEMAS) == [], "run `invite-worker schemas` and commit the result"


@pytest.mark.parametrize(
    "call_id", ["..", "a..b", "a/../b", "a/b", "a?b", "a%2Fb", "a#b", "a\\b", "", " a", "x" * 256]
)
def test_the_command_schema_refuses_every_call_id_the_worker_refuses(call_id: str) -> None:
    """A publisher validating against the schema learns what the worker would reject."""
    example = sorted((SCHEMAS / "examples").glob("*.json"))[0]
    command = {**json.loads(example.read_text()), "callId": call_id}
    with pytest.raises(InvalidCommand):
        parse_command(
            json.dumps(command).encode(),
            content_type="application/json",
            default_tenant_id="11111111-1111-4111-8111-111111111111",
            max_bytes=65_536,
        )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(command, load("command.schema.json"))


def _accepted_by_worker(command: dict[str, Any]) -> bool:
    try:
        parse_command(
            json.dumps(command).encode(),
            content_type="application/json",
            default_tenant_id="11111111-1111-4111-8111-111111111111",
            max_bytes=65_536,
        )
    except InvalidCommand:
        return False
    return True


def _accepted_by_schema(command: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(command, load("command.schema.json"))
    except jsonschema.ValidationError:
        return False
    return True


_COMMUNICATIONS = "#microsoft.graph.communicationsIdentitySet"


@pytest.mark.parametrize(
    ("participant", "accepted"),
    [
        ({"endpointType": "default", "identity": {"user": {"id": "u1"}}}, False),
        ({"identity": {"guest": {"id": "g1"}}}, False),
        (
            {
                "identity": {
                    "@odata.type": "#microsoft.graph.identitySet",
                    "onPremises": {"id": "o"},
                }
            },
            False,
        ),
        ({"identity": {"@odata.type": _COMMUNICATIONS, "guest": {"id": "g1"}}}, True),
        ({"identity": {"@odata.type": _COMMUNICATIONS, "applicationInstance": {"id": "a"}}}, True),
        (
            {
                "identity": {
                    "@odata.type": "#microsoft.graph.identitySet",
                    "phone": {"id": "+12345678901"},
                }
            },
            True,
        ),
    ],
)
def test_the_command_schema_and_the_worker_agree_on_graph_v1_properties(
    participant: dict[str, Any], accepted: bool
) -> None:
    """endpointType is refused; communicationsIdentitySet properties need that annotation."""
    example = sorted((SCHEMAS / "examples").glob("*.json"))[0]
    command = {**json.loads(example.read_text()), "participants": [participant]}
    assert _accepted_by_worker(command) is accepted
    assert _accepted_by_schema(command) is accepted


@pytest.mark.parametrize(
    "path", sorted((SCHEMAS / "examples").glob("*.json")), ids=lambda p: p.stem
)
def test_every_example_command_follows_the_command_schema(path: Path) -> None:
    jsonschema.validate(json.loads(path.read_text()), load("command.schema.json"))


def test_the_command_schema_rejects_a_call_id_that_could_change_the_path() -> None:
    example = json.loads(next((SCHEMAS / "examples").glob("*.json")).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(example, callId="a/../b"), load("command.schema.json"))


def test_each_kind_of_outcome_event_follows_its_schema() -> None:
    example = (SCHEMAS / "examples" / "example-4-invite-pstn-participant.json").read_bytes()
    command = parse_command(example, content_type=None, default_tenant_id="t", max_bytes=65536)
    common: dict[str, Any] = {"attempts": 1, "duration_ms": 1.5, "source": "urn:test"}
    events = [
        outcomes.accepted(
            command,
            operation_id="op",
            operation_status="Running",
            location="https://g/op",
            request_id="r",
            client_request_id=command.command_id,
            **common,
        ),
        outcomes.from_error(
            GraphRefused(403, "Forbidden", "no", "r"), command, client_request_id="c", **common
        ),
        outcomes.from_error(
            TokenUnavailable("invalid_client", "bad secret"),
            command,
            client_request_id=None,
            **common,
        ),
        outcomes.from_error(
            InvalidCommand([Problem("callId", "bad")], command={"commandId": "x"}),
            None,
            client_request_id=None,
            **common,
        ),
        outcomes.from_error(DeadlinePassed("late"), command, client_request_id=None, **common),
    ]
    for event in events:
        jsonschema.validate(json.loads(event.to_json()), load(f"{event.type.value}.schema.json"))

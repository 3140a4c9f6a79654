"""schemas/asyncapi.yaml is a valid AsyncAPI 3.0 document that says what the worker does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from worker.amqp.topology import DELAY_BUCKETS, topology_objects
from worker.core.outcomes import OutcomeKind
from worker.ops import asyncapi
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
OFFICIAL = ROOT / "tests" / "support" / "asyncapi" / "asyncapi-3.0.0.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(OFFICIAL.read_text()))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SCHEMAS / asyncapi.FILE_NAME).read_text())
    return loaded


def _pointer(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_the_document_is_valid_against_the_official_asyncapi_3_schema(
    validator: jsonschema.Draft7Validator, document: dict[str, Any]
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    assert document["asyncapi"] == "3.0.0"


@pytest.mark.parametrize(
    ("where", "broken"),
    [
        (("operations", "sendInviteAccepted", "action"), "publish"),  # AsyncAPI 2's verb
        (("channels", "outcomes", "bindings", "amqp", "exchange", "type"), "x-consistent-hash"),
        (("channels", "commands", "bindings", "amqp", "queue", "durable"), "yes"),
    ],
)
def test_a_broken_document_fails_the_official_schema(
    validator: jsonschema.Draft7Validator,
    document: dict[str, Any],
    where: tuple[str, ...],
    broken: object,
) -> None:
    """The validation can fail: one wrong value anywhere is refused."""
    copy = json.loads(json.dumps(document))
    node = copy
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = broken
    assert not validator.is_valid(copy)


def test_every_reference_resolves_to_a_node_or_a_schema_file(document: dict[str, Any]) -> None:
    refs = _refs(document)
    assert refs
    for ref in refs:
        if ref.startswith("#/"):
            assert _pointer(document, ref) is not None, ref
        else:
            assert (SCHEMAS / ref).is_file(), ref


def test_there_is_one_send_operation_per_outcome_routing_key(document: dict[str, Any]) -> None:
    sends = [op for op in document["operations"].values() if op["action"] == "send"]
    keys = sorted(key for op in sends for key in op["bindings"]["amqp"]["cc"])
    assert keys == sorted(kind.value for kind in OutcomeKind)
    for operation in sends:
        [key] = operation["bindings"]["amqp"]["cc"]
        [message] = [_pointer(document, m["$ref"]) for m in operation["messages"]]
        message = _pointer(document, message["$ref"])
        assert message["name"] == key
        assert message["payload"]["schema"] == {"$ref": f"./{key}.schema.json"}
        assert operation["channel"] == {"$ref": "#/channels/outcomes"}


def test_the_message_examples_are_the_example_commands_and_follow_the_schema(
    document: dict[str, Any],
) -> None:
    message = document["components"]["messages"]["inviteCommand"]
    schema = json.loads((SCHEMAS / message["payload"]["schema"]["$ref"]).read_text())
    examples = {e["name"]: e["payload"] for e in message["examples"]}
    files = {p.stem: json.loads(p.read_text()) for p in (SCHEMAS / "examples").glob("*.json")}
    assert examples == files
    for payload in examples.values():
        jsonschema.validate(payload, schema)


def test_the_channel_bindings_carry_the_topology_the_worker_declares(
    document: dict[str, Any],
) -> None:
    settings = Settings.model_construct()
    exchanges, queues = topology_objects(settings)
    bindings = [c["bindings"]["amqp"] for c in document["channels"].values()]
    by_queue = {b["queue"]["name"]: b for b in bindings if b["is"] == "queue"}
    by_exchange = {b["exchange"]["name"]: b for b in bindings if b["is"] == "routingKey"}
    delay = by_queue.pop(asyncapi.delay_address(settings))
    for queue in queues:
        if queue.name in {settings.delay_queue(s) for s in DELAY_BUCKETS}:
            ttl = int(queue.name.rsplit(".", 1)[1].removesuffix("s")) * 1000
            assert {**delay["x-arguments"], "x-message-ttl": ttl} == queue.arguments
        else:
            assert by_queue[queue.name]["x-arguments"] == queue.arguments, queue.name
            assert by_queue[queue.name]["queue"]["durable"] is True
    for exchange in exchanges:
        if exchange.name in by_exchange:
            binding = by_exchange[exchange.name]
            assert binding["exchange"]["type"] == exchange.type.value
            assert binding.get("x-arguments", {}) == exchange.arguments
    assert by_exchange[settings.outcome_exchange]["exchange"]["type"] == "topic"
    parameter = document["components"]["parameters"]["delaySeconds"]
    assert parameter["enum"] == [str(s) for s in DELAY_BUCKETS]


def test_the_command_operation_needs_the_app_only_graph_permission(
    document: dict[str, Any],
) -> None:
    [scheme] = [
        _pointer(document, s["$ref"])
        for s in document["operations"]["receiveInviteCommand"]["security"]
    ]
    assert scheme["type"] == "oauth2"
    assert scheme["scopes"] == ["Calls.InitiateGroupCall.All"]
    assert "Calls.InitiateGroupCall.All" in (ROOT / "README.md").read_text()
    traits = document["components"]["messageTraits"]
    assert {"traceparent", "tracestate"} <= set(
        traits["commandProperties"]["headers"]["properties"]
    )

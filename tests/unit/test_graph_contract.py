"""What the worker sends to Graph, read with Microsoft's own Graph v1.0 models (msgraph-sdk).

Each request body is parsed into the SDK's `InvitePostRequestBody` by kiota's JSON parse node,
then written back by kiota's JSON serialisation writer. A property the v1.0 model does not know
lands in some model's `additional_data`; the tests name every such property, so the worker
cannot start sending one unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from kiota_serialization_json.json_parse_node_factory import JsonParseNodeFactory
from kiota_serialization_json.json_serialization_writer import JsonSerializationWriter
from msgraph.generated.communications.calls.item.participants.invite.invite_post_request_body import (  # noqa: E501
    InvitePostRequestBody,
)
from msgraph.generated.models.communications_identity_set import CommunicationsIdentitySet
from msgraph.generated.models.identity_set import IdentitySet

from worker.core.commands import parse_command
from worker.core.invite import build_request

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
TENANT = "11111111-1111-4111-8111-111111111111"
COMMAND_ID = "0b6e3c34-5f0e-4d36-9d0a-3a1c7f1e0099"

#: The properties outside the v1.0 model that Graph's invite document itself sends: example 4
#: puts `phone` in the identitySet's additional data, example 5 puts `identityProvider` in the
#: user identity's (the C#, Java and Python snippets of both examples agree).
DOCUMENT_EXTRAS: dict[str, dict[str, object]] = {
    "example-1-invite-one-participant": {},
    "example-2-invite-several-participants": {},
    "example-3-replace-peer-to-peer-call": {},
    "example-4-invite-pstn-participant": {
        "participants[0].identity.phone": {
            "@odata.type": "#microsoft.graph.identity",
            "id": "+12345678901",
        }
    },
    "example-5-move-participant-between-meetings": {
        "participants[0].identity.user.identityProvider": "AAD"
    },
}


def request_body(command: dict[str, Any]) -> bytes:
    parsed = parse_command(
        json.dumps(command).encode(), content_type=None, default_tenant_id=TENANT, max_bytes=65_536
    )
    return build_request(parsed).body


def read_with_sdk(body: bytes) -> InvitePostRequestBody:
    node = JsonParseNodeFactory().get_root_parse_node("application/json", body)
    model = node.get_object_value(InvitePostRequestBody)
    assert isinstance(model, InvitePostRequestBody)
    return model


def write_with_sdk(model: InvitePostRequestBody) -> Any:
    writer = JsonSerializationWriter()
    writer.write_object_value(None, model)
    return json.loads(writer.get_serialized_content())


def unmodelled(value: object, path: str = "") -> dict[str, object]:
    """Every property that landed in an `additional_data`, by its path in the request body."""
    found: dict[str, object] = {}
    if isinstance(value, list):
        for index, item in enumerate(value):
            found |= unmodelled(item, f"{path}[{index}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        prefix = f"{path}." if path else ""
        for name, extra in getattr(value, "additional_data", {}).items():
            found[prefix + name] = extra
        for field in dataclasses.fields(value):
            if field.name not in {"additional_data", "backing_store"}:
                found |= unmodelled(getattr(value, field.name), prefix + field.name)
    return found


@pytest.mark.parametrize("name", sorted(DOCUMENT_EXTRAS))
def test_each_document_example_is_sent_as_graph_v1_models_it_plus_only_the_documents_extras(
    name: str,
) -> None:
    body = request_body(json.loads((EXAMPLES / f"{name}.json").read_text()))
    model = read_with_sdk(body)
    assert unmodelled(model) == DOCUMENT_EXTRAS[name]
    assert write_with_sdk(model) == json.loads(body)


def test_the_examples_read_as_plain_identity_sets_as_the_document_annotates_them() -> None:
    for name in DOCUMENT_EXTRAS:
        body = request_body(json.loads((EXAMPLES / f"{name}.json").read_text()))
        for participant in read_with_sdk(body).participants or []:
            assert type(participant.identity) is IdentitySet


def test_communications_identity_set_properties_are_all_modelled_under_that_annotation() -> None:
    identity = {
        "@odata.type": "#microsoft.graph.communicationsIdentitySet",
        "applicationInstance": {"@odata.type": "#microsoft.graph.identity", "id": "a1"},
        "guest": {"id": "g1", "displayName": "Guest"},
        "encrypted": {"id": "e1"},
        "onPremises": {"id": "o1"},
        "phone": {"id": "+12345678901"},
    }
    body = request_body(
        {
            "commandId": COMMAND_ID,
            "callId": "57dab8b1-894c-409a-b240-bd8beae78896",
            "participants": [{"identity": identity, "hidden": False}],
        }
    )
    model = read_with_sdk(body)
    assert model.participants is not None
    assert isinstance(model.participants[0].identity, CommunicationsIdentitySet)
    assert unmodelled(model) == {}
    assert write_with_sdk(model) == json.loads(body)


def test_beta_endpoint_type_is_a_property_graph_v1_does_not_model() -> None:
    """Why the worker rejects endpointType: v1.0 reads it as unknown additional data."""
    body = {"participants": [{"endpointType": "default", "identity": {"user": {"id": "u1"}}}]}
    model = read_with_sdk(json.dumps(body).encode())
    assert unmodelled(model) == {"participants[0].endpointType": "default"}

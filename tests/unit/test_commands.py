"""Command validation: what is accepted, what is rejected and how the problem is named."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.commands import Command, parse_command
from worker.core.errors import InvalidCommand

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
DEFAULT_TENANT = "11111111-1111-4111-8111-111111111111"
COMMAND_ID = "0b6e3c34-5f0e-4d36-9d0a-3a1c7f1e0099"


def parse(body: bytes | dict[str, Any], **kwargs: Any) -> Command:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    options: dict[str, Any] = {
        "content_type": "application/json",
        "default_tenant_id": DEFAULT_TENANT,
        "max_bytes": 65_536,
    }
    options.update(kwargs)
    return parse_command(raw, **options)


def problems(body: bytes | dict[str, Any], **kwargs: Any) -> dict[str, str]:
    with pytest.raises(InvalidCommand) as info:
        parse(body, **kwargs)
    return {p.field: p.problem for p in info.value.problems}


def base(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "commandId": COMMAND_ID,
        "callId": "57dab8b1-894c-409a-b240-bd8beae78896",
        "participants": [{"identity": {"user": {"id": "278405a3-f568-4b3e-b684-009193463064"}}}],
    }
    body.update(changes)
    return body


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_document_examples_parse_with_participants_kept_as_written(path: Path) -> None:
    body = json.loads(path.read_text())
    command = parse(body)
    assert command.participants == body["participants"]
    assert command.client_context == body["clientContext"]
    assert command.tenant_id == DEFAULT_TENANT


def test_example_2_as_written_is_rejected_because_graph_would_ignore_all_but_one() -> None:
    body = json.loads((EXAMPLES / "rejected" / "example-2-as-written.json").read_text())
    assert "replacesCallId" in problems(body)["participants"]


def test_defaults_fill_tenant_and_client_context() -> None:
    command = parse(base())
    assert command.tenant_id == DEFAULT_TENANT
    assert command.client_context == COMMAND_ID
    assert command.deadline is None


def test_odata_annotations_and_extra_identity_properties_pass_through_unchanged() -> None:
    participant = {
        "@odata.type": "#microsoft.graph.invitationParticipantInfo",
        "identity": {
            "@odata.type": "#microsoft.graph.identitySet",
            "user": {"id": "u1", "identityProvider": "AAD", "tenantId": DEFAULT_TENANT},
            "conversationIdentityType": "team",
        },
    }
    assert parse(base(participants=[participant])).participants == [participant]


@pytest.mark.parametrize("endpoint_type", ["default", "voicemail", None])
def test_beta_endpoint_type_on_a_participant_is_rejected(endpoint_type: str | None) -> None:
    participant = {"endpointType": endpoint_type, "identity": {"user": {"id": "u1"}}}
    found = problems(base(participants=[participant]))
    assert "beta" in found["participants[0].endpointType"]


COMMUNICATIONS_ONLY = ["applicationInstance", "guest", "encrypted", "onPremises"]


@pytest.mark.parametrize("name", COMMUNICATIONS_ONLY)
@pytest.mark.parametrize("odata_type", [None, "#microsoft.graph.identitySet"])
def test_communications_identity_set_properties_need_that_annotation(
    name: str, odata_type: str | None
) -> None:
    identity: dict[str, Any] = {name: {"id": "x1"}}
    if odata_type is not None:
        identity["@odata.type"] = odata_type
    found = problems(base(participants=[{"identity": identity}]))
    assert "#microsoft.graph.communicationsIdentitySet" in found[f"participants[0].identity.{name}"]


def test_communications_identity_set_properties_pass_under_that_annotation() -> None:
    identity = {
        "@odata.type": "#microsoft.graph.communicationsIdentitySet",
        **{name: {"id": "x1"} for name in COMMUNICATIONS_ONLY},
        "phone": {"id": "+12345678901"},
    }
    participants = [{"identity": identity}]
    assert parse(base(participants=participants)).participants == participants


def test_phone_passes_on_a_plain_identity_set_as_graphs_own_pstn_example_sends_it() -> None:
    participants = [
        {
            "identity": {
                "@odata.type": "#microsoft.graph.identitySet",
                "phone": {"id": "+12345678901"},
            }
        }
    ]
    assert parse(base(participants=participants)).participants == participants


def test_a_deadline_must_carry_its_offset() -> None:
    assert parse(base(deadline="2030-01-01T10:00:00+02:00")).deadline is not None
    assert "deadline" in problems(base(deadline="2030-01-01T10:00:00"))
    assert "deadline" in problems(base(deadline=1_900_000_000))


def test_content_type_parameters_are_allowed_and_other_types_rejected() -> None:
    assert parse(base(), content_type="application/json; charset=utf-8")
    assert parse(base(), content_type=None)
    assert "(message)" in problems(base(), content_type="application/xml")


def test_a_body_over_the_limit_is_rejected_unread() -> None:
    assert "limit" in problems(base(), max_bytes=10)["(message)"]


def test_deeply_nested_json_is_rejected_not_a_crash() -> None:
    assert "nested" in problems(b"[" * 100_000 + b"]" * 100_000, max_bytes=1 << 20)["(message)"]


@pytest.mark.parametrize(
    "call_id", ["..", "a/../b", "a/b", "a?b", "a%2Fb", "a#b", "a\\b", "", " a"]
)
def test_call_ids_that_could_change_the_graph_path_are_rejected(call_id: str) -> None:
    assert "callId" in problems(base(callId=call_id))


@pytest.mark.parametrize("tenant_id", ["common", "../x", "11111111-1111-4111-8111-11111111111/"])
def test_tenant_ids_must_be_uuids(tenant_id: str) -> None:
    assert "tenantId" in problems(base(tenantId=tenant_id))


def test_problems_do_not_echo_phone_numbers() -> None:
    body = base(participants=[{"identity": {"phone": {"id": "12345678901"}}}])
    found = problems(body)
    assert "E.164" in found["participants[0].identity.phone"]
    assert "12345678901" not in json.dumps(found)


def test_the_number_of_problems_reported_is_bounded() -> None:
    body = base(**{f"unknown{i}": i for i in range(100)})
    assert len(problems(body)) == 20


def test_long_unknown_field_names_are_shortened_in_problems() -> None:
    found = problems(base(**{"x" * 1000: 1}))
    assert all(len(field) <= 120 for field in found)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_give_a_command_or_invalid_command_and_nothing_else(body: bytes) -> None:
    with contextlib.suppress(InvalidCommand):
        parse(body)


@settings(max_examples=300, deadline=None)
@given(
    value=json_values,
    fields=st.dictionaries(
        st.sampled_from(
            ["commandId", "callId", "tenantId", "clientContext", "participants", "deadline"]
        ),
        json_values,
    ),
)
def test_arbitrary_json_gives_a_command_or_invalid_command_and_nothing_else(
    value: object, fields: dict[str, object]
) -> None:
    for body in (value, fields, base(**fields)):
        with contextlib.suppress(InvalidCommand):
            parse(json.dumps(body).encode())

"""The command contract: what upstream systems publish, and how a raw message becomes a command.

Everything here is pure: it takes bytes and headers and returns a `Command` or raises
`InvalidCommand` with every problem found, field by field. The participants are validated
against Graph's rules but forwarded exactly as received, so Graph's open shapes
(`@odata.type` annotations, an identity's extra properties) reach it unchanged.

The worker calls Graph v1.0, so the contract follows v1.0's model where the two differ:

- `endpointType` on a participant is rejected: only beta's `invitationParticipantInfo` has it,
  and a property v1.0 does not model is at best ignored there, so no publisher can rely on it.
- `applicationInstance`, `guest`, `encrypted` and `onPremises` are v1.0's
  `communicationsIdentitySet` properties, not `identitySet`'s: they are accepted on an identity
  whose `@odata.type` is `#microsoft.graph.communicationsIdentitySet` and rejected on any other,
  with that annotation named as the fix, rather than sent where Graph may not look for them.
- `phone` is a `communicationsIdentitySet` property too, but it is accepted on a plain
  `identitySet`: Graph's own invite document sends a PSTN participant exactly so (its example
  4, `phone` in the `identitySet`'s additional data), and the Graph SDKs build it the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from worker.core.errors import InvalidCommand, Problem

UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# A Graph call id goes into the request path: only characters that cannot change the path
# (no "/", "?", "#", "%", "\"), and no ".." segment.
_CALL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,254}$")
#: The same rule for the published schema, ".." included (JSON Schema patterns may look
#: ahead; pydantic's regex engine may not, so the code checks ".." in a validator).
_CALL_ID_SCHEMA = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._~-]{0,254}$"
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_JSON_CONTENT_TYPES = frozenset({"application/json", "text/json"})
#: Problems reported per command; a hostile body cannot make the outcome event huge.
MAX_PROBLEMS = 20
_MAX_LOCATION = 120

_OPEN = ConfigDict(extra="allow", strict=True, populate_by_name=False, frozen=True)

COMMUNICATIONS_IDENTITY_SET = "#microsoft.graph.communicationsIdentitySet"
#: `communicationsIdentitySet` properties accepted only under that `@odata.type` (see above).
_COMMUNICATIONS_ONLY = ("applicationInstance", "guest", "encrypted", "onPremises")


class Identity(BaseModel):
    """Graph `identity`; extra properties such as `tenantId` and `identityProvider` pass."""

    model_config = _OPEN
    odata_type: str | None = Field(None, alias="@odata.type")
    id: str | None = Field(None, max_length=256)
    display_name: str | None = Field(None, alias="displayName", max_length=256)


class IdentitySet(BaseModel):
    """Graph `identitySet`, or `communicationsIdentitySet` when annotated so: who is invited.

    `applicationInstance`, `guest`, `encrypted` and `onPremises` need the
    `communicationsIdentitySet` annotation, where Graph v1.0 declares them; `phone` does not,
    because Graph's own PSTN example sends it on a plain `identitySet`.
    """

    model_config = ConfigDict(
        **_OPEN,
        json_schema_extra={
            # The same rule as _communications_only, for the published schema.
            "if": {
                "not": {
                    "required": ["@odata.type"],
                    "properties": {"@odata.type": {"const": COMMUNICATIONS_IDENTITY_SET}},
                }
            },
            "then": {"properties": dict.fromkeys(_COMMUNICATIONS_ONLY, False)},
        },
    )
    odata_type: str | None = Field(None, alias="@odata.type")
    user: Identity | None = None
    application: Identity | None = None
    application_instance: Identity | None = Field(None, alias="applicationInstance")
    device: Identity | None = None
    phone: Identity | None = None
    guest: Identity | None = None
    encrypted: Identity | None = None
    on_premises: Identity | None = Field(None, alias="onPremises")

    @field_validator("application_instance", "guest", "encrypted", "on_premises")
    @classmethod
    def _communications_only(cls, value: Identity | None, info: ValidationInfo) -> Identity | None:
        # Fields validate in declaration order: odata_type is already in info.data.
        if value is not None and info.data.get("odata_type") != COMMUNICATIONS_IDENTITY_SET:
            raise ValueError(
                "Graph v1.0 declares this on communicationsIdentitySet, not identitySet: "
                f'set the identity\'s "@odata.type" to "{COMMUNICATIONS_IDENTITY_SET}"'
            )
        return value

    @field_validator("phone")
    @classmethod
    def _phone_is_e164(cls, phone: Identity | None) -> Identity | None:
        if phone is not None and (phone.id is None or not _E164.fullmatch(phone.id)):
            raise ValueError("phone id must be an E.164 number: + then up to 15 digits")
        return phone

    @model_validator(mode="after")
    def _names_someone(self) -> IdentitySet:
        named = [k for k in type(self).model_fields if k != "odata_type" and getattr(self, k)]
        if not named and not self.model_extra:
            raise ValueError("identity must name who is invited (user, phone, application, ...)")
        return self


#: A property that must be absent; the published schema says so with `{"not": {}}`.
_Absent = Annotated[None, WithJsonSchema({"not": {}})]


class InvitationParticipantInfo(BaseModel):
    """Graph v1.0 `invitationParticipantInfo`, one person or bot to invite.

    Beta's `endpointType` is rejected: v1.0, which the worker calls, does not model it.
    """

    model_config = _OPEN
    odata_type: str | None = Field(None, alias="@odata.type")
    identity: IdentitySet
    hidden: bool | None = None
    participant_id: str | None = Field(None, alias="participantId", max_length=256)
    remove_from_default_audio_routing_group: bool | None = Field(
        None, alias="removeFromDefaultAudioRoutingGroup"
    )
    replaces_call_id: str | None = Field(None, alias="replacesCallId", max_length=256)
    endpoint_type: _Absent = Field(
        None,
        alias="endpointType",
        description="Graph beta only; rejected, because the worker calls Graph v1.0.",
    )

    @field_validator("endpoint_type", mode="before")
    @classmethod
    def _beta_only(cls, value: object) -> None:
        raise ValueError(
            "endpointType is a Graph beta property; v1.0, which the worker calls, does not take it"
        )


class InviteCommand(BaseModel):
    """An "invite participants to this call" command, as upstream systems publish it."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="InviteCommand",
    )
    command_id: str = Field(
        alias="commandId",
        description="UUID naming this command; also the AMQP message_id when one is set.",
        json_schema_extra={"format": "uuid"},
    )
    call_id: str = Field(
        alias="callId",
        description="The Graph call id; it goes into the request path.",
        pattern=_CALL_ID.pattern,
        json_schema_extra={"pattern": _CALL_ID_SCHEMA},
    )
    tenant_id: str | None = Field(
        None,
        alias="tenantId",
        description="Entra tenant of the call; AZURE_TENANT_ID when absent.",
        json_schema_extra={"format": "uuid"},
    )
    client_context: str | None = Field(
        None,
        alias="clientContext",
        min_length=1,
        max_length=256,
        description="Graph's clientContext; the commandId when absent.",
    )
    participants: list[InvitationParticipantInfo] = Field(min_length=1, max_length=5)
    deadline: AwareDatetime | None = Field(
        None,
        strict=False,
        description="RFC 3339 time with offset; after it, Graph is not called.",
    )

    @field_validator("command_id", "tenant_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is not None and not UUID.fullmatch(value):
            raise ValueError("must be a UUID")
        return value

    @field_validator("call_id")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline_is_text(cls, value: object) -> object:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an RFC 3339 time string")
        return value

    @field_validator("participants")
    @classmethod
    def _one_participant_when_replacing_or_moving(
        cls, participants: list[InvitationParticipantInfo]
    ) -> list[InvitationParticipantInfo]:
        if len(participants) > 1 and any(
            p.replaces_call_id is not None or p.participant_id is not None for p in participants
        ):
            raise ValueError(
                "replacesCallId and participantId allow exactly one participant; "
                "Graph would silently ignore the others"
            )
        return participants


@dataclass(frozen=True, slots=True)
class Command:
    """A validated command, defaults resolved, participants kept as received."""

    command_id: str
    call_id: str
    tenant_id: str
    client_context: str
    participants: list[Any]
    deadline: datetime | None
    #: `fingerprint()`, once computed: the settled memory and the fleet's records each ask.
    _fingerprint: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> bytes:
        """16 bytes that differ for commands Graph would see differently.

        Covers what the invite request carries (call, tenant, participants, clientContext);
        the deadline is left out, so an upstream that re-publishes a command with a new
        deadline is not refused.
        """
        if self._fingerprint is None:
            canonical = json.dumps(
                [self.call_id, self.tenant_id, self.client_context, self.participants],
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            )
            digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()[:16]
            object.__setattr__(self, "_fingerprint", digest)
            return digest
        return self._fingerprint


def parse_command(
    body: bytes,
    *,
    content_type: str | None,
    default_tenant_id: str,
    max_bytes: int,
    body_size: int | None = None,
) -> Command:
    """Turn an untrusted message body into a `Command`, or raise `InvalidCommand`.

    The AMQP message_id is not compared with the commandId: many client libraries set a
    message_id of their own, and the body is the contract. `body_size` is the size as
    published when `body` is not all of it (a body dropped unread for its size).
    """
    size = len(body) if body_size is None else body_size
    raw = _decode(body, content_type=content_type, max_bytes=max_bytes, size=size)
    try:
        model = InviteCommand.model_validate(raw)
    except ValidationError as exc:
        raise InvalidCommand(_problems(exc), command=raw) from None
    return Command(
        command_id=model.command_id,
        call_id=model.call_id,
        tenant_id=(model.tenant_id or default_tenant_id).lower(),
        client_context=model.client_context or model.command_id,
        participants=raw["participants"],
        deadline=model.deadline,
    )


def _decode(body: bytes, *, content_type: str | None, max_bytes: int, size: int) -> dict[str, Any]:
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in _JSON_CONTENT_TYPES:
            raise InvalidCommand([Problem("(message)", "content type must be application/json")])
    if size > max_bytes:
        raise InvalidCommand(
            [Problem("(message)", f"body is {size} bytes; the limit is {max_bytes}")]
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCommand([Problem("(message)", "body is not UTF-8")]) from None
    try:
        raw = json.loads(text)
    except RecursionError:
        raise InvalidCommand([Problem("(message)", "body is nested too deeply")]) from None
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid JSON"
        raise InvalidCommand([Problem("(message)", f"body is not JSON: {reason}")]) from None
    if not isinstance(raw, dict):
        raise InvalidCommand([Problem("(message)", "body must be a JSON object")])
    return raw


def _problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[
        :MAX_PROBLEMS
    ]:
        problems.append(Problem(_location(error["loc"]), _message(error)))
    return problems


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    text = text or "(body)"
    return text if len(text) <= _MAX_LOCATION else text[: _MAX_LOCATION - 1] + "…"


def _message(error: ErrorDetails) -> str:
    if error["type"] == "string_pattern_mismatch":
        return "has characters that are not allowed (letters, digits and . _ ~ - only)"
    message: str = error["msg"]
    # Pydantic's "Value error, must be a UUID" reads better without its prefix.
    return message.removeprefix("Value error, ")

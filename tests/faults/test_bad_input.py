"""Bad input thrown at a running worker: random bytes, random JSON, deep nesting, huge strings,
wrong types in every field, wrong content types.

One worker process serves every example (Hypothesis runs an inner function against it). Each
message must get exactly one `invite.rejected`, correlated by its commandId when the body
carried a usable one and by its message_id otherwise, and exactly one dead-letter entry marked
`x-invite-fault-reason: rejected`; Graph is never called for any of them, and after them a valid
command is still accepted: the worker keeps consuming.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st

from tests.faults.harness import Books, Scenario, Sent
from tests.support.harness import command
from worker.devtools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

MAX_COMMAND_BYTES = 65_536
#: Examples per run; FAULT_SUITE_EXAMPLES raises it for a longer hunt than CI's.
EXAMPLES = int(os.environ.get("FAULT_SUITE_EXAMPLES", "200"))
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_JSON_TYPES = frozenset({"application/json", "text/json"})


class BadMessage:
    """One message to throw at the worker (a plain class: Hypothesis prints it with `repr`)."""

    __slots__ = ("body", "content_type", "kind")

    def __init__(self, kind: str, body: bytes, content_type: str | None) -> None:
        self.kind = kind
        self.body = body
        self.content_type = content_type

    def __repr__(self) -> str:
        shown = self.body if len(self.body) <= 120 else self.body[:120] + b"..."
        return (
            f"BadMessage({self.kind!r}, {shown!r} ({len(self.body)} bytes), {self.content_type!r})"
        )


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


#: Nesting the worker reads for sure, and nesting it refuses for sure ("nested too deeply").
#: In between, where the limit falls depends on the interpreter's recursion limit and stack.
READABLE_DEPTH, UNREADABLE_DEPTH = 500, 5_000


def readable(message: BadMessage) -> bool | None:
    """Whether the worker can decode the body as JSON (None: it depends on the interpreter)."""
    media_type = (message.content_type or "").split(";", 1)[0].strip().lower()
    if (media_type and media_type not in _JSON_TYPES) or len(message.body) > MAX_COMMAND_BYTES:
        return False
    try:
        text = message.body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    depth = nesting_depth(text)
    if depth > READABLE_DEPTH:
        return False if depth >= UNREADABLE_DEPTH else None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def usable_command_id(body: bytes) -> str | None:
    """The README's "usable commandId": a non-empty string of at most 256 characters."""
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        match = re.search(rb'^\{"commandId": "([0-9a-f-]{36})"', body)
        return match.group(1).decode() if match else None
    command_id = raw.get("commandId") if isinstance(raw, dict) else None
    if isinstance(command_id, str) and 0 < len(command_id) <= 256:
        return command_id
    return None


def _could_be_a_command(value: object) -> bool:
    return isinstance(value, dict) and {"commandId", "callId", "participants"} <= value.keys()


# --- Strategies --------------------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
_not_strings = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
_content_types = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-8", "text/json"]
)


def _valid_body() -> dict[str, Any]:
    return command(command_id=str(uuid.uuid4()), call_id=f"call-{uuid.uuid4().hex[:12]}")


@st.composite
def random_bytes(draw: st.DrawFn) -> BadMessage:
    content_type = draw(st.sampled_from([None, "application/json", "application/octet-stream"]))
    return BadMessage("random bytes", draw(st.binary(max_size=300)), content_type)


@st.composite
def random_json(draw: st.DrawFn) -> BadMessage:
    value = draw(_json_values)
    assume(not _could_be_a_command(value))
    return BadMessage("random JSON", json.dumps(value).encode(), draw(_content_types))


def nested(depth: int, shape: str) -> bytes:
    """JSON nested `depth` levels deep: as the whole body, or as a command's participants."""
    if shape == "lists":
        return b"[" * depth + b"]" * depth
    if shape == "objects":
        return b'{"a":' * depth + b"1" + b"}" * depth
    inner = b"[" * depth + b"]" * depth
    head = json.dumps({"commandId": str(uuid.uuid4()), "callId": "abc"})[:-1].encode()
    return head + b', "participants": ' + inner + b"}"


@st.composite
def deep_nesting(draw: st.DrawFn) -> BadMessage:
    depth = draw(st.one_of(st.integers(2, 1_200), st.integers(1_200, 12_000)))
    shape = draw(st.sampled_from(["lists", "objects", "participants"]))
    return BadMessage(f"nested {depth} deep ({shape})", nested(depth, shape), draw(_content_types))


@st.composite
def huge_strings(draw: st.DrawFn) -> BadMessage:
    size = draw(
        st.one_of(st.integers(257, MAX_COMMAND_BYTES - 1_000), st.integers(65_537, 400_000))
    )
    where = draw(st.sampled_from(["clientContext", "callId", "commandId", "participants", "raw"]))
    if where == "raw":
        return BadMessage(f"raw {size} bytes", b'"' + b"x" * size + b'"', "application/json")
    body = _valid_body()
    body[where] = "x" * size
    return BadMessage(f"{size}-character {where}", json.dumps(body).encode(), draw(_content_types))


def _not_uuid(text: str) -> bool:
    return not _UUID.fullmatch(text)


#: Values that are wrong for each field of a command (None only where the field is required).
_WRONG: dict[str, st.SearchStrategy[Any]] = {
    "commandId": st.none() | _not_strings | st.text(max_size=40).filter(_not_uuid),
    "callId": st.none()
    | _not_strings
    | st.sampled_from(["", "../users", "a/b", "a?b", "a%2Fb", "a..b", ".hidden", "x" * 300]),
    "tenantId": _not_strings | st.text(max_size=40).filter(_not_uuid),
    "clientContext": _not_strings | st.just(""),
    "participants": st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=10)
    | st.just([])
    | st.lists(_not_strings | st.text(max_size=5), min_size=1, max_size=3),
    "deadline": _not_strings
    | st.sampled_from(["tomorrow", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z", ""]),
    # Any property makes an identity name someone (Graph's open shape): only {} names nobody.
    "participants[0].identity": st.none()
    | st.booleans()
    | st.integers()
    | st.lists(st.integers(), max_size=3)
    | st.text(max_size=10)
    | st.just({}),
    "participants[0].hidden": st.text(max_size=5) | st.integers() | st.lists(st.booleans()),
    "participants[0].identity.user.id": _not_strings,
    "participants[0].identity.phone.id": st.text(max_size=20).filter(
        lambda t: not re.fullmatch(r"\+[1-9][0-9]{1,14}", t)
    ),
    "(unknown field)": _json_values,
}


@st.composite
def wrong_types(draw: st.DrawFn) -> BadMessage:
    field = draw(st.sampled_from(sorted(_WRONG)))
    value = draw(_WRONG[field])
    body = _valid_body()
    participant = body["participants"][0]
    match field:
        case "participants[0].identity":
            participant["identity"] = value
        case "participants[0].hidden":
            participant["hidden"] = value
        case "participants[0].identity.user.id":
            participant["identity"]["user"]["id"] = value
        case "participants[0].identity.phone.id":
            participant["identity"] = {"phone": {"id": value}}
        case "(unknown field)":
            body["priority"] = value
        case _:
            body[field] = value
    return BadMessage(f"wrong {field}", json.dumps(body).encode(), draw(_content_types))


@st.composite
def wrong_content_type(draw: st.DrawFn) -> BadMessage:
    content_type = draw(st.sampled_from(["text/plain", "application/xml", "application/x-json"]))
    return BadMessage(
        "valid body, wrong content type", json.dumps(_valid_body()).encode(), content_type
    )


bad_messages = st.one_of(
    random_bytes(),
    random_json(),
    deep_nesting(),
    huge_strings(),
    wrong_types(),
    wrong_content_type(),
)


# --- The test -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_bad_input_is_rejected_and_dead_lettered_once_each_and_the_worker_keeps_consuming(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    with asyncio.Runner() as runner:
        scenario = Scenario(
            "bad input (hypothesis)",
            amqp_url=amqp_url,
            simulator=simulator,
            directory=tmp_path,
            MAX_COMMAND_BYTES=MAX_COMMAND_BYTES,
        )
        runner.run(scenario.__aenter__())
        try:
            bad = _throw_bad_input_at_a_running_worker(runner, scenario)
        except BaseException as exc:
            runner.run(scenario.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        runner.run(scenario.__aexit__(None, None, None))

    books, valid = bad
    assert books.first_outcome(valid.key).routing_key == "invite.accepted"
    rejected = [s for s in books.sent.values() if s.key != valid.key]
    assert len(rejected) >= 50
    calls = {s.key: 0 for s in rejected} | {valid.key: 1}
    assert not books.check(max_calls=calls, dead_letters=len(rejected))
    for sent in rejected:
        [outcome] = books.outcomes_for(sent.key)
        assert outcome.routing_key == "invite.rejected", sent
        assert outcome.data["problems"], sent
    letters = Counter(letter.message_id for letter in books.dead_letters)
    assert letters == Counter(s.message_id for s in rejected)
    for letter in books.dead_letters:
        assert letter.headers.get("x-invite-fault-reason") == "rejected", letter.headers
        assert letter.body == next(s.body for s in rejected if s.message_id == letter.message_id)


def _throw_bad_input_at_a_running_worker(
    runner: asyncio.Runner, scenario: Scenario
) -> tuple[Books, Sent]:
    worker = runner.run(scenario.start_worker())

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        # No shrinking: each example is a round trip through the worker; the failing example
        # is reported as drawn.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @example(BadMessage("10,000 levels of lists", nested(10_000, "lists"), "application/json"))
    @example(BadMessage("10,000 levels of objects", nested(10_000, "objects"), None))
    @example(BadMessage("1 MiB string", b'"' + b"x" * 1_048_576 + b'"', "application/json"))
    @example(BadMessage("not UTF-8", b'{"commandId": "\xff\xfe"}', "application/json"))
    @example(BadMessage("empty body", b"", None))
    @example(BadMessage("JSON array", b"[1, 2]", None))
    @given(message=bad_messages)
    def rejected_once_and_dead_lettered(message: BadMessage) -> None:
        event(message.kind.split(" ")[0] if message.kind[0].isalpha() else "huge")
        message_id = f"bad-{uuid.uuid4()}"
        can_read = readable(message)
        command_id = usable_command_id(message.body) if can_read is not False else None
        if can_read is None and command_id is not None:
            # Either rule gives the same key when the message_id is the commandId.
            message_id = command_id
        # The README: correlated by the commandId when the body carried a usable one.
        key = command_id or message_id
        assume(key not in scenario.sent)
        sent = Sent(key, message_id, message.body, message.content_type, command_id=command_id)
        runner.run(scenario.publish(sent))
        runner.run(
            scenario.wait_until(
                lambda: key in scenario.settled_keys(),
                timeout=15,
                what=f"outcome for {message!r}",
                interval=0.02,
            )
        )
        kinds = [o.routing_key for o in scenario.outcomes if o.correlation_id == key]
        assert kinds == ["invite.rejected"], (message, kinds)
        assert worker.alive()

    rejected_once_and_dead_lettered()
    valid_body = _valid_body()
    valid = Sent(
        valid_body["commandId"],
        valid_body["commandId"],
        json.dumps(valid_body).encode(),
        "application/json",
        call_id=valid_body["callId"],
        command_id=valid_body["commandId"],
    )
    runner.run(scenario.publish(valid))
    books = runner.run(scenario.finish(timeout=30))
    return books, valid

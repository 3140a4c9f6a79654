"""AMQP short-string properties set from untrusted input fit their type, or are replaced."""

from __future__ import annotations

import pytest
from pamqp import commands, frame, header

from worker.amqp.publishing import fits_shortstr, fitted_correlation_id

LONG_ASCII = "a" * 256
LONG_TWO_BYTE = "é" * 200
LONE_SURROGATE = "\ud800abc"


def encodes_as_correlation_id(value: str) -> bool:
    """Whether pamqp (what aio-pika publishes with) can write `value` as a correlation_id."""
    properties = commands.Basic.Properties(correlation_id=value)
    try:
        frame.marshal(header.ContentHeader(0, 0, properties), 1)
    except (TypeError, ValueError, UnicodeEncodeError):
        return False
    return True


@pytest.mark.parametrize(
    ("value", "fits"),
    [
        ("a" * 255, True),
        ("é" * 127, True),
        (LONG_ASCII, False),
        (LONG_TWO_BYTE, False),
        (LONE_SURROGATE, False),
        ("", True),
    ],
)
def test_a_short_string_fits_exactly_when_the_amqp_library_can_write_it(
    value: str, *, fits: bool
) -> None:
    assert fits_shortstr(value) is fits
    assert encodes_as_correlation_id(value) is fits


@pytest.mark.parametrize("command_id", [LONG_ASCII, LONG_TWO_BYTE, LONE_SURROGATE])
def test_a_commandid_that_does_not_fit_falls_back_to_the_message_id_and_says_so(
    command_id: str,
) -> None:
    correlation, fallback = fitted_correlation_id(command_id, "msg-1")
    assert (correlation, fallback) == ("msg-1", "message_id")
    assert encodes_as_correlation_id("msg-1")


def test_without_a_usable_message_id_the_correlation_id_is_left_out_and_says_so() -> None:
    assert fitted_correlation_id(LONG_ASCII, None) == (None, "none")


def test_a_commandid_that_fits_is_the_correlation_id() -> None:
    command_id = "3f6c1d39-9a7b-4b39-9d43-5b5e6f1e2a10"
    assert fitted_correlation_id(command_id, "msg-1") == (command_id, None)
    assert fitted_correlation_id(None, "msg-1") == ("msg-1", None)


def test_a_rejected_command_with_a_lone_surrogate_id_gets_an_event_that_serialises() -> None:
    from worker.core import outcomes  # noqa: PLC0415
    from worker.core.errors import InvalidCommand, Problem  # noqa: PLC0415

    error = InvalidCommand(
        [Problem("commandId", "must be a UUID")], command={"commandId": "\ud800"}
    )
    event = outcomes.from_error(
        error, None, attempts=0, duration_ms=0, client_request_id=None, source="urn:test"
    )
    assert event.data.command_id is None
    assert b'"commandId":null' in event.to_json()

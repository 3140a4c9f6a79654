"""Log lines are JSON data, and secrets and phone numbers never reach them."""

from __future__ import annotations

import io
import json
import logging

import structlog

from worker.observability import logs


def render(**fields: object) -> dict[str, object]:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    structlog.get_logger("test").info("something.happened", **fields)
    line: dict[str, object] = json.loads(stream.getvalue().splitlines()[-1])
    return line


def test_lines_are_json_with_event_level_and_timestamp() -> None:
    line = render(command_id="c-1")
    assert line["event"] == "something.happened"
    assert line["level"] == "info"
    assert line["command_id"] == "c-1"
    assert "timestamp" in line


def test_secret_fields_are_redacted_wherever_they_appear() -> None:
    line = render(access_token="eyJ0eXAi", detail={"client_secret": "s3cret", "ok": 1})
    assert line["access_token"] == "[redacted]"
    assert line["detail"] == {"client_secret": "[redacted]", "ok": 1}


def test_phone_numbers_are_masked_to_their_last_digits() -> None:
    line = render(note="calling +12345678901 now", numbers=["+442071838750"])
    assert line["note"] == "calling +***901 now"
    assert line["numbers"] == ["+***750"]


def test_every_number_a_command_accepts_is_masked_the_short_ones_whole() -> None:
    """Commands accept E.164 numbers of 2 to 15 digits; none of them reaches a log line."""
    line = render(note="short +12 and +123456 and +1234567", number="+99")
    assert line["note"] == "short +*** and +*** and +***567"
    assert line["number"] == "+***"


def test_uuids_and_timestamps_are_not_mistaken_for_phone_numbers() -> None:
    value = "278405a3-f568-4b3e-b684-009193463064 at 2026-11-28T10:00:00+00:00"
    assert render(note=value)["note"] == value


def test_standard_library_log_records_use_the_same_json_shape() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    logging.getLogger("aio_pika").warning("connection lost to %s", "broker")
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["event"] == "connection lost to broker"
    assert line["level"] == "warning"
    assert line["logger"] == "aio_pika"


def test_a_lone_surrogate_from_a_command_still_makes_a_json_line() -> None:
    # JSON lets a command carry "\ud800", which orjson (the fast encoder) refuses.
    line = render(command_id="c-\ud800", call_id="caf\u00e9")
    assert line["command_id"] == "c-\ud800"
    assert line["call_id"] == "caf\u00e9"


def test_values_json_cannot_encode_are_written_as_their_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "opaque-value"

    assert render(thing=Opaque())["thing"] == "opaque-value"

"""Logging: structlog to stdout, JSON lines for log aggregation, readable on a terminal.

Libraries that use the standard `logging` module (aio-pika, MSAL, httpx) go through the
same renderer, so every line on stdout has the same shape. A last processor masks what
must never reach a log line, whoever wrote the line: secrets by key, phone numbers by shape.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from worker import __version__

_SECRET_KEYS = re.compile(r"token|secret|password|passphrase|authorization|credential", re.I)
# Every E.164 number a command accepts: + and 2 to 15 digits. A time-zone offset ("+10:00")
# is not one.
_PHONE = re.compile(r"(?<![\w+])\+[1-9]\d{1,14}(?![\d:])")
#: Numbers this long keep their last three digits, so that an operator can tell two apart;
#: shorter ones would give away too much of themselves and are masked whole.
_KEEP_TAIL_FROM = 7


def _mask_phone(match: re.Match[str]) -> str:
    number = match.group(0)
    return f"+***{number[-3:]}" if len(number) - 1 >= _KEEP_TAIL_FROM else "+***"


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    # Field names come from a small, fixed set: each is checked once.
    return _SECRET_KEYS.search(key) is not None


def redact(value: Any) -> Any:
    if isinstance(value, str):
        # Most strings hold no "+" at all; only those can hold an E.164 number.
        return _PHONE.sub(_mask_phone, value) if "+" in value else value
    if isinstance(value, dict):
        return {k: "[redacted]" if _is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = "[redacted]"
        elif value is not None and not isinstance(value, int | float):
            event_dict[key] = redact(value)
    return event_dict


def _dumps(event: Any, **kwargs: Any) -> str:
    """A log line as JSON: orjson, or the standard library's for what orjson refuses.

    orjson is several times faster than `json.dumps` for the canonical line; it refuses
    strings with lone surrogates (which a JSON command may carry), and those lines are
    written by the standard library's encoder, escaped.
    """
    try:
        return orjson.dumps(event, default=kwargs.get("default")).decode()
    except TypeError:
        return json.dumps(event, **kwargs)


def service_processor(service: str, version: str) -> Any:
    """Adds the service's name and version to every line, whoever wrote it."""

    def add_service(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        event_dict.setdefault("version", version)
        return event_dict

    return add_service


def configure(
    level: str = "INFO",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    service: str = "invite-worker",
    version: str = __version__,
) -> None:
    """Set up structlog and the standard library's logging once, at start-up."""
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        service_processor(service, version),
        redact_processor,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries speak up only when something is wrong; MSAL at DEBUG would log token details.
    root.setLevel(logging.WARNING)

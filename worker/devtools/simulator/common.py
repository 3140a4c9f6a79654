"""JSON helpers the simulator's endpoints share: answers, request bodies, number checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeGuard

from worker.devtools.simulator.http import Response


def _json_response(
    status: int, payload: object, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, [("Content-Type", "application/json; charset=utf-8"), *headers])


def _json_value(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = _json_value(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)

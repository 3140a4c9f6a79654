"""The ``/_simulator/...`` admin routes: read the records, arm faults, reset, set latency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Protocol

from worker.devtools.simulator.common import _is_number, _json_response, _json_value
from worker.devtools.simulator.entra import RecordedTokenRequest
from worker.devtools.simulator.faults import FaultRule, _rule_from_json
from worker.devtools.simulator.graph import RecordedInvite, _GraphError
from worker.devtools.simulator.http import Request, Response


class Controls(Protocol):
    """What the admin routes read and change (a ``Simulator``)."""

    latency: float

    @property
    def invites(self) -> list[RecordedInvite]: ...

    @property
    def token_requests(self) -> list[RecordedTokenRequest]: ...

    @property
    def faults(self) -> list[tuple[FaultRule, int | None]]: ...

    def set_faults(self, rules: Sequence[FaultRule]) -> None: ...

    def reset(self) -> None: ...


def _admin(  # noqa: PLR0911 - a route table
    simulator: Controls, request: Request, name: str
) -> Response:
    try:
        match request.method, name:
            case "GET", "invites":
                return _json_response(200, [asdict(record) for record in simulator.invites])
            case "GET", "tokens":
                return _json_response(200, [asdict(record) for record in simulator.token_requests])
            case "GET", "faults":
                armed = [asdict(rule) | {"remaining": left} for rule, left in simulator.faults]
                return _json_response(200, armed)
            case "PUT", "faults":
                rules = _json_value(request.body)
                if not isinstance(rules, list):
                    raise ValueError("the body must be a JSON list of fault rules")
                simulator.set_faults([_rule_from_json(rule) for rule in rules])
                return _json_response(200, {"faults": len(rules)})
            case "POST", "reset":
                simulator.reset()
                return _json_response(200, {"reset": True})
            case "PUT", "latency":
                latency = _json_value(request.body)
                if not (isinstance(latency, dict) and _is_number(latency.get("seconds"))):
                    raise ValueError('the body must be {"seconds": <number>}')
                simulator.latency = latency["seconds"]
                return _json_response(200, {"seconds": simulator.latency})
            case "GET", "latency":
                return _json_response(200, {"seconds": simulator.latency})
    except (ValueError, TypeError) as exc:
        raise _GraphError(400, "BadRequest", str(exc)) from None
    raise _GraphError(404, "ResourceNotFound", f"No admin route {request.method} {name}.")

"""JSON Schemas of the published contract, generated from the pydantic models.

The AsyncAPI document (`worker.ops.asyncapi`) is written beside them. `schemas/` in the
repository holds their output; a test fails when the two drift apart.
Regenerate with `make schemas` (`invite-worker schemas --directory schemas`); `--check` exits 1
when the files have drifted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from worker.core.commands import InviteCommand
from worker.core.outcomes import (
    AcceptedData,
    ExpiredData,
    FailedData,
    OutcomeEvent,
    OutcomeKind,
    RejectedData,
)
from worker.ops import asyncapi

_BASE = "https://invite-worker.schemas/"
_DATA: dict[OutcomeKind, type[BaseModel]] = {
    OutcomeKind.ACCEPTED: AcceptedData,
    OutcomeKind.FAILED: FailedData,
    OutcomeKind.REJECTED: RejectedData,
    OutcomeKind.EXPIRED: ExpiredData,
}


def _outcome_schema(kind: OutcomeKind, data: type[BaseModel]) -> dict[str, Any]:
    schema = OutcomeEvent.model_json_schema(by_alias=True, mode="serialization")
    definitions = schema.setdefault("$defs", {})
    data_schema = data.model_json_schema(by_alias=True, mode="serialization")
    definitions.update(data_schema.pop("$defs", {}))
    definitions[data.__name__] = data_schema
    schema["properties"]["data"] = {"$ref": f"#/$defs/{data.__name__}"}
    schema["properties"]["type"] = {"const": kind.value, "type": "string"}
    # Only the data model of this kind is reachable; drop the other kinds' definitions.
    for other in _DATA.values():
        if other is not data:
            definitions.pop(other.__name__, None)
    definitions.pop("OutcomeKind", None)
    schema["title"] = f"{kind.value} outcome event"
    return schema


def generate() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema, for the command and each outcome event."""
    command = InviteCommand.model_json_schema(by_alias=True, mode="validation")
    schemas = {"command.schema.json": command}
    for kind, data in _DATA.items():
        schemas[f"{kind.value}.schema.json"] = _outcome_schema(kind, data)
    for name, schema in schemas.items():
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = _BASE + name
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def files(directory: Path) -> dict[str, str]:
    """File name → text: the JSON Schemas, and the AsyncAPI document built on them.

    The document's message examples are the commands in `directory`/examples.
    """
    texts = {name: render(schema) for name, schema in generate().items()}
    texts[asyncapi.FILE_NAME] = asyncapi.render(asyncapi.document(directory / "examples"))
    return texts


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files(directory).items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def drifted(directory: Path) -> list[str]:
    """Names of files in `directory` that differ from what the models generate."""
    return [
        name
        for name, text in files(directory).items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]

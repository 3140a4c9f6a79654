"""Turn a CustomResourceDefinition's openAPIV3Schema into a JSON Schema for tests/deploy/.

Usage: `python k8s/schemas/from_crd.py CRD.yaml VERSION SOURCE > GROUP-VERSION-KIND.json`, with
SOURCE saying where the CRD came from (the schema's `$comment` records it).

The API server accepts what the CRD's schema describes and, with strict field validation
(kubectl's default, `--validate=strict`), refuses unknown fields rather than pruning them. This
keeps the CRD's schema as it is and adds what the server checks beside it:
`additionalProperties: false` on every object with declared properties (except where the CRD
preserves unknown fields), `nullable` as JSON Schema's null type, the apiVersion and kind the
resource must carry and the ObjectMeta fields the manifests here use; and it moves Go's inline
regex flags before the `^`, the only place Python's re takes them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

#: The same subset of ObjectMeta as the KEDA schemas beside this file check.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {
            "type": "string",
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
            "maxLength": 253,
        },
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(node: Any) -> Any:
    """The OpenAPI schema `node` as JSON Schema, unknown fields refused."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and (flags := re.match(r"\^(\(\?[a-z]+\))", pattern)):
        # Go's regexp takes inline flags anywhere; Python's re only at the start.
        out["pattern"] = flags.group(1) + "^" + pattern[flags.end() :]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def convert(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://invite-worker.invalid/k8s/schemas/{group}-{version}-{kind.lower()}.json",
        "title": f"{kind} ({group}/{version})",
        "$comment": (
            f"The openAPIV3Schema of the {kind} CRD of {source}, converted by "
            "k8s/schemas/from_crd.py: unchanged but for "
            "additionalProperties: false on objects with declared properties (the API "
            "server's strict field validation), nullable as a null type, Go's inline regex "
            "flags moved to the front, apiVersion and kind "
            "as constants and metadata as the ObjectMeta subset the KEDA schemas check."
        ),
        **schema,
    }


def main() -> None:
    path, version, source = sys.argv[1:]
    crd = yaml.safe_load(Path(path).read_text())
    json.dump(convert(crd, version, source), sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

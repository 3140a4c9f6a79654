"""The AsyncAPI 3.0 document of the worker's messaging contract, built from the code.

Channels and their AMQP bindings come from the topology the worker declares
(`worker.amqp.topology`, with the default queue and exchange names), the operations from the
outcome kinds, the message examples from `schemas/examples/`, and the payloads are `$ref`s
to the JSON Schema files generated beside it, so that the document cannot drift from the
models. `invite-worker schemas` writes it as `asyncapi.yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from worker import __version__
from worker.amqp.topology import DELAY_BUCKETS, ExchangeSpec, QueueSpec, topology_objects
from worker.core.outcomes import OutcomeKind
from worker.settings import Settings

FILE_NAME = "asyncapi.yaml"
#: The application permission that app-only Graph invites need (README, "Running it").
GRAPH_PERMISSION = "Calls.InitiateGroupCall.All"
_AMQP_BINDING = "0.3.0"
_JSON_SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
#: What each outcome means, for the operation's summary.
_OUTCOME_SUMMARIES = {
    OutcomeKind.ACCEPTED: "Graph answered 2xx: the invitation is under way.",
    OutcomeKind.FAILED: "Graph refused or could not be reached, or Entra ID issued no token.",
    OutcomeKind.REJECTED: "The command is invalid; its message is in the dead-letter queue.",
    OutcomeKind.EXPIRED: "The command's deadline passed before Graph could be called.",
}


def _ref(*parts: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)}


def _name(kind: OutcomeKind) -> str:
    """`invite.accepted` → `inviteAccepted`: a component key (no dots, by convention)."""
    head, tail = kind.value.split(".")
    return head + tail.capitalize()


def _queue_binding(queue: QueueSpec) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": queue.name,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": "/",
            },
            "x-arguments": dict(queue.arguments),
            "bindingVersion": _AMQP_BINDING,
        }
    }


def _exchange_binding(exchange: ExchangeSpec) -> dict[str, Any]:
    binding: dict[str, Any] = {
        "is": "routingKey",
        "exchange": {
            "name": exchange.name,
            "type": exchange.type.value,
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        },
        "bindingVersion": _AMQP_BINDING,
    }
    if exchange.arguments:
        binding["x-arguments"] = dict(exchange.arguments)
    return {"amqp": binding}


def delay_address(settings: Settings) -> str:
    """The delay queues' name, `{seconds}` standing for the bucket (`Settings.delay_queue`)."""
    return settings.delay_queue(0).removesuffix("0s") + "{seconds}s"


def _channels(settings: Settings) -> dict[str, Any]:
    exchanges, queues = topology_objects(settings)
    exchange = {e.name: e for e in exchanges}
    queue = {q.name: q for q in queues}
    delay = queue[settings.delay_queue(DELAY_BUCKETS[0])]
    delay_binding = _queue_binding(delay)
    delay_binding["amqp"]["queue"]["name"] = delay_address(settings)
    delay_binding["amqp"]["x-arguments"]["x-message-ttl"] = "{seconds} * 1000 (milliseconds)"
    command_messages = {"inviteCommand": _ref("components", "messages", "inviteCommand")}
    outcome_messages = {
        _name(kind): _ref("components", "messages", _name(kind)) for kind in OutcomeKind
    }
    return {
        "commands": {
            "address": settings.command_queue,
            "title": "Command queue",
            "description": (
                "Quorum queue of invite commands. Publish to the default exchange with this "
                "queue's name as the routing key, persistent, with publisher confirms. A "
                f"command delivered more than `x-delivery-limit` ({settings.delivery_limit}) "
                "times, or rejected as invalid, is dead-lettered to "
                f"`{settings.dead_letter_exchange}`."
            ),
            "messages": command_messages,
            "bindings": _queue_binding(queue[settings.command_queue]),
        },
        "deadLetterExchange": {
            "address": settings.dead_letter_exchange,
            "title": "Dead-letter exchange",
            "description": f"Fanout exchange bound to `{settings.dead_letter_queue}`.",
            "messages": command_messages,
            "bindings": _exchange_binding(exchange[settings.dead_letter_exchange]),
        },
        "deadLetters": {
            "address": settings.dead_letter_queue,
            "title": "Dead-letter queue",
            "description": (
                "Invalid commands and poison messages, with `x-invite-*` headers that say "
                "why (`invite-worker dead-letters list`)."
            ),
            "messages": command_messages,
            "bindings": _queue_binding(queue[settings.dead_letter_queue]),
        },
        "delayQueues": {
            "address": delay_address(settings),
            "title": "Delay queues",
            "description": (
                "Quorum queues that hold retried commands for a fixed time each, then "
                f"dead-letter them back into `{settings.command_queue}` through the default "
                "exchange. Written and read by the worker alone."
            ),
            "parameters": {"seconds": _ref("components", "parameters", "delaySeconds")},
            "messages": command_messages,
            "bindings": delay_binding,
        },
        "outcomes": {
            "address": settings.outcome_exchange,
            "title": "Outcome exchange",
            "description": (
                "Topic exchange of outcome events, one per command, delivered at least once "
                "(de-duplicate on the CloudEvents `id`). The routing key is the outcome. Bind a "
                "queue of your own with `invite.#` or one routing key; an event no binding "
                f"matches goes to the alternate exchange `{settings.unrouted_outcome_queue}`."
            ),
            "messages": outcome_messages,
            "bindings": _exchange_binding(exchange[settings.outcome_exchange]),
        },
        "unroutedOutcomes": {
            "address": settings.unrouted_outcome_queue,
            "title": "Unrouted outcomes",
            "description": (
                "Alternate exchange of the outcome exchange (fanout) and the quorum queue of "
                "the same name bound to it: outcome events that matched no binding."
            ),
            "messages": outcome_messages,
            "bindings": _queue_binding(queue[settings.unrouted_outcome_queue]),
        },
    }


def _operations() -> dict[str, Any]:
    operations: dict[str, Any] = {
        "receiveInviteCommand": {
            "action": "receive",
            "channel": _ref("channels", "commands"),
            "title": "Invite participants to a call",
            "summary": "The worker consumes a command and calls Graph's invite for it.",
            "security": [_ref("components", "securitySchemes", "graphAppOnly")],
            "messages": [_ref("channels", "commands", "messages", "inviteCommand")],
            "bindings": {"amqp": {"ack": True, "bindingVersion": _AMQP_BINDING}},
        }
    }
    for kind in OutcomeKind:
        operations[f"send{_name(kind)[0].upper()}{_name(kind)[1:]}"] = {
            "action": "send",
            "channel": _ref("channels", "outcomes"),
            "title": kind.value,
            "summary": _OUTCOME_SUMMARIES[kind],
            "description": (
                f"Published with routing key `{kind.value}`, persistent, mandatory, confirmed "
                "(the alternate exchange takes what no binding matches)."
            ),
            "messages": [_ref("channels", "outcomes", "messages", _name(kind))],
            "bindings": {
                "amqp": {
                    "cc": [kind.value],
                    "deliveryMode": 2,
                    "mandatory": True,
                    "bindingVersion": _AMQP_BINDING,
                }
            },
        }
    return operations


def _examples(examples: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(examples.glob("*.json")):
        command = json.loads(path.read_text())
        found.append(
            {
                "name": path.stem,
                "summary": f"schemas/examples/{path.name}",
                "headers": {
                    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                },
                "payload": command,
            }
        )
    return found


def _messages(examples: Path) -> dict[str, Any]:
    messages: dict[str, Any] = {
        "inviteCommand": {
            "name": "InviteCommand",
            "title": "Invite command",
            "contentType": "application/json",
            "summary": "Invite participants (Graph invitationParticipantInfo) to a call.",
            "correlationId": _ref("components", "correlationIds", "commandId"),
            "payload": {
                "schemaFormat": _JSON_SCHEMA_FORMAT,
                "schema": {"$ref": "./command.schema.json"},
            },
            "traits": [_ref("components", "messageTraits", "commandProperties")],
            "examples": _examples(examples),
        }
    }
    for kind in OutcomeKind:
        messages[_name(kind)] = {
            "name": kind.value,
            "title": f"{kind.value} outcome event",
            "contentType": "application/cloudevents+json",
            "summary": _OUTCOME_SUMMARIES[kind],
            "correlationId": _ref("components", "correlationIds", "outcomeCorrelation"),
            "payload": {
                "schemaFormat": _JSON_SCHEMA_FORMAT,
                "schema": {"$ref": f"./{kind.value}.schema.json"},
            },
            "traits": [
                _ref("components", "messageTraits", "outcomeProperties"),
                _ref("components", "messageTraits", "cloudEvent"),
            ],
        }
    return messages


_TRACEPARENT = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_TRACE_HEADERS = {
    "traceparent": {
        "type": "string",
        "description": (
            "W3C Trace Context `traceparent`: the command's span is its child (a malformed "
            "one is ignored and the command starts a new trace); kept on retry and "
            "dead-letter copies."
        ),
        "pattern": _TRACEPARENT,
    },
    "tracestate": {
        "type": "string",
        "description": "W3C Trace Context `tracestate`; kept on retry and dead-letter copies.",
    },
}
_OUTCOME_TRACE_HEADERS = {
    "traceparent": {
        "type": "string",
        "description": (
            "W3C Trace Context `traceparent` of the worker's publish span, in the command's "
            "trace (the one its `traceparent` started, or a new one): a consumer that "
            "continues from it joins that trace. Absent when the command had no trace and "
            "tracing is off."
        ),
        "pattern": _TRACEPARENT,
    },
    "tracestate": {
        "type": "string",
        "description": "W3C Trace Context `tracestate` that came with the command, if any.",
    },
}


def _traits() -> dict[str, Any]:
    return {
        "commandProperties": {
            "summary": "AMQP properties of a command message.",
            "description": (
                "Set `delivery_mode` 2 (persistent) and `content_type` `application/json` (or "
                "none). `message_id` should be the commandId (it is echoed in the worker's log "
                "lines); it is not required to be. Headers are optional; `x-invite-*` and "
                "the broker's `x-death` are the worker's own."
            ),
            "contentType": "application/json",
            "headers": {"type": "object", "properties": _TRACE_HEADERS},
            "bindings": {
                "amqp": {"messageType": "invite.command", "bindingVersion": _AMQP_BINDING}
            },
            "x-amqp-properties": {
                "delivery_mode": 2,
                "content_type": "application/json",
                "message_id": "the commandId (recommended)",
            },
        },
        "outcomeProperties": {
            "summary": "AMQP properties of an outcome event.",
            "description": (
                "`correlation_id` is the command's commandId (the incoming `message_id` when "
                "the commandId is unusable or over 255 bytes; then the header "
                "`x-invite-correlation-id-fallback` says `message_id` or `none`); `message_id` "
                "is the CloudEvents `id`; `type` is the routing key; persistent."
            ),
            "contentType": "application/cloudevents+json",
            "headers": {
                "type": "object",
                "properties": {
                    **_OUTCOME_TRACE_HEADERS,
                    "x-invite-correlation-id-fallback": {
                        "type": "string",
                        "enum": ["message_id", "none"],
                    },
                },
            },
            "x-amqp-properties": {
                "delivery_mode": 2,
                "content_type": "application/cloudevents+json; charset=utf-8",
                "correlation_id": "the commandId",
                "message_id": "the CloudEvents id",
                "type": "the routing key",
            },
        },
        "cloudEvent": {
            "summary": "A CloudEvents 1.0 event in structured content mode.",
            "description": (
                "The attributes are in the body: `specversion` 1.0, `id` (unique per event: "
                "de-duplicate on it), `source` (EVENT_SOURCE), `type` (the routing key), "
                "`subject` (the commandId), `time`, `datacontenttype` application/json, `data`; "
                "and the distributed-tracing extension's `traceparent` (and `tracestate`): the "
                "context of the command's span, in the same trace as the AMQP `traceparent` "
                "header, absent when the command had no trace."
            ),
            "externalDocs": {
                "url": "https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md"
            },
            "x-cloudevents": {
                "specversion": "1.0",
                "mode": "structured",
                "attributes": [
                    "specversion",
                    "id",
                    "source",
                    "type",
                    "subject",
                    "time",
                    "datacontenttype",
                ],
                "extensions": ["traceparent", "tracestate"],
            },
        },
    }


def _components(examples: Path) -> dict[str, Any]:
    return {
        "messages": _messages(examples),
        "messageTraits": _traits(),
        "parameters": {
            "delaySeconds": {
                "description": "Seconds a retry waits in this delay queue.",
                "enum": [str(seconds) for seconds in DELAY_BUCKETS],
            }
        },
        "correlationIds": {
            "commandId": {
                "description": "The commandId names the command and its outcome event.",
                "location": "$message.payload#/commandId",
            },
            "outcomeCorrelation": {
                "description": "The command's commandId; also the AMQP correlation_id.",
                "location": "$message.payload#/subject",
            },
        },
        "securitySchemes": {
            "amqpUser": {
                "type": "userPassword",
                "description": "The broker user and password of AMQP_URL.",
            },
            "graphAppOnly": {
                "type": "oauth2",
                "description": (
                    "Microsoft Graph, app-only (client credentials, a secret or a "
                    f"certificate): the application permission `{GRAPH_PERMISSION}`, with a "
                    "tenant administrator's consent in every tenant served."
                ),
                "flows": {
                    "clientCredentials": {
                        "tokenUrl": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
                        "availableScopes": {
                            GRAPH_PERMISSION: "Invite participants to an existing call.",
                        },
                    }
                },
                "scopes": [GRAPH_PERMISSION],
            },
        },
    }


def document(examples: Path) -> dict[str, Any]:
    """The AsyncAPI 3.0 document, with the worker's default queue and exchange names."""
    settings = Settings.model_construct()
    return {
        "asyncapi": "3.0.0",
        "id": "urn:invite-worker",
        "info": {
            "title": "invite-worker",
            "version": __version__,
            "description": (
                "Consumes invite commands from RabbitMQ, invites the participants to Microsoft "
                "Teams calls through Microsoft Graph, and publishes exactly one outcome event "
                "per command. Names are the defaults (COMMAND_QUEUE, OUTCOME_EXCHANGE)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The broker of AMQP_URL (here: a developer's machine).",
                "security": [_ref("components", "securitySchemes", "amqpUser")],
            }
        },
        "channels": _channels(settings),
        "operations": _operations(),
        "components": _components(examples),
    }


class _Dumper(yaml.SafeDumper):
    """Keys in the order built, and no YAML anchors: a reader sees every node written out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(document: dict[str, Any]) -> str:
    header = "# Generated by `invite-worker schemas` from the models; do not edit.\n"
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return header + body

"""Write k8s/base/dashboard.yaml: the worker's Grafana dashboard, as a ConfigMap for Grafana's
dashboard sidecar (the `grafana_dashboard: "1"` label).

Usage: `python k8s/dashboard.py` after changing a panel here; tests/deploy/test_monitoring.py
fails while the committed ConfigMap differs from what this writes, and checks that every query
names only metrics the worker exports. Grafana's JSON model is verbose; the panels below are
the part that carries meaning, and `panel()` adds the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).parent / "base" / "dashboard.yaml"
UID = "invite-worker"
#: Every query is limited to the pods of one namespace.
SEL = 'namespace="$namespace"'
RATE = "$__rate_interval"


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50, p95 and p99 of a histogram over all pods of the namespace."""
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{SEL}}}[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


#: (title, unit, description, [(PromQL, legend)]), in rows of two, left to right.
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "Throughput by outcome",
        "ops",
        "Outcome events confirmed by the broker, per second, by outcome.",
        [
            (f"sum by (outcome) (rate(invite_outcomes_total{{{SEL}}}[{RATE}]))", "{{outcome}}"),
            (f"sum(rate(invite_commands_received_total{{{SEL}}}[{RATE}]))", "received"),
        ],
    ),
    (
        "Graph latency",
        "s",
        "Time from sending an invite to Graph's answer.",
        quantiles("invite_graph_request_duration_seconds"),
    ),
    (
        "Graph answers by status",
        "ops",
        "Graph invite requests per second by HTTP status; `none`: no answer came.",
        [(f"sum by (status) (rate(invite_graph_requests_total{{{SEL}}}[{RATE}]))", "{{status}}")],
    ),
    (
        "429s by tenant",
        "ops",
        "Graph answers 429 Too Many Requests per second, by tenant.",
        [(f"sum by (tenant) (rate(invite_graph_throttled_total{{{SEL}}}[{RATE}]))", "{{tenant}}")],
    ),
    (
        "Retry-After asked for",
        "s",
        "Seconds of Retry-After Graph asked for, per second, by pod (the worker counts them "
        "for all tenants together; the 429s by tenant say which tenant is throttled).",
        [
            (
                f"sum by (pod) (rate(invite_graph_retry_after_seconds_total{{{SEL}}}[{RATE}]))",
                "{{pod}}",
            )
        ],
    ),
    (
        "Rate-limiter wait",
        "s",
        "Time a request waited for its tenant's rate limit (GRAPH_TENANT_RATE_LIMIT).",
        quantiles("invite_rate_limiter_wait_seconds"),
    ),
    (
        "In flight",
        "short",
        "Graph requests sent and not yet answered, and commands taken and not yet settled.",
        [
            (f"sum(invite_graph_requests_in_flight{{{SEL}}})", "Graph requests"),
            (f"sum(invite_commands_in_progress{{{SEL}}})", "commands"),
        ],
    ),
    (
        "Dead letters by reason",
        "ops",
        "Commands sent to the dead-letter queue per second, by reason.",
        [(f"sum by (reason) (rate(invite_dead_lettered_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
    ),
    (
        "Pods ready",
        "short",
        "Pods connected, consuming, not draining, circuit closed and Redis answering.",
        [
            (f"sum(invite_ready{{{SEL}}})", "ready"),
            (f"count(invite_ready{{{SEL}}})", "pods"),
            (f"sum(invite_redis_available{{{SEL}}})", "Redis answering"),
        ],
    ),
    (
        "Token failures by tenant",
        "ops",
        "Token requests Entra ID refused or did not answer, per second, by tenant.",
        [
            (
                "sum by (tenant) (rate(invite_token_acquisitions_total"
                f'{{{SEL},result="failure"}}[{RATE}]))',
                "{{tenant}}",
            )
        ],
    ),
]


def panel(
    index: int, title: str, unit: str, description: str, queries: list[tuple[str, str]]
) -> dict[str, Any]:
    """A time series panel; two to a row."""
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
                # A histogram's buckets carry the trace id of a recorded command (OpenMetrics
                # exemplars): Grafana links a slow point to its trace.
                "exemplar": "_bucket{" in expr,
            }
            for n, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "Invite worker",
        "tags": ["invite-worker"],
        "timezone": "utc",
        "schemaVersion": 39,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(invite_ready, namespace)",
                    "refresh": 2,
                },
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


HEADER = """\
---
# The worker's Grafana dashboard, for Grafana's dashboard sidecar (kube-prometheus-stack's
# `grafana.sidecar.dashboards`), which loads every ConfigMap labelled grafana_dashboard: "1"
# in the namespaces it searches. Written by k8s/dashboard.py: change the panels there.
# A JSON string cannot be wrapped, and the queries are longer than the line limit:
# yamllint disable rule:line-length
"""


def configmap() -> str:
    body = json.dumps(dashboard(), indent=1)
    lines = "\n".join(f"    {line}" for line in body.splitlines())
    return (
        HEADER
        + "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: invite-worker-dashboard\n"
        + "  namespace: invite-worker\n  labels:\n    app.kubernetes.io/name: invite-worker\n"
        + "    app.kubernetes.io/component: worker\n"
        + '    grafana_dashboard: "1"\ndata:\n'
        + f"  invite-worker.json: |\n{lines}\n"
    )


if __name__ == "__main__":
    OUTPUT.write_text(configmap())

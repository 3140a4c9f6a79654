"""The health endpoints on aiohttp.web: what they answer, and what a hostile client cannot do."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from worker.observability.health import HealthServer
from worker.observability.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.fixture
async def health() -> AsyncIterator[tuple[HealthServer, Metrics]]:
    metrics = Metrics()
    metrics.gauge("invite_ready", "1 while ready.", lambda: 1)
    metrics.gauge("invite_graph_requests_in_flight", "In flight.", lambda: 0)
    metrics.gauge("invite_commands_in_progress", "In progress.", lambda: 0)
    server = HealthServer(
        port=0, host="127.0.0.1", metrics=metrics, ready=lambda: True, max_connections=8
    )
    await server.start()
    try:
        yield server, metrics
    finally:
        await server.stop()


async def test_metrics_parse_and_hold_every_metric_the_readme_lists_and_the_process_ones(
    health: tuple[HealthServer, Metrics],
) -> None:
    server, metrics = health
    metrics.graph_latency.observe(0.2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        text = (await http.get("/metrics")).text
        om = await http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    listed = set(re.findall(r"^\| `(invite_\w+)` \| (?:counter|gauge)", README, re.M))
    # A gauge of the fleet mode exists only in a worker with REDIS_URL.
    listed -= set(re.findall(r"^\| `(invite_\w+)` \| gauge \|.*exported only with", README, re.M))
    histograms = set(re.findall(r"^\| `(invite_\w+)` \| histogram", README, re.M))
    assert len(listed) + len(histograms) >= 15
    for name in listed:
        # A labelled counter has no sample until its first use; its family is still there.
        assert name in samples or f"# TYPE {name} counter" in text, name
    for name in histograms:
        assert f"{name}_count" in samples, name
    assert {"process_resident_memory_bytes", "python_gc_collections_total"} <= samples
    assert "invite_worker_build_info" in samples
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    families = openmetrics(om.text)  # type: ignore[no-untyped-call]
    assert any(f.name == "invite_graph_request_duration_seconds" for f in families)


async def test_only_get_and_head_are_answered_and_no_body_is_taken(
    health: tuple[HealthServer, Metrics],
) -> None:
    server, _ = health
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        assert (await http.head("/healthz")).status_code == 200
        assert (await http.post("/healthz", content=b"x")).status_code == 405
        assert (await http.get("/nowhere")).status_code == 404
        assert (await http.get("/readyz")).text == "ready\n"


async def test_connections_over_the_cap_are_closed_and_the_endpoint_still_answers(
    health: tuple[HealthServer, Metrics],
) -> None:
    server, _ = health
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once, unanswered
    writer.close()
    for _, held in idle:
        held.close()
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        assert (await http.get("/healthz")).status_code == 200

"""The floor: the smallest program that does the worker's I/O for each command, and no more.

For each command it consumes the message (aio-pika, the worker's prefetch of twice
`GRAPH_MAX_IN_FLIGHT`), sends one HTTPS POST to the simulator's invite URL with a bearer
token taken once at start-up (a plain form-encoded client-credentials POST to the token
endpoint), publishes an outcome with publisher confirms, and acks. No validation, logging,
rate limits, deadlines or metrics: the benchmark reports the worker's throughput as a ratio to
this program's, measured in the same run.

HTTP client: aiohttp, with one keep-alive connector of `GRAPH_MAX_IN_FLIGHT` connections,
trusting only `SSL_CERT_FILE`. Event loop: the worker's default (uvloop), or what
`EVENT_LOOP` says. It reads the worker's own environment variables, prints
``{"event": "worker.ready", "event_loop": ...}`` once consuming, and stops on SIGTERM.

Run: ``python -m benchmarks.floor`` (the benchmark starts it; it is not meant for production).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
from collections.abc import Mapping

import aio_pika
import aiohttp
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from worker.cli import event_loop_factory

GRAPH_SCOPE = "https://graph.microsoft.com/.default"


async def _token(http: aiohttp.ClientSession, env: Mapping[str, str]) -> str:
    url = f"{env['AZURE_AUTHORITY_HOST']}/{env['AZURE_TENANT_ID']}/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": env["AZURE_CLIENT_ID"],
        "client_secret": env["AZURE_CLIENT_SECRET"],
        "scope": GRAPH_SCOPE,
    }
    async with http.post(url, data=form) as response:
        response.raise_for_status()
        token: str = (await response.json())["access_token"]
        return token


class Floor:
    """Consume, POST, publish with confirms, ack: one command at a time per delivery task."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        graph_base_url: str,
        token: str,
        outcomes: AbstractExchange,
    ) -> None:
        self._http = http
        self._graph = graph_base_url
        self._authorization = f"Bearer {token}"
        self._outcomes = outcomes

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        command = json.loads(message.body)
        command_id = command["commandId"]
        body = {"participants": command["participants"], "clientContext": command_id}
        headers = {
            "authorization": self._authorization,
            "content-type": "application/json",
            "client-request-id": command_id,
        }
        url = f"{self._graph}/communications/calls/{command['callId']}/participants/invite"
        async with self._http.post(url, data=json.dumps(body), headers=headers) as response:
            answer = await response.read()
        routing_key = "invite.accepted" if response.status < 300 else "invite.failed"
        outcome = aio_pika.Message(
            answer,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=command_id,
        )
        await self._outcomes.publish(outcome, routing_key=routing_key)
        await message.ack()


async def main() -> int:
    env = os.environ
    in_flight = int(env.get("GRAPH_MAX_IN_FLIGHT", "32"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
    connector = aiohttp.TCPConnector(limit=in_flight, ssl=tls)
    async with aiohttp.ClientSession(connector=connector) as http:
        token = await _token(http, env)
        connection = await aio_pika.connect(env["AMQP_URL"])
        async with connection:
            publish_channel = await connection.channel(publisher_confirms=True)
            outcomes = await publish_channel.get_exchange(env["OUTCOME_EXCHANGE"], ensure=False)
            consume_channel = await connection.channel(publisher_confirms=False)
            await consume_channel.set_qos(prefetch_count=2 * in_flight)
            queue = await consume_channel.get_queue(env["COMMAND_QUEUE"], ensure=False)
            floor = Floor(http, env["GRAPH_BASE_URL"], token, outcomes)
            await queue.consume(floor.on_message)
            ready = {"event": "worker.ready", "event_loop": type(loop).__module__.split(".")[0]}
            print(json.dumps(ready), flush=True)
            await stop.wait()
    return 0


if __name__ == "__main__":
    # The event loop the worker runs on by default (and EVENT_LOOP chooses for both alike).
    with asyncio.Runner(
        loop_factory=event_loop_factory(os.environ.get("EVENT_LOOP", "uvloop"))
    ) as r:
        raise SystemExit(r.run(main()))

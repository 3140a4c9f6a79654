"""Script calls made together, or while Redis answers, share one round trip to a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from tests.support.redis_server import spare_port, start_redis
from worker.fleet import AutoPipeline, packing_connection
from worker.observability.metrics import Metrics

pytestmark = pytest.mark.integration

#: Echoes its key and argument, or fails when the argument says so.
ECHO = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return KEYS[1] .. '=' .. ARGV[1]
"""


async def test_calls_made_in_one_turn_share_one_round_trip_and_each_gets_its_own_reply(
    redis_server: str,
) -> None:
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    metrics = Metrics()
    pipeline = AutoPipeline(client, metrics)
    echo = pipeline.register_script(ECHO)
    try:
        await echo(keys=["warm"], args=["up"])  # loads the script, outside the pipeline
        replies = await asyncio.gather(
            *(pipeline.call(echo, [f"k{n}"], [str(n)]) for n in range(50))
        )
        assert replies == [f"k{n}={n}" for n in range(50)]
        assert metrics.redis_round_trips.value() == 1
        # Calls of a later turn go in a pipeline of their own.
        assert await pipeline.call(echo, ["later"], ["1"]) == "later=1"
        assert metrics.redis_round_trips.value() == 2
    finally:
        await pipeline.aclose()
        await client.aclose()


async def test_calls_made_while_redis_is_answering_share_the_next_round_trip(
    tmp_path: Path,
) -> None:
    port = spare_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url, decode_responses=True)
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    metrics = Metrics()
    pipeline = AutoPipeline(client, metrics)
    echo = pipeline.register_script(ECHO)
    try:
        await echo(keys=["warm"], args=["up"])
        await admin.client_pause(300, all=True)  # the first round trip waits 0.3 s for Redis
        first = pipeline.call(echo, ["first"], ["0"])
        later = []
        for n in range(5):  # five turns of the loop, each with a call, while it waits
            await asyncio.sleep(0.01)
            later.append(pipeline.call(echo, [f"k{n}"], [str(n)]))
        assert await first == "first=0"
        assert await asyncio.gather(*later) == [f"k{n}={n}" for n in range(5)]
        assert metrics.redis_round_trips.value() == 2
    finally:
        await pipeline.aclose()
        await client.aclose()
        await admin.aclose()
        server.kill()
        server.wait()


async def test_a_pipeline_redis_does_not_answer_in_time_fails_alone_and_its_replies_are_dropped(
    tmp_path: Path,
) -> None:
    port = spare_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=0.2)
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    pipeline = AutoPipeline(client, Metrics())
    echo = pipeline.register_script(ECHO)
    try:
        await echo(keys=["warm"], args=["up"])
        await admin.client_pause(600, all=True)
        late = await asyncio.gather(
            pipeline.call(echo, ["a"], ["1"]),
            pipeline.call(echo, ["b"], ["2"]),
            return_exceptions=True,
        )
        assert [type(reply) for reply in late] == [RedisTimeoutError] * 2
        await asyncio.sleep(0.6)  # Redis answers again (and would now send the late replies)
        assert await pipeline.call(echo, ["c"], ["3"]) == "c=3"
    finally:
        await pipeline.aclose()
        await client.aclose()
        await admin.aclose()
        server.kill()
        server.wait()


async def test_a_script_error_reaches_its_own_caller_only(redis_server: str) -> None:
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    pipeline = AutoPipeline(client, Metrics())
    echo = pipeline.register_script(ECHO)
    try:
        await echo(keys=["warm"], args=["up"])
        replies = await asyncio.gather(
            pipeline.call(echo, ["a"], ["1"]),
            pipeline.call(echo, ["b"], ["fail"]),
            pipeline.call(echo, ["c"], ["3"]),
            return_exceptions=True,
        )
        assert replies[0] == "a=1"
        assert isinstance(replies[1], ResponseError)
        assert "asked to fail" in str(replies[1])
        assert replies[2] == "c=3"
    finally:
        await pipeline.aclose()
        await client.aclose()


async def test_scripts_a_restarted_redis_lost_are_loaded_and_run_once_each(
    tmp_path: Path,
) -> None:
    port = spare_port()
    server = start_redis(port, tmp_path)
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    metrics = Metrics()
    pipeline = AutoPipeline(client, metrics)
    echo = pipeline.register_script(ECHO)
    counter = pipeline.register_script("return redis.call('INCR', KEYS[1])")
    try:
        # Neither script was ever loaded: Redis answers NOSCRIPT for each call of the pipeline.
        replies = await asyncio.gather(
            pipeline.call(echo, ["a"], ["1"]),
            pipeline.call(counter, ["runs"], []),
            pipeline.call(echo, ["b"], ["2"]),
        )
        assert list(replies) == ["a=1", 1, "b=2"]
        assert await client.get("runs") == "1"
        await client.script_flush()
        assert await pipeline.call(counter, ["runs"], []) == 2
    finally:
        await pipeline.aclose()
        await client.aclose()
        server.kill()
        server.wait()


async def test_a_redis_that_does_not_answer_fails_every_call_of_the_turn() -> None:
    port = spare_port()  # nothing listens there
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1, retry_on_error=[]
    )
    metrics = Metrics()
    pipeline = AutoPipeline(client, metrics)
    echo = pipeline.register_script(ECHO)
    try:
        replies = await asyncio.gather(
            *(pipeline.call(echo, [f"k{n}"], [str(n)]) for n in range(3)),
            return_exceptions=True,
        )
        assert [type(reply) for reply in replies] == [RedisConnectionError] * 3
        assert metrics.redis_round_trips.value() == 0
    finally:
        await pipeline.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "0123abcd", 2, "cmd:é", b"\x00\xff", 15, 1.5, ""),
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT SETNAME", "invite-worker"),
        ("SET", "k", "x" * 70_000, "PX", 1000),
    ],
)
def test_hiredis_packs_every_command_as_redis_py_does(command: tuple[EncodableT, ...]) -> None:
    python = Connection()
    packing = packing_connection(Connection)()
    assert type(packing).__name__ == "HiredisConnection"
    assert b"".join(packing.pack_command(*command)) == b"".join(python.pack_command(*command))
    commands = [command, ("PING",), command]
    assert b"".join(packing.pack_commands(commands)) == b"".join(python.pack_commands(commands))

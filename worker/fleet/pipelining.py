"""Script calls made while Redis is answering, sent to it together as one pipeline.

Every command a worker holds calls a script at the same moments as its neighbours: a batch of
deliveries arrives in one read and each claims its grant, a batch of Graph answers arrives and
each settles. redis-py sends each call on its own (a connection taken from the pool, a write, a
read: 40 to 70 µs of the worker's CPU and a read and a write of Redis's), and has no automatic
pipelining of its own (as ioredis's `enableAutoPipelining` does), so this module adds it.

One connection of its own carries one pipeline at a time. The first call finds it idle and
starts a sender; every call made before the sender runs, or while its pipeline is waiting for
Redis, joins the next pipeline, which is sent as soon as the replies of the one before are read.
Under load the pipelines grow by themselves (one write and one read for every call made during
a round trip) and an idle worker pays one round trip per call, as without pipelining. Each
caller gets its own reply or error.

The pipeline is written and read on a redis-py `Connection` directly (its packer, its hiredis
reader, its reconnect), not through redis-py's `Pipeline`: that object takes a connection from
the pool and gives it back on every execute, wraps the reads in its retry and observability
hooks, and sends under `asyncio.wait_for` (a task of its own on every write); together more than
the calls themselves cost. One deadline (the pool's socket timeout) covers a pipeline's write and
all of its reads: a Redis that does not answer in time fails every call of that pipeline, and the
connection is dropped and made again for the next.

Each script is run by its SHA (`EVALSHA`); a Redis that lost its scripts (a restart, a failover)
answers `NOSCRIPT` for those calls alone, which are then run again, each on its own, after
loading the script. A script that did not run had no effect, so this is safe.

`packing_connection` gives the pool a connection class that packs commands with hiredis's C
packer, as redis-py's synchronous client does when hiredis is installed; its asyncio client packs
them in Python, argument by argument, about half of what a pipelined call cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from worker.observability.metrics import Metrics

#: One call waiting for its pipeline: the script, its keys and arguments, its reply.
_Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]


class AutoPipeline:
    """Runs scripts; the calls made during one round trip share the next."""

    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        self._redis = client
        self._metrics = metrics
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        #: One deadline for a whole pipeline, in place of one per read and per write.
        self._timeout: float | None = kwargs.pop("socket_timeout", None)
        self._connection = pool.connection_class(**kwargs)
        self._calls: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        #: The tasks running a script alone, kept until done (the loop holds weak references).
        self._tasks: set[asyncio.Task[None]] = set()

    def register_script(self, script: str) -> AsyncScript:
        return self._redis.register_script(script)

    def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's reply, once the pipeline it joined has been answered."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._calls.append((script, keys, args, reply))
        if self._sender is None:
            self._sender = loop.create_task(self._send_all())
        return reply

    async def aclose(self) -> None:
        """Stop sending (calls still waiting are cancelled) and close the connection."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self._connection.disconnect()

    async def _send_all(self) -> None:
        try:
            while self._calls:
                calls, self._calls = self._calls, []
                try:
                    replies = await self._round_trip(calls)
                except asyncio.CancelledError:
                    for *_, reply in calls:
                        reply.cancel()
                    raise
                except Exception as exc:  # each caller gets the error, as its own
                    for *_, reply in calls:
                        if not reply.done():
                            reply.set_exception(exc)
                    continue
                self._metrics.redis_round_trips.inc()
                self._answer(calls, replies)
        except asyncio.CancelledError:
            for *_, reply in self._calls:
                reply.cancel()
            self._calls = []
            raise
        finally:
            self._sender = None

    def _answer(self, calls: list[_Call], replies: list[Any]) -> None:
        for (script, keys, args, reply), answer in zip(calls, replies, strict=True):
            if reply.done():  # the caller was cancelled
                continue
            if isinstance(answer, NoScriptError):
                self._run_alone(script, keys, args, reply)
            elif isinstance(answer, Exception):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

    async def _round_trip(self, calls: list[_Call]) -> list[Any]:
        """One write of every call and one read of each reply (a script's error as its reply)."""
        connection = self._connection
        commands = [
            ("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in calls
        ]
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                await connection.send_packed_command(connection.pack_commands(commands))
                for _ in calls:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:
                        replies.append(error)
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout waiting for a pipeline's replies") from None
        except BaseException:
            # The replies still to come would answer the next pipeline's calls.
            await connection.disconnect(nowait=True)
            raise
        return replies

    def _run_alone(
        self, script: AsyncScript, keys: list[str], args: list[Any], reply: asyncio.Future[Any]
    ) -> None:
        """Load a script Redis did not have, then run this call alone."""

        async def run() -> None:
            try:
                await self._redis.script_load(script.script)
                self._metrics.redis_round_trips.inc()
                answer = await self._redis.evalsha(script.sha, len(keys), *keys, *args)
                self._metrics.redis_round_trips.inc()
            except Exception as exc:  # the caller gets it
                if not reply.done():
                    reply.set_exception(exc)
                return
            if not reply.done():
                reply.set_result(answer)

        self._spawn(run())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _HiredisPacking:
    """Packs commands with hiredis (`HiredisRespSerializer`, redis-py's own, in C)."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._serializer.pack(*args)
        return packed

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self._serializer.pack(*command)[0] for command in commands)]


def packing_connection(
    connection_class: type[aioredis.connection.AbstractConnection],
) -> type[aioredis.connection.AbstractConnection]:
    """`connection_class` packing its commands with hiredis (itself when hiredis is missing)."""
    if not HIREDIS_AVAILABLE or issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})

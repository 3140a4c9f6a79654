"""Script calls made in one turn of the event loop, sent to Redis as one pipeline.

Every command a worker holds calls a script at the same moments as its neighbours: a batch of
deliveries arrives in one read and each claims its grant, a batch of Graph answers arrives and
each settles. redis-py sends each call on its own (a connection taken from the pool, a write, a
read: 40 to 70 µs of the worker's CPU and a read and a write of Redis's), and has no automatic
pipelining of its own (as ioredis's `enableAutoPipelining` does), so this module adds it: the
first call of a turn schedules one task, every call of that turn joins it, and the task sends
them all as one non-transactional redis-py `Pipeline` (one connection, one write, one read of all
the replies). Each caller gets its own reply or error; a call waits for the rest of the turn it
was made in, and its caller resumes a turn after the reply is read.

Each script is run by its SHA (`EVALSHA`); a Redis that lost its scripts (a restart, a failover)
answers `NOSCRIPT` for those calls alone, which are then run again, each on its own, after
loading the script. A script that did not run had no effect, so this is safe.

`packing_connection` gives the pool a connection class that packs commands with hiredis's C
packer, as redis-py's synchronous client does when hiredis is installed; its asyncio client packs
them in Python, argument by argument, about half of what a pipelined call cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import NoScriptError
from redis.utils import HIREDIS_AVAILABLE

from worker.observability.metrics import Metrics

#: One call waiting for its turn's pipeline: the script, its keys and arguments, its reply.
_Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]


class AutoPipeline:
    """Runs scripts; the calls of one turn of the event loop share one round trip."""

    def __init__(self, client: aioredis.Redis, metrics: Metrics) -> None:
        self._redis = client
        self._metrics = metrics
        self._calls: list[_Call] = []
        #: The tasks sending, kept until done (the loop holds only weak references).
        self._tasks: set[asyncio.Task[None]] = set()

    def register_script(self, script: str) -> AsyncScript:
        return self._redis.register_script(script)

    def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The script's reply, once this turn's pipeline has been answered."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._calls:
            self._spawn(self._send())
        self._calls.append((script, keys, args, reply))
        return reply

    async def _send(self) -> None:
        calls, self._calls = self._calls, []
        pipeline = self._redis.pipeline(transaction=False)
        for script, keys, args, _ in calls:
            pipeline.evalsha(script.sha, len(keys), *keys, *args)
        try:
            replies = await pipeline.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for *_, reply in calls:
                reply.cancel()
            raise
        except Exception as exc:  # each caller gets the error, as its own
            for *_, reply in calls:
                if not reply.done():
                    reply.set_exception(exc)
            return
        self._metrics.redis_round_trips.inc()
        for (script, keys, args, reply), answer in zip(calls, replies, strict=True):
            if reply.done():  # the caller was cancelled
                continue
            if isinstance(answer, NoScriptError):
                self._run_alone(script, keys, args, reply)
            elif isinstance(answer, Exception):
                reply.set_exception(answer)
            else:
                reply.set_result(answer)

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

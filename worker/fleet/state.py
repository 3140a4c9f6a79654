"""The fleet's shared state in Redis: idempotency records, tenant budgets and 429 pauses.

One record per commandId (`<prefix>cmd:<commandId>`, a hash, kept `IDEMPOTENCY_TTL`):

- `state` *sending*, `owner` a live process: that process claimed it, with its tenant's grant,
  right before writing the request (one script), and has not settled it yet;
- `state` *sending*, no `owner` (or a dead one): the process died, or crashed, after the
  request may have left; the next process to meet the command gives the ambiguous outcome;
- `state` *free*, no `owner`: a process had it, Graph did not act (or the request was never
  written), and it went back to the broker or waits for a retry; whoever is next sends it;
- `state` *settled*: the outcome event as published (`event`, empty once the broker confirmed
  it) and the command's fingerprint (`fp`).

A process is live while its lease (`<prefix>owner:<process id>`) exists; it renews the lease
every third of `REDIS_LEASE`, and that renewal is also how it notices that Redis is away and
back. Per tenant, `<prefix>tenant:<id>:window` (a sorted set) is a sliding log of the grants
of the last second across the fleet, and `<prefix>tenant:<id>:state` holds a 429's pause, the
reduced limit that grows back after it, and the one probe request allowed before it does.

Everything that must be atomic is one Lua script run by Redis, with Redis's own clock, so
the pods' clocks need not agree. On the happy path a command costs two script calls, which
`worker.fleet.pipelining` sends together with the other calls made while Redis answers the
pipeline before (so at most two round trips, fewer under load): the claim
with its grant (`begin_send`), then `settle` with the outcome event, written *before* the event
is published, so that a process killed between the broker's confirmation and the
acknowledgement leaves a record whose redelivery publishes the same event again, not an
ambiguous second one. The confirmation that follows (`settle(..., confirmed=True)`) only
empties the remembered event, and costs no call of its own: the next `begin_send` or
`settle` script carries the confirmations that came in since the last one, and the lease
renewal writes those that no command carried (an idle process, at most a third of
`REDIS_LEASE` later; until then a redelivery publishes the same event again). A grant is
stamped when it is taken, right before the request is written; a request written later than
the window's margin after its grant (a new connection) is not re-stamped, which the margin
absorbs: 60 ms, wider than the single process's 20 ms, because the grant comes a Redis reply
and two turns of the event loop before the write, a gap measured at up to 80 ms on a busy
two-core node.

When Redis does not answer, `begin_send` raises `SharedStateUnavailable` (nothing is sent
without a record) and the process reports itself unavailable until its lease renews again;
`release`, `throttle` and `settle` that failed are kept and written then, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from worker.core.commands import Command
from worker.core.errors import SharedStateUnavailable
from worker.core.outcomes import OutcomeEvent
from worker.core.ports import ClaimVerdict, SendClaim
from worker.fleet.pipelining import AutoPipeline
from worker.observability.metrics import Metrics

log = structlog.get_logger("worker.fleet")

#: The most confirmations one script call writes.
_CONFIRM_BATCH = 256

#: The limit in force after a 429: the halved limit, grown back by a tenth of the configured
#: limit per second since the pause ended (as `worker.core.ratelimit` does in one process).
_CURRENT_LIMIT = """
local function current_limit(state_key, limit, now)
  local fields = redis.call('HMGET', state_key, 'paused_until', 'reduced')
  local reduced = tonumber(fields[2])
  if not reduced then return limit end
  local step = math.max(1, limit / 10)
  local since = math.max(0, now - (tonumber(fields[1]) or 0)) / 1000
  local grown = reduced + math.floor(since * step)
  if grown >= limit then
    redis.call('HDEL', state_key, 'reduced')
    return limit
  end
  return grown
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Marks published outcomes confirmed: settled, with no event left to publish again. Pairs of
#: KEYS (record, tenant state) from `first_key`; ARGV from `first_arg`: ttl ms, then the
#: fingerprint and command id of each pair. Every script that writes runs it for the
#: confirmations that came in since the last write, so that they cost no round trip of their own.
_CONFIRM_PAIRS = """
local function confirm(first_key, first_arg)
  local ttl = tonumber(ARGV[first_arg])
  for i = first_key, #KEYS, 2 do
    local fp, id = ARGV[first_arg + 1 + i - first_key], ARGV[first_arg + 2 + i - first_key]
    if redis.call('HGET', KEYS[i + 1], 'probe') == id then
      redis.call('HDEL', KEYS[i + 1], 'probe', 'probe_until')
    end
    local record = redis.call('HMGET', KEYS[i], 'state', 'fp')
    if record[1] ~= 'settled' or record[2] == fp then
      redis.call('HSET', KEYS[i], 'state', 'settled', 'fp', fp, 'event', '')
      redis.call('HDEL', KEYS[i], 'owner')
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  end
end
"""

#: KEYS and ARGV: the confirmations' pairs only.
_CONFIRM = _CONFIRM_PAIRS + "confirm(1, 1)\nreturn 1\n"

#: KEYS: record, window, tenant state, then confirmations' pairs. ARGV: owner, fingerprint,
#: limit, span ms, ttl ms, grant member, owner key prefix, take orphaned (1/0), probe ms,
#: command id, then the confirmations' ttl and pairs.
_BEGIN_SEND = (
    _CURRENT_LIMIT
    + _CONFIRM_PAIRS
    + """
confirm(4, 11)
local record = redis.call('HMGET', KEYS[1], 'state', 'owner', 'fp', 'event')
local state, holder = record[1], record[2]
if state == 'settled' then return {'settled', 0, record[3] or '', record[4] or ''} end
local live = holder and holder ~= '' and holder ~= ARGV[1]
  and redis.call('EXISTS', ARGV[7] .. holder) == 1
if state and live then return {'busy', 0} end
if state == 'sending' and holder ~= ARGV[1] and ARGV[8] ~= '1' then
  return {'orphaned', 0}
end
local paused = tonumber(redis.call('HGET', KEYS[3], 'paused_until')) or 0
if now < paused then return {'wait', paused - now} end
local probe = redis.call('HMGET', KEYS[3], 'probe', 'probe_until')
if probe[1] and probe[1] ~= '' and probe[1] ~= ARGV[10]
    and now < (tonumber(probe[2]) or 0) then
  return {'wait', tonumber(probe[2]) - now}
end
local limit = current_limit(KEYS[3], tonumber(ARGV[3]), now)
local span = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - span)
local count = redis.call('ZCARD', KEYS[2])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[2], count - limit, count - limit, 'WITHSCORES')
  return {'wait', math.max(1, tonumber(oldest[2]) + span - now)}
end
if redis.call('HGET', KEYS[3], 'probe') == '' then
  redis.call('HSET', KEYS[3], 'probe', ARGV[10], 'probe_until', now + tonumber(ARGV[9]))
end
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('PEXPIRE', KEYS[2], span * 2)
redis.call('HSET', KEYS[1], 'state', 'sending', 'owner', ARGV[1], 'fp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'granted', 0}
"""
)

#: KEYS: record, tenant state. ARGV: owner, may have acted (1/0), command id.
_RELEASE = """
local record = redis.call('HMGET', KEYS[1], 'state', 'owner')
if redis.call('HGET', KEYS[2], 'probe') == ARGV[3] then redis.call('HDEL', KEYS[2], 'probe') end
if record[1] ~= 'sending' or record[2] ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], 'owner')
else
  redis.call('HSET', KEYS[1], 'state', 'free')
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
"""

#: KEYS: tenant state. ARGV: retry-after ms, configured limit, state ttl ms.
_THROTTLE = (
    _CURRENT_LIMIT
    + """
local limit = current_limit(KEYS[1], tonumber(ARGV[2]), now)
local paused = math.max(tonumber(redis.call('HGET', KEYS[1], 'paused_until')) or 0,
  now + tonumber(ARGV[1]))
-- The first grant after the pause takes the probe ('' marks it as free).
redis.call('HSET', KEYS[1], 'paused_until', paused, 'reduced', math.max(1, math.floor(limit / 2)),
  'probe', '')
redis.call('PEXPIRE', KEYS[1], paused - now + tonumber(ARGV[3]))
return paused - now
"""
)

#: KEYS: record, tenant state, then confirmations' pairs. ARGV: fingerprint, event, ttl ms,
#: command id, then the confirmations' ttl and pairs.
_SETTLE = (
    _CONFIRM_PAIRS
    + """
confirm(3, 5)
if redis.call('HGET', KEYS[2], 'probe') == ARGV[4] then
  redis.call('HDEL', KEYS[2], 'probe', 'probe_until')
end
local record = redis.call('HMGET', KEYS[1], 'state', 'fp')
if record[1] == 'settled' and record[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'settled', 'fp', ARGV[1], 'event', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)


def process_id() -> str:
    """This process in the records: host, process id and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RedisSharedState:
    """`worker.core.ports.SharedState` on Redis (redis-py's asyncio client, Lua scripts)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        tenant_rate_limit: int,
        tenant_rate_limits: Mapping[str, int],
        idempotency_ttl: float,
        lease: float,
        probe_timeout: float,
        margin: float = 0.06,
        metrics: Metrics | None = None,
        owner: str | None = None,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._limit = tenant_rate_limit
        self._limits = dict(tenant_rate_limits)
        self._ttl_ms = round(idempotency_ttl * 1000)
        self._lease = lease
        self._probe_ms = round(probe_timeout * 1000)
        self._span_ms = round((1.0 + margin) * 1000)
        self._metrics = metrics or Metrics()
        self.owner = owner or process_id()
        self._owner_key = f"{prefix}owner:{self.owner}"
        self._pipeline = AutoPipeline(client, self._metrics)
        self._begin_send = self._script(_BEGIN_SEND)
        self._release = self._script(_RELEASE)
        self._throttle = self._script(_THROTTLE)
        self._settle = self._script(_SETTLE)
        self._confirm = self._script(_CONFIRM)
        #: Confirmations not yet written (record, tenant state, fingerprint, command id): the
        #: next script call carries them, or the lease renewal when none comes before it.
        self._confirming: list[tuple[str, str, str, str]] = []
        self._available = False
        self._callbacks: list[Callable[[bool], None]] = []
        #: Writes that failed, written in order once Redis answers again.
        self._pending: deque[tuple[str, Callable[[], Awaitable[Any]]]] = deque()
        self._renewer: asyncio.Task[None] | None = None
        self._grants = 0

    def _script(self, source: str) -> Callable[..., Awaitable[Any]]:
        """Run `source` (keys=, args=) in the pipeline of the current turn of the loop."""
        return functools.partial(self._pipeline.call, self._pipeline.register_script(source))

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Take the lease (raises `SharedStateUnavailable` when Redis does not answer)."""
        await self._renew()
        self._renewer = asyncio.get_running_loop().create_task(self._keep_lease())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.write_confirmations()
        with contextlib.suppress(RedisError, OSError):
            await self._flush()
            await self._redis.delete(self._owner_key)
        await self._pipeline.aclose()
        await self._redis.aclose(close_connection_pool=True)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            with contextlib.suppress(SharedStateUnavailable):
                await self._renew()

    async def _renew(self) -> None:
        try:
            await self._call(
                "lease", self._redis.set(self._owner_key, "1", px=self._ms(self._lease))
            )
            self._metrics.redis_round_trips.inc()
            self._queue_confirms()
            await self._flush()
        except SharedStateUnavailable:
            raise
        except (RedisError, OSError) as exc:  # a pending write that failed again
            self._went_away("flush", exc)
            raise SharedStateUnavailable(str(exc)) from exc
        self._set_available(True)

    async def _flush(self) -> None:
        while self._pending:
            operation, write = self._pending[0]
            await write()
            self._metrics.redis_calls.inc(operation)
            self._pending.popleft()

    # --- availability ---------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    def on_availability_change(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    def _set_available(self, available: bool) -> None:
        if available == self._available:
            return
        self._available = available
        log.warning("redis.available" if available else "redis.unavailable")
        for callback in self._callbacks:
            callback(available)

    def _went_away(self, operation: str, exc: BaseException) -> None:
        self._metrics.redis_errors.inc(operation)
        log.warning("redis.error", operation=operation, error=type(exc).__name__)
        self._set_available(False)

    async def _call(self, operation: str, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except (RedisError, OSError) as exc:
            self._went_away(operation, exc)
            raise SharedStateUnavailable(f"redis: {type(exc).__name__}") from exc
        self._metrics.redis_calls.inc(operation)
        return result

    async def _write(self, operation: str, write: Callable[[], Awaitable[Any]]) -> None:
        """Write now, or keep the write for when Redis answers again."""
        if not self._pending:
            with contextlib.suppress(SharedStateUnavailable):
                await self._call(operation, write())
                return
        self._pending.append((operation, write))

    # --- the port -------------------------------------------------------------------------

    def _keys(self, command: Command) -> tuple[str, str, str]:
        tenant = f"{self._prefix}tenant:{command.tenant_id}"
        return f"{self._prefix}cmd:{command.command_id}", f"{tenant}:window", f"{tenant}:state"

    def _take_confirms(self) -> tuple[list[tuple[str, str, str, str]], list[str], list[str | int]]:
        """Confirmations for the next script call to carry: them, their keys and arguments."""
        batch = self._confirming[:_CONFIRM_BATCH]
        del self._confirming[:_CONFIRM_BATCH]
        keys = [key for record, state, _, _ in batch for key in (record, state)]
        args: list[str | int] = [self._ttl_ms]
        args += [arg for _, _, fp, command_id in batch for arg in (fp, command_id)]
        return batch, keys, args

    async def begin_send(self, command: Command, *, take_orphaned: bool) -> SendClaim:
        record, window, state = self._keys(command)
        self._grants += 1
        # Writes kept while Redis was away go first: confirmations ride along only after them.
        carried, confirm_keys, confirm_args = (
            self._take_confirms() if not self._pending else ([], [], [self._ttl_ms])
        )
        try:
            reply = await self._begin_send_call(
                command, take_orphaned, [record, window, state, *confirm_keys], confirm_args
            )
        except SharedStateUnavailable:
            self._confirming[:0] = carried
            raise
        verdict = ClaimVerdict(_text(reply[0]))
        if verdict is ClaimVerdict.SETTLED:
            event = _text(reply[3])
            return SendClaim(
                verdict,
                fingerprint=bytes.fromhex(_text(reply[2])),
                event=OutcomeEvent.model_validate_json(event) if event else None,
            )
        return SendClaim(verdict, wait=max(0, int(reply[1])) / 1000)

    async def _begin_send_call(
        self,
        command: Command,
        take_orphaned: bool,
        keys: list[str],
        confirm_args: list[str | int],
    ) -> Any:
        return await self._call(
            "begin_send",
            self._begin_send(
                keys=keys,
                args=[
                    self.owner,
                    command.fingerprint().hex(),
                    self._limits.get(command.tenant_id, self._limit),
                    self._span_ms,
                    self._ttl_ms,
                    f"{self.owner}:{self._grants}",
                    f"{self._prefix}owner:",
                    "1" if take_orphaned else "0",
                    self._probe_ms,
                    command.command_id,
                    *confirm_args,
                ],
            ),
        )

    async def release(self, command: Command, *, may_have_acted: bool) -> None:
        record, _, state = self._keys(command)
        args: list[str | int] = [self.owner, "1" if may_have_acted else "0", command.command_id]
        await self._write("release", lambda: self._release(keys=[record, state], args=args))

    async def throttle(self, tenant_id: str, retry_after: float) -> None:
        state = f"{self._prefix}tenant:{tenant_id}:state"
        args: list[str | int] = [
            self._ms(retry_after),
            self._limits.get(tenant_id, self._limit),
            self._probe_ms,
        ]
        await self._write("throttle", lambda: self._throttle(keys=[state], args=args))

    async def settle(self, command: Command, event: OutcomeEvent, *, confirmed: bool) -> None:
        """Unconfirmed: written now, with the event. Confirmed: carried by the next write."""
        record, _, state = self._keys(command)
        if confirmed:
            self._confirming.append(
                (record, state, command.fingerprint().hex(), command.command_id)
            )
            return
        _, confirm_keys, confirm_args = self._take_confirms()
        keys = [record, state, *confirm_keys]
        args: list[str | int | bytes] = [
            command.fingerprint().hex(),
            event.to_json(),
            self._ttl_ms,
            command.command_id,
            *confirm_args,
        ]
        await self._write("settle", functools.partial(self._settle, keys=keys, args=args))

    def _queue_confirms(self) -> None:
        """The confirmations no write carried, as writes of their own after the kept ones."""
        while self._confirming:
            _, keys, args = self._take_confirms()
            write = functools.partial(self._confirm, keys=keys, args=args)
            self._pending.append(("confirm", write))

    async def write_confirmations(self) -> None:
        """Write every confirmation so far now (or keep them for when Redis is back)."""
        self._queue_confirms()
        try:
            await self._flush()
        except (RedisError, OSError) as exc:
            self._went_away("flush", exc)

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

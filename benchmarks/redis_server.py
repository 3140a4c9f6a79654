"""The Redis server a Redis-mode run points the worker at: what it counts, and cleaning up.

Read through ``redis-cli`` (Debian's redis-tools, beside the server): the project has no
Redis client of its own to lean on, and two ``INFO`` calls and one ``--scan`` per run need
none. ``INFO`` figures are the server's own, for every client: on a shared server other
clients' commands land in the same counters.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

from benchmarks.processes import cpu_seconds_if_running

_DELETE_BATCH = 500
_TIMEOUT = 30.0


@dataclass(frozen=True)
class RedisStats:
    """One ``INFO`` reading."""

    commands_processed: int
    """``total_commands_processed``: this reading's own ``INFO`` not yet counted."""
    calls: dict[str, int]
    """``INFO commandstats`` calls by command (``get``, ``evalsha``, ``config|get``, …)."""
    cpu_seconds: float
    """The server process's user + system CPU seconds, from /proc (NaN when not local)."""


@dataclass(frozen=True)
class RedisUse:
    """What a run cost the Redis server: the difference of two readings, less their own."""

    url: str
    key_prefix: str
    commands: int
    """Commands the server processed between the readings (the first ``INFO`` not counted)."""
    calls: dict[str, int]
    """The same, by command, busiest first."""
    cpu_seconds: float
    keys_left: int
    """Keys under ``key_prefix`` once the worker had stopped; deleted after the run."""

    @classmethod
    def between(
        cls, url: str, key_prefix: str, before: RedisStats, after: RedisStats, keys_left: int
    ) -> RedisUse:
        calls = {
            name: count - before.calls.get(name, 0)
            for name, count in after.calls.items()
            if count > before.calls.get(name, 0)
        }
        # The first reading's INFO is counted by the second (a command is counted once done).
        calls["info"] = calls.get("info", 0) - 1
        if calls["info"] <= 0:
            del calls["info"]
        ordered = dict(sorted(calls.items(), key=lambda item: (-item[1], item[0])))
        commands = after.commands_processed - before.commands_processed - 1
        return cls(
            url, key_prefix, commands, ordered, after.cpu_seconds - before.cpu_seconds, keys_left
        )


class RedisServer:
    """``redis-cli`` against the host, port and database of a ``redis://`` URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.username or parts.password:
            raise ValueError("a redis://host:port/db URL without credentials is expected")
        database = parts.path.lstrip("/") or "0"
        if not database.isdigit():
            raise ValueError(f"{database!r} is not a database number")
        self.url = url
        self._server = ["redis-cli", "-h", parts.hostname or "127.0.0.1"]
        self._server += ["-p", str(parts.port or 6379)]
        # Without it no SELECT, which the readings would count as the run's.
        self._database = ["-n", database]

    def _cli(self, *args: str, database: bool = True) -> str:
        argv = [*self._server, *(self._database if database else []), *args]
        result = subprocess.run(  # noqa: S603 - redis-cli with arguments of our own
            argv,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=True,
        )
        if result.stdout.startswith(("ERR", "Could not connect")):
            raise ConnectionError(f"redis-cli {' '.join(args)}: {result.stdout.strip()}")
        return result.stdout

    def stats(self) -> RedisStats:
        """One ``INFO server stats commandstats`` reading (a single command)."""
        fields: dict[str, str] = {}
        for line in self._cli(
            "INFO", "server", "stats", "commandstats", database=False
        ).splitlines():
            name, sep, value = line.strip().partition(":")
            if sep:
                fields[name] = value
        if "total_commands_processed" not in fields:
            raise ConnectionError(f"no INFO from Redis at {self.url}")
        calls = {}
        for name, value in fields.items():
            if name.startswith("cmdstat_"):
                counts = dict(part.split("=", 1) for part in value.split(","))
                calls[name.removeprefix("cmdstat_")] = int(counts["calls"])
        pid = fields.get("process_id", "")
        cpu = cpu_seconds_if_running(int(pid)) if pid.isdigit() else math.nan
        return RedisStats(int(fields["total_commands_processed"]), calls, cpu)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key of the database that starts with ``prefix``; how many there were."""
        if not prefix or any(c in prefix for c in "*?[]\\"):
            raise ValueError("the key prefix must be non-empty and hold no glob characters")
        keys = self.keys(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            self._cli("UNLINK", *keys[start : start + _DELETE_BATCH])
        return len(keys)

    def keys(self, prefix: str) -> list[str]:
        """The database's keys that start with ``prefix`` (``SCAN``, never ``KEYS``)."""
        return [key for key in self._cli("--scan", "--pattern", f"{prefix}*").splitlines() if key]

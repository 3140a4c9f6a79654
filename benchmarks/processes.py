"""The benchmark's child processes (simulator, worker, floor) and what /proc says about them.

Every child writes stdout and stderr to a log file of its own (never to an undrained pipe) and
announces itself with one JSON line carrying an ``event`` name; readiness is that line
appearing in the file. CPU time and memory come straight from /proc: no extra dependency, and
the same numbers `top` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import httpx

ROOT = Path(__file__).resolve().parents[1]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_POLL_SECONDS = 0.005


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_bytes(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field in bytes: ``VmRSS`` (now) or ``VmHWM`` (peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(f"{field} is not in /proc/{pid}/status")


def broker_pid() -> int | None:
    """The local RabbitMQ server's process, if it runs on this machine."""
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            command = (process / "cmdline").read_bytes().split(b"\0")
            # The server runs `-s rabbit boot`; rabbitmqctl's own Erlang VM does not.
            if command[0].endswith(b"beam.smp") and b"rabbit" in command and b"boot" in command:
                return int(process.name)
    return None


def cpu_seconds_if_running(pid: int | None) -> float:
    """`cpu_seconds`, or NaN for a process that is unknown or gone (a restarted broker)."""
    if pid is None:
        return math.nan
    try:
        return cpu_seconds(pid)
    except OSError:
        return math.nan


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot, all cores added up."""
    with Path("/proc/stat").open() as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    # guest time is already counted in user time
    return (sum(values[:8]) - idle) / _CLOCK_TICKS


class ChildFailed(RuntimeError):
    """A child process exited, or did not announce itself, in time."""


class Child:
    """One child process with its output in ``log_path``; ready when ``ready_event`` is logged."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, ready_event: str
    ) -> None:
        self.argv, self.env, self.log_path = list(argv), dict(env), log_path
        self._ready_event = ready_event
        self._log: IO[bytes] = log_path.open("wb")
        self._offset = 0
        self._partial = b""
        self._process: asyncio.subprocess.Process | None = None
        self._spawned_at = 0.0
        self.ready_seconds: float | None = None
        """Seconds from spawning the process to its ready line appearing in the log."""

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the process has not been spawned")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def spawn(self) -> None:
        self._spawned_at = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=self._log
        )

    async def wait_ready(self, within: float = 30.0) -> dict[str, Any]:
        """The ready line, parsed, once it is in the log; raises `ChildFailed` otherwise."""
        deadline = self._spawned_at + within
        while (ready := self._find_ready_line()) is None:
            if self.returncode is not None:
                raise ChildFailed(f"{self.argv} exited {self.returncode}; see {self}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.argv} was not ready within {within} s; see {self}")
            await asyncio.sleep(_POLL_SECONDS)
        self.ready_seconds = time.monotonic() - self._spawned_at
        return ready

    async def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code (None when killed)."""
        process = self._process
        try:
            if process is None:
                return None
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()
                return None
        finally:
            self._log.close()

    def _find_ready_line(self) -> dict[str, Any] | None:
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            if self._ready_event.encode() not in raw:
                continue
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and line.get("event") == self._ready_event:
                    return line
        return None

    def __str__(self) -> str:
        return str(self.log_path)


class SimulatorProcess:
    """`invite-worker simulator` in a process of its own, with its admin routes at hand."""

    def __init__(self, directory: Path, logs: Path) -> None:
        self._argv = [sys.executable, "-m", "worker", "simulator", "--port", "0"]
        self._argv += ["--directory", str(directory)]
        self._logs = logs
        self._starts = 0
        self._child: Child | None = None
        self._admin: httpx.AsyncClient | None = None
        self.graph_base_url = self.authority_host = self.ca_file = ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._starts += 1
        name = "simulator.log" if self._starts == 1 else f"simulator-{self._starts}.log"
        self._child = child = Child(self._argv, os.environ, self._logs / name, "simulator.ready")
        await child.spawn()
        try:
            ready = await child.wait_ready()
        except ChildFailed:
            await child.stop()
            raise
        self.graph_base_url = ready["graph_base_url"]
        self.authority_host = ready["authority_host"]
        self.ca_file = ready["ca_file"]
        self._admin = httpx.AsyncClient(
            base_url=f"{ready['base_url']}/_simulator",
            verify=ssl.create_default_context(cafile=self.ca_file),
            trust_env=False,
            timeout=60.0,
        )

    async def stop(self) -> None:
        if self._admin is not None:
            await self._admin.aclose()
            self._admin = None
        if self._child is not None:
            await self._child.stop()

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    async def ensure_running(self) -> bool:
        """Start it again if it is gone (on a shared machine, someone may end it); True when
        it had to."""
        if self.running:
            return False
        await self.stop()
        await self.start()
        return True

    @property
    def pid(self) -> int:
        if self._child is None:
            raise RuntimeError("the simulator has not been started")
        return self._child.pid

    async def prepare(self, latency: float) -> None:
        """Forget the records of earlier runs and set the latency added to every invite."""
        admin = self._http()
        (await admin.post("/reset")).raise_for_status()
        (await admin.put("/latency", json={"seconds": latency})).raise_for_status()

    async def invite_arrivals(self) -> list[float]:
        """The monotonic arrival time of every invite since `prepare`, in order."""
        response = await self._http().get("/invites")
        response.raise_for_status()
        return sorted(float(record["arrived_monotonic"]) for record in response.json())

    def _http(self) -> httpx.AsyncClient:
        if self._admin is None:
            raise RuntimeError("the simulator is not running")
        return self._admin


@dataclass(frozen=True)
class Sample:
    """What the benchmark saw at the moment a given number of outcomes had arrived."""

    outcomes: int
    at: float
    """time.monotonic() in the benchmark process."""
    cpu_seconds: float
    """The measured program's user + system CPU seconds so far."""
    rss_bytes: int
    simulator_cpu_seconds: float
    broker_cpu_seconds: float
    """NaN when the broker's process is not on this machine."""
    harness_cpu_seconds: float
    """This benchmark process's own."""
    machine_busy_seconds: float

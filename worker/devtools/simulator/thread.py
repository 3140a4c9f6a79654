"""``SimulatorThread``: a ``Simulator`` on its own event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

from worker.devtools.simulator.entra import RecordedTokenRequest
from worker.devtools.simulator.faults import FaultRule
from worker.devtools.simulator.graph import RecordedInvite
from worker.devtools.simulator.server import Simulator, SimulatorOptions


class SimulatorThread:
    """A :class:`Simulator` on its own event loop in a daemon thread, for sync code and for
    tests whose event loops come and go. Use as a context manager, or start()/stop()."""

    def __init__(self, **options: Unpack[SimulatorOptions]) -> None:
        self.simulator = Simulator(**options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: Exception | None = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            raise RuntimeError("the simulator thread was already started")
        self._thread = threading.Thread(target=self._run, name="graph-simulator", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the simulator did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def stop(self, timeout: float = 30.0) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or event is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(event.set)
        thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.simulator.start()
        except Exception as exc:
            self._error = exc
            return
        finally:
            self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.simulator.stop()

    @property
    def base_url(self) -> str:
        return self.simulator.base_url

    @property
    def graph_base_url(self) -> str:
        return self.simulator.graph_base_url

    @property
    def authority_host(self) -> str:
        return self.simulator.authority_host

    @property
    def ca_file(self) -> Path:
        return self.simulator.ca_file

    @property
    def invites(self) -> list[RecordedInvite]:
        return self.simulator.invites

    @property
    def token_requests(self) -> list[RecordedTokenRequest]:
        return self.simulator.token_requests

    @property
    def connections_accepted(self) -> int:
        return self.simulator.connections_accepted

    @property
    def latency(self) -> float:
        return self.simulator.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.simulator.latency = seconds

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        self.simulator.set_faults(rules)

    def set_token_outage(self, status: int | None, retry_after: str | None = None) -> None:
        self.simulator.set_token_outage(status, retry_after)

    def reset(self) -> None:
        self.simulator.reset()

"""EVENT_LOOP: the worker runs on uvloop unless told to run on asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from tests.support.harness import isolated_settings
from worker.app import event_loop_name
from worker.cli import event_loop_factory


async def _running_loop_name() -> str:
    return event_loop_name()


def test_the_default_event_loop_is_uvloop() -> None:
    settings = isolated_settings({})
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(_running_loop_name()) == "uvloop"


def test_event_loop_asyncio_runs_on_the_standard_librarys_loop() -> None:
    settings = isolated_settings({"EVENT_LOOP": "asyncio"})
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(_running_loop_name()) == "asyncio"


def test_an_unknown_event_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="EVENT_LOOP"):
        isolated_settings({"EVENT_LOOP": "trio"})

"""Fair in-flight slots: one tenant cannot hold more than its share while others wait."""

from __future__ import annotations

import asyncio

from worker.core.slots import FairSlots


async def test_a_lone_tenant_may_use_every_slot() -> None:
    slots = FairSlots(4, share=0.5)
    entered = asyncio.Event()
    release = asyncio.Event()
    inside = 0

    async def hold() -> None:
        nonlocal inside
        async with slots.slot("a"):
            inside += 1
            if inside == 4:
                entered.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(4)]
    await asyncio.wait_for(entered.wait(), 1)
    assert slots.held_by("a") == 4
    release.set()
    await asyncio.gather(*tasks)
    assert slots.in_use == 0


async def test_a_freed_slot_goes_to_the_waiting_tenant_under_its_share() -> None:
    slots = FairSlots(4, share=0.5)
    releases: dict[str, list[asyncio.Event]] = {"a": [], "b": []}

    async def hold(tenant: str) -> None:
        done = asyncio.Event()
        releases[tenant].append(done)
        async with slots.slot(tenant):
            await done.wait()

    tasks = [asyncio.create_task(hold(t)) for t in ("a", "a", "b", "b")]
    await asyncio.sleep(0.01)
    # Every slot is taken; a (at its share) asks first, b (at its share too) after it.
    tasks.append(asyncio.create_task(hold("a")))
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(hold("b")))
    await asyncio.sleep(0.01)
    # One of b's slots frees up: a is over its share while b waits, so b gets it,
    # although a has waited longer.
    releases["b"][0].set()
    await asyncio.sleep(0.01)
    assert (slots.held_by("a"), slots.held_by("b")) == (2, 2)
    releases["b"][2].set()
    await asyncio.sleep(0.01)
    # Nobody else waits now: a may go over its share.
    assert slots.held_by("a") == 3
    for events in releases.values():
        for event in events:
            event.set()
    await asyncio.gather(*tasks)
    assert slots.in_use == 0

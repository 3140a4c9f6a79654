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


async def test_tenants_all_at_their_share_fill_every_slot_between_them() -> None:
    """With a share under one half, two waiting tenants at their cap still use all the slots."""
    slots = FairSlots(10, share=0.3)  # a cap of 3 slots per tenant while others wait
    first, release = asyncio.Event(), asyncio.Event()

    async def hold(tenant: str, until: asyncio.Event) -> None:
        async with slots.slot(tenant):
            await until.wait()

    # Tenant c fills every slot, so that a and b both queue up before any slot frees.
    busy = [asyncio.create_task(hold("c", first)) for _ in range(10)]
    await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(hold(t, release)) for t in ("a", "b") for _ in range(6)]
    await asyncio.sleep(0.05)
    first.set()
    await asyncio.gather(*busy)
    for _ in range(50):
        if slots.in_use == 10:
            break
        await asyncio.sleep(0.01)
    assert slots.in_use == 10
    # Each got at least its share; the slots past the shares went to whoever asked first.
    assert min(slots.held_by("a"), slots.held_by("b")) >= slots.cap
    release.set()
    await asyncio.gather(*waiting)
    assert slots.in_use == 0

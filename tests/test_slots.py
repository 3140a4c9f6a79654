"""Fair in-flight slots: one tenant cannot hold more than its share while others wait."""

from __future__ import annotations

import asyncio

from worker.slots import FairSlots


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


async def test_a_tenant_over_its_share_waits_while_another_tenant_waits() -> None:
    slots = FairSlots(4, share=0.5)
    release_a = asyncio.Event()
    order: list[str] = []

    async def hold(tenant: str, until: asyncio.Event) -> None:
        async with slots.slot(tenant):
            order.append(tenant)
            await until.wait()

    a_tasks = [asyncio.create_task(hold("a", release_a)) for _ in range(2)]
    await asyncio.sleep(0.01)
    b_done = asyncio.Event()
    b_tasks = [asyncio.create_task(hold("b", b_done)) for _ in range(3)]
    more_a = asyncio.create_task(hold("a", release_a))
    await asyncio.sleep(0.01)
    # a holds its share (2); b takes the 2 free slots; a third b and a third a both wait,
    # and when a slot frees up, a (over its share) must not take it while b waits.
    assert slots.held_by("a") == 2
    assert slots.held_by("b") == 2
    release_a.set()
    await asyncio.sleep(0.01)
    assert slots.held_by("b") == 3
    b_done.set()
    await asyncio.gather(*a_tasks, *b_tasks, more_a)
    assert order.count("a") == 3
    assert order.count("b") == 3

"""In-flight Graph request slots, shared fairly between tenants.

At most `total` requests are in flight. A tenant may hold more than `share` of them only
while no other tenant under its share is waiting for one, so a tenant whose requests queue
behind its own rate limit cannot take the slots the others need, a lone tenant still gets
them all, and tenants that are all at their share never leave slots idle between them.
A waiter whose delivery is lost (`worker.core.ownership`) leaves without taking a slot.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from worker.core.ownership import DeliveryLost, Ownership


class FairSlots:
    def __init__(self, total: int, share: float) -> None:
        self.total = total
        #: Slots one tenant may hold while others wait.
        self.cap = max(1, math.ceil(total * share))
        self._held: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._in_use = 0
        self._changed = asyncio.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    def held_by(self, tenant_id: str) -> int:
        return self._held[tenant_id]

    def _may_take(self, tenant_id: str) -> bool:
        if self._in_use >= self.total:
            return False
        if self._held[tenant_id] < self.cap:
            return True
        return not any(
            count and self._held[tenant] < self.cap
            for tenant, count in self._waiting.items()
            if tenant != tenant_id
        )

    @asynccontextmanager
    async def slot(self, tenant_id: str, owner: Ownership | None = None) -> AsyncIterator[None]:
        """Hold a slot; raises `DeliveryLost` instead once `owner` is lost while waiting."""

        def lost() -> bool:
            return owner is not None and owner.lost

        if not self._waiting and not lost() and self._may_take(tenant_id):
            # Nobody waits: the slot is taken without the condition's lock, and given back
            # with a notification only if someone has started waiting meanwhile.
            self._held[tenant_id] += 1
            self._in_use += 1
            try:
                yield
            finally:
                self._held[tenant_id] -= 1
                self._in_use -= 1
                if self._waiting:
                    async with self._changed:
                        self._changed.notify_all()
            return
        async with self._changed:
            self._waiting[tenant_id] += 1
            try:
                await self._changed.wait_for(lambda: lost() or self._may_take(tenant_id))
            finally:
                self._waiting[tenant_id] -= 1
                if not self._waiting[tenant_id]:
                    del self._waiting[tenant_id]
                    # Others may have waited only because this tenant did.
                    self._changed.notify_all()
            if lost():
                # One waiter fewer may let a tenant over its share take a slot.
                self._changed.notify_all()
                raise DeliveryLost
            self._held[tenant_id] += 1
            self._in_use += 1
        try:
            yield
        finally:
            async with self._changed:
                self._held[tenant_id] -= 1
                self._in_use -= 1
                self._changed.notify_all()

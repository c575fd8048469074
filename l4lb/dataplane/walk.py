"""Walking a whole affinity table without stalling the relay.

A table may hold a million entries; visiting them all costs about a second of the loop. So a
walk copies the keys once (a C-speed list copy, a few ms at a million) and looks at them a
batch at a time, and a `Pacer` yields to the loop whenever the walk has run for `BUDGET` since
it last did: the relay's callbacks wait at most about that long behind a walk, whatever a batch
costs (a listing formats each entry, a save only packs it). An entry that changed or went
between two batches is seen as it is when its batch comes (or not at all). Used by the state
save and restore, the API's listings and flushes, and the shared store's reconcile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from ..core.affinity import AffinityTable, Entry

B = TypeVar("B")
BATCH = 64  # entries between two looks at the clock (formatting 64 for the API: about 0.5 ms)
BUDGET = 0.0005  # seconds a walk runs before it lets the loop run


class Pacer:
    """`await pacer.pause()` after each batch: yields once BUDGET has run since the last."""

    def __init__(self, budget: float = BUDGET) -> None:
        self.budget = budget
        self._since = time.perf_counter()

    async def pause(self) -> None:
        if time.perf_counter() - self._since >= self.budget:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


async def batches(keys: list[int]) -> AsyncIterator[list[int]]:
    """`keys` a batch at a time, paced."""
    pacer = Pacer()
    for i in range(0, len(keys), BATCH):
        yield keys[i : i + BATCH]
        await pacer.pause()


async def entries(table: AffinityTable[B]) -> AsyncIterator[list[Entry[B]]]:
    """The live entries, a batch at a time (a batch may be empty)."""
    async for part in batches(table.keys()):
        yield table.views(part)


async def pins(table: AffinityTable[B]) -> AsyncIterator[list[tuple[int, B, float]]]:
    """(key, backend, seconds left) of every pinned entry, a batch at a time."""
    async for part in batches(table.keys()):
        yield table.export(part)

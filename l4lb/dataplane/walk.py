"""Walking a whole affinity table without stalling the relay.

A table may hold a million entries; visiting them all costs about a second of the loop. So a
walk copies the keys once (a C-speed list copy, a few ms at a million) and looks at them a
slice at a time, yielding to the loop between slices: connections keep being relayed, and an
entry that changed or went between two slices is seen as it is when its slice comes (or not at
all). Used by the state save, the API's listings and flushes, and the shared store's reconcile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from ..core.affinity import AffinityTable, Entry

B = TypeVar("B")
SLICE = 2048  # entries looked at between two yields: about 2 ms


async def entries(table: AffinityTable[B]) -> AsyncIterator[list[Entry[B]]]:
    """The live entries, a slice at a time (a slice may be empty)."""
    keys = table.keys()
    for i in range(0, len(keys), SLICE):
        yield table.views(keys[i : i + SLICE])
        await asyncio.sleep(0)


async def pins(table: AffinityTable[B]) -> AsyncIterator[list[tuple[int, B, float]]]:
    """(key, backend, seconds left) of every pinned entry, a slice at a time."""
    keys = table.keys()
    for i in range(0, len(keys), SLICE):
        yield table.export(keys[i : i + SLICE])
        await asyncio.sleep(0)

"""Hand-overs between several processes at once, when an upgrade changes the number of
workers (workers/upgrade.py): which pins and flows a new worker keeps (`Share`), and waiting
on several channels where one failure is everyone's (`each_or_first_error`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ..core.reuseport import serving

T = TypeVar("T")


@dataclass
class Share:
    """A new worker's part when an upgrade changes the number of workers (workers/upgrade.py):
    every old worker hands it its pins and flows (`sources`: their indexes, in the channels'
    order), and it keeps its own (`pins`; a flow whose key `steered` sends here, or, for a
    group the kernel hashes, one from the old worker whose socket it takes over)."""

    me: int
    workers: int
    sources: list[int]
    pins: Callable[[str, int], bool]
    steered: Callable[[str, int, int], int | None]

    def keeps_flow(self, group: str, key: int, source: int) -> bool:
        to = self.steered(group, key, self.workers)
        return serving(source, self.workers) == self.me if to is None else to == self.me


async def each_or_first_error(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, in order; or the first exception, the others cancelled at once (one
    channel of several failing fails the hand-over: nobody waits for the rest)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
    for t in tasks:
        exc = t.exception() if t.done() and not t.cancelled() else None
        if exc is not None:
            raise exc
    return [t.result() for t in tasks]

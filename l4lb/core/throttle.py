"""Log lines that could come once per connection (a client refused, no backend left) are
throttled: at most one per key per interval, the next one saying how many were held back. A
dead backend pool must not turn into forty thousand identical lines a second."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class Throttle:
    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        """None to stay quiet; otherwise how many lines for `key` were held back before this."""
        now = self.clock()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)


def held_note(held: int) -> str:
    return f" ({held} more like this in the last second)" if held else ""

"""The garbage collector, the C heap and a process that lives for months.

Everything the imports, the config and the start made (some 100,000 objects) lives as long as
the process, and every full collection would walk it again: measured, a collection in the
middle of an affinity listing held the loop for 45 ms. `settle_heap` runs once the balancer is
up: one collection, then `gc.freeze()`, so that later full collections walk only what was made
since (connections, flows; an idle affinity entry is an int, which the collector never
tracks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def settle_heap() -> None:
    gc.collect()
    gc.freeze()


def give_back() -> None:
    """Return the C heap's free memory to the system (glibc's `malloc_trim`), after a large
    passing allocation such as a state file's restore: some 25 bytes per pin that would
    otherwise stay in the process's RSS. Elsewhere (musl, macOS), nothing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    trim(0)

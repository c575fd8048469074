"""Microbenchmark of the pure core: key masking, affinity lookup-and-release, scheduler pick,
for 10^3 to 10^6 clients, and the table's memory at 10^6 entries.

    .venv/bin/python bench/core_micro.py [--max 1000000]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc

from l4lb.config import BackendSpec, ClientLimitsSpec
from l4lb.core.affinity import AffinityTable
from l4lb.core.backends import Backend
from l4lb.core.keys import make_keyer
from l4lb.core.limits import ClientLimits
from l4lb.core.schedulers import make_scheduler


def per_op(fn, n: int, rounds: int = 5) -> float:  # type: ignore[no-untyped-def]
    """Median nanoseconds per call of fn over `rounds` runs of n calls."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(n)
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=1_000_000)
    args = ap.parse_args()
    rnd = random.Random(1)
    keyer = make_keyer(0xFFFFFF00, 64)
    hosts4 = [".".join(str(rnd.randrange(256)) for _ in range(4)) for _ in range(1000)]
    hosts6 = [f"2001:db8:{rnd.randrange(65536):x}::{rnd.randrange(65536):x}" for _ in range(1000)]

    def key4(n: int) -> None:
        for i in range(n):
            keyer(hosts4[i % 1000])

    def key6(n: int) -> None:
        for i in range(n):
            keyer(hosts6[i % 1000])

    print(f"key masking IPv4      {per_op(key4, 200_000):7.0f} ns")
    print(f"key masking IPv6      {per_op(key6, 200_000):7.0f} ns")

    backends = [Backend(BackendSpec(f"b{i}", f"10.0.0.{i}", 1 + i % 3), i) for i in range(8)]
    for name in ("rr", "wrr", "wlc", "sh", "mh", "p2c", "fo"):
        s = make_scheduler(name, backends, random.Random(0))

        def pick(n: int, s=s) -> None:  # type: ignore[no-untyped-def]
            for i in range(n):
                s.pick(i)

        print(f"scheduler {name:4} pick (8 backends) {per_op(pick, 100_000):7.0f} ns")

    # client_limits: what a connection pays to be admitted and released (no limit: nothing).
    for label, spec in (
        ("max_conns", ClientLimitsSpec(max_conns=100)),
        ("rate", ClientLimitsSpec(rate=1e9, burst=1e9)),
        ("max_conns+rate", ClientLimitsSpec(max_conns=100, rate=1e9, burst=1e9)),
    ):
        limits = ClientLimits(spec, time.monotonic)
        nets = [rnd.getrandbits(24) << 8 for _ in range(1000)]

        def admit(n: int, limits: ClientLimits = limits, nets: list[int] = nets) -> None:
            take, give = limits.admit, limits.release
            for i in range(n):
                k = nets[i % 1000]
                take(k)
                give(k)

        print(f"client_limits {label:14} admit+release {per_op(admit, 100_000):7.0f} ns")

    sizes = [10**e for e in range(3, 7) if 10**e <= args.max]
    for size in sizes:
        table: AffinityTable[Backend] = AffinityTable(360.0, size * 2, time.monotonic)
        keys = [rnd.getrandbits(32) for _ in range(size)]
        for k in keys:
            e = table.acquire(k)
            assert e is not None
            e.backend = backends[k % 8]
            table.release(e)
        probe = [keys[rnd.randrange(size)] for _ in range(100_000)]

        def hit(n: int, table: AffinityTable[Backend] = table, probe: list[int] = probe) -> None:
            acquire, release = table.acquire, table.release
            for i in range(n):
                e = acquire(probe[i % 100_000])
                release(e)  # type: ignore[arg-type]

        print(f"lookup+refresh (hit), {size:>9,} entries {per_op(hit, 100_000):7.0f} ns")

    gc.collect()
    tracemalloc.start()
    n = args.max
    now = [0.0]
    table2: AffinityTable[Backend] = AffinityTable(360.0, n, lambda: now[0])
    for k in range(n):
        e = table2.acquire(k * 256)
        assert e is not None
        e.backend = backends[k % 8]
        table2.release(e)
    now[0] += 2 * table2.YOUNG  # idle entries are packed a second after their release
    while table2._young:
        table2.expire()
    cur, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"table memory at {n:,} idle entries: {cur / 2**20:.0f} MiB ({cur / n:.0f} bytes/entry)")


if __name__ == "__main__":
    main()

"""What an upgrade carries besides sockets: the totals behind the metrics, and what health and
the operator made of each backend (runtime/handover.py sends and applies them).

The totals are set in the new process from the old one's (`apply_counters`), and what the old
one counted after it sent them (during the waves) is added (`delta`, `add=True`). With workers
whose number changes, a new worker may take the totals of several old ones: each added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

from ..core.flowstats import UdpStats
from ..core.routing import Router
from ..dataplane.context import DataPlane


class Counted(Protocol):
    """The process whose totals move (`runtime.server.Runtime`)."""

    routers: dict[str, Router]
    plane: DataPlane
    udp_stats: Mapping[str, UdpStats]
    reloads_ok: int
    reloads_failed: int
    upgrades: dict[str, int]
    started_at: float


def counters(runtime: Counted) -> dict[str, Any]:
    """The totals behind the metrics, to go on counting in the new process."""
    out: dict[str, Any] = {"groups": {}, "udp": {}, "process": {}}
    for name, router in runtime.routers.items():
        st = router.stats
        plain: dict[str, Any] = {k: getattr(st, k) for k in GROUP_COUNTERS}
        plain["connect"] = _histogram(st.connect)
        plain["duration"] = _histogram(st.duration)
        backends = {
            b.name: {k: getattr(b, k) for k in BACKEND_COUNTERS} for b in router.all_backends()
        }
        out["groups"][name] = {"stats": plain, "backends": backends}
    for name, u in runtime.udp_stats.items():
        out["udp"][name] = {k: getattr(u, k) for k in UDP_COUNTERS}
    plane = runtime.plane
    out["process"] = {
        "accept_errors": dict(plane.accept_errors),
        "loops": plane.loops,
        "unmatched_marks": plane.unmatched_marks,
        "yielded": plane.yielded,
        "reloads_ok": runtime.reloads_ok,
        "reloads_failed": runtime.reloads_failed,
        "upgrades": dict(runtime.upgrades),
        "started_at": runtime.started_at,
    }
    return out


# The counters a process hands on (compiled, a class has no `__slots__` to list them)
GROUP_COUNTERS = (
    "accepted", "rejected", "client_limit", "denied", "source", "no_backend", "connect_failures",
    "descriptors", "failed_refused", "failed_timeout", "repins_unavailable", "repins_failed",
    "repins_returned", "unpinned", "sorry",
)  # fmt: skip
UDP_COUNTERS = (
    "opened", "evicted", "unreachable", "datagrams_in", "datagrams_out", "bytes_in",
    "bytes_out", "drops", "quic", "migrations",
)  # fmt: skip
BACKEND_COUNTERS = (
    "connections",
    "connect_failures",
    "failed_refused",
    "failed_timeout",
    "bytes_in",
    "bytes_out",
    "peak",
    "down_total",
)


def _histogram(h: Any) -> dict[str, Any]:
    return {"counts": list(h.counts), "total": h.total, "count": h.count}


def _set_histogram(h: Any, v: dict[str, Any], add: bool = False) -> None:
    counts = v.get("counts")
    if (
        isinstance(counts, list)
        and len(counts) == len(h.counts)
        and all(isinstance(n, int) for n in counts)
        and isinstance(v.get("count"), int)
        and isinstance(v.get("total"), int | float)
    ):
        if add:
            h.counts[:] = [a + b for a, b in zip(h.counts, counts, strict=True)]
            h.count += v["count"]
            h.total += float(v["total"])
            return
        h.counts[:] = counts
        h.count = v["count"]
        h.total = float(v["total"])


def states(routers: Mapping[str, Router]) -> dict[str, Any]:
    """What health and the operator made of each backend."""
    return {
        name: {
            b.name: {"healthy": b.healthy, "admin": b.admin.value, "weight": b.weight}
            for b in router.backends
        }
        for name, router in routers.items()
    }


def apply_states(routers: Mapping[str, Router], states: Mapping[str, Any]) -> None:
    """What health and the operator made of each backend, as the old process had it."""
    from ..core.backends import State

    for group, backends in states.items():
        router = routers.get(group)
        if router is None or not isinstance(backends, dict):
            continue
        for name, st in backends.items():
            b = router.by_name.get(name)
            if b is None or not isinstance(st, dict):
                continue
            with contextlib.suppress(ValueError, TypeError):
                if st.get("admin") != b.admin.value:
                    router.set_admin(b, State(st["admin"]), "as the previous process had it")
                if isinstance(st.get("weight"), int) and st["weight"] != b.weight:
                    router.set_weight(b, st["weight"], "as the previous process had it")
                if isinstance(st.get("healthy"), bool):
                    router.set_health(b, st["healthy"], "as the previous process had it")


def apply_counters(runtime: Counted, counters: Mapping[str, Any], *, add: bool = False) -> None:
    """The old process's totals, to count on from; `add`: what it counted since it sent them
    (`delta`: a hand-over in waves), added to this process's (a wrong-typed value is left
    alone)."""
    for group, data in (counters.get("groups") or {}).items():
        router = runtime.routers.get(group)
        if router is None:
            continue
        st = router.stats
        for k, v in (data.get("stats") or {}).items():
            if k in GROUP_COUNTERS and isinstance(v, int):
                _put(st, k, v, add)
            elif k in ("connect", "duration") and isinstance(v, dict):
                _set_histogram(getattr(st, k), v, add)
        for name, values in (data.get("backends") or {}).items():
            b = router.by_name.get(name)
            for k, v in (values or {}).items() if b is not None else ():
                if (
                    k in BACKEND_COUNTERS
                    and isinstance(v, int | float)
                    and not (add and k == "peak")
                ):
                    _put(b, k, v, add)
    for group, data in (counters.get("udp") or {}).items():
        u = runtime.udp_stats.get(group)
        for k, v in (data or {}).items() if u is not None else ():
            if k not in UDP_COUNTERS:
                continue
            if isinstance(v, int) and isinstance(getattr(u, k), int):
                _put(u, k, v, add)
            elif isinstance(v, dict) and isinstance(getattr(u, k, None), dict):
                _merge(getattr(u, k), v, add)
    process = counters.get("process") or {}
    plane = runtime.plane
    if isinstance(process.get("accept_errors"), dict):
        _merge(plane.accept_errors, process["accept_errors"], add)
    for k in ("loops", "unmatched_marks", "yielded"):
        if isinstance(process.get(k), int):
            _put(plane, k, process[k], add)
    for k in ("reloads_ok", "reloads_failed"):
        if isinstance(process.get(k), int):
            _put(runtime, k, process[k], add)
    if isinstance(process.get("upgrades"), dict):
        _merge(runtime.upgrades, process["upgrades"], add)


def _put(obj: object, k: str, v: float, add: bool) -> None:
    cur = getattr(obj, k)
    setattr(obj, k, type(cur)(cur + v if add else v))


def _merge(into: dict[str, int], v: Mapping[str, Any], add: bool) -> None:
    for x, n in v.items():
        if isinstance(n, int):
            into[x] = into.get(x, 0) + n if add else n


def delta(base: Any, now: Any) -> Any:
    """What was counted between two `counters` (numbers, lists of them, dicts of those)."""
    if isinstance(now, dict) and isinstance(base, dict):
        return {k: delta(base.get(k), v) for k, v in now.items()}
    if isinstance(now, list) and isinstance(base, list) and len(now) == len(base):
        return [delta(x, y) for x, y in zip(base, now, strict=True)]
    if isinstance(now, int | float) and not isinstance(now, bool):
        return now - base if isinstance(base, int | float) else now
    return now

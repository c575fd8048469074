"""The read models the admin API and the metrics take from a running process: bytes still in
flight, UDP flows per backend and per entry, and the samples of the status page's history.
Not on the hot path: each walks what it reads when asked."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core.routing import Router
from ..dataplane.context import Connection
from ..dataplane.udp import UdpListener

HISTORY_PERIOD = 5.0  # seconds between samples of the affinity table sizes
HISTORY_LENGTH = 720  # one hour of samples


def in_flight(live: Iterable[Connection]) -> dict[tuple[str, str], list[int]]:
    """(group, backend) -> [bytes in, bytes out] of the connections still open, so that
    long transfers show as they flow."""
    out: dict[tuple[str, str], list[int]] = {}
    for c in live:
        conn = c.conn
        route = conn.route
        if route is not None and route.backend is not None:
            acc = out.setdefault((c.router.name, route.backend.name), [0, 0])
            acc[0] += conn.bytes_in
            acc[1] += conn.bytes_out
    return out


def flows_by_backend(listeners: Iterable[UdpListener]) -> dict[tuple[str, str], int]:
    """(group, backend) -> UDP flows open (for the API, not the hot path)."""
    out: dict[tuple[str, str], int] = {}
    for listener in listeners:
        for flow in listener.flows.values():
            if flow.backend is not None:
                k = (flow.router.name, flow.backend.name)
                out[k] = out.get(k, 0) + 1
    return out


def flows_by_entry(listeners: Iterable[UdpListener]) -> dict[int, int]:
    """id(affinity entry) -> UDP flows holding it (the rest of its references are TCP)."""
    out: dict[int, int] = {}
    for listener in listeners:
        for flow in listener.flows.values():
            entry = flow.route.entry if flow.route is not None else None
            if entry is not None:
                out[id(entry)] = out.get(id(entry), 0) + 1
    return out


def sample(
    routers: Mapping[str, Router], flowing: Mapping[tuple[str, str], list[int]]
) -> dict[str, Any]:
    """One point of the status page's history: per group the table size and counters, per
    backend its counters and state (the page makes rates of consecutive samples)."""
    groups: dict[str, Any] = {}
    backends: dict[str, Any] = {}
    for name, router in routers.items():
        table = router.table
        if table is not None:
            table.expire()
        st = router.stats
        g_in = g_out = 0
        for b in router.all_backends():
            live_in, live_out = flowing.get((name, b.name), (0, 0))
            b_in, b_out = b.bytes_in + live_in, b.bytes_out + live_out
            g_in, g_out = g_in + b_in, g_out + b_out
            backends[f"{name}/{b.name}"] = {
                "connections": b.connections,
                "active": b.active,
                "bytes_in": b_in,
                "bytes_out": b_out,
                "failures": b.connect_failures,
            }
        groups[name] = {
            "entries": len(table) if table is not None else 0,
            "accepted": st.accepted,
            "bytes_in": g_in,
            "bytes_out": g_out,
        }
    return {
        "time": time.time(),
        "entries": {g: v["entries"] for g, v in groups.items()},
        "groups": groups,
        "backends": backends,
    }


def new_history() -> deque[dict[str, Any]]:
    return deque(maxlen=HISTORY_LENGTH)


async def keep_history(history: deque[dict[str, Any]], take: Callable[[], dict[str, Any]]) -> None:
    """The last hour, kept in the process so that a freshly opened status page shows it."""
    while True:
        history.append(take())
        await asyncio.sleep(HISTORY_PERIOD)

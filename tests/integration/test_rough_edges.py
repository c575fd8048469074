"""Issue 33's rough edges that a real l4lb in this process shows: a reload's changes in the
events, IPv4-mapped networks in allow/deny, PROXY v2 LOCAL from a trusted proxy under `allow`,
UDP flows that end on time, the counters of a denied datagram."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from l4lb.config import load_config, load_config_text
from tests.support.helpers import NamedBackend, free_ports, hello, running

Cleanup = Callable[[Any], Any]


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


@pytest.mark.asyncio
async def test_a_reloads_changes_reach_the_events(
    backends: Callable[..., Awaitable[list[NamedBackend]]], tmp_path: Path
) -> None:
    """A reload's changes never reached `GET /api/v1/events` (nor the page's "Recent
    changes"); a change by ctl did."""
    (port,) = free_ports(1)
    (aport,) = free_ports(1)
    bs = await backends(2, [port])
    lines = [
        f"      - {{name: {b.name}, address: 127.0.0.1, ports: {{{port}: {b.ports[port]}}}}}"
        for b in bs
    ]
    text = (
        f"admin: {{listen: '127.0.0.1:{aport}'}}\n"
        "groups:\n  web:\n    listen: [127.0.0.1]\n"
        f"    ports: [{port}]\n    scheduler: rr\n    backends:\n" + "\n".join(lines) + "\n"
    )
    cfg = tmp_path / "l4lb.yaml"
    cfg.write_text(text)
    async with running(load_config(cfg)) as server:
        cfg.write_text(text.replace("scheduler: rr", "scheduler: wlc"))
        changes = await server.reload_from_file()
        assert changes == ["group web: scheduler rr -> wlc"]
        events = (await asyncio.to_thread(get_json, aport, "/api/v1/events"))["events"]
    (event,) = [e for e in events if e["reason"] == "reload"]
    assert (event["group"], event["backend"], event["old"], event["new"]) == (
        "web",
        None,
        "configuration",
        "scheduler rr -> wlc",
    )


def web_group(port: int, bs: list[NamedBackend], extra: str = "") -> str:
    lines = [
        f"      - {{name: {b.name}, address: 127.0.0.1, ports: {{{port}: {b.ports[port]}}}}}"
        for b in bs
    ]
    return (
        "groups:\n  web:\n    listen: [127.0.0.1]\n"
        f"    ports: [{port}]\n    scheduler: rr\n"
        + "".join(f"    {x}\n" for x in extra.splitlines() if x.strip())
        + "    backends:\n"
        + "\n".join(lines)
        + "\n"
    )


@pytest.mark.asyncio
async def test_an_ipv4_mapped_network_in_deny_matches_ipv4_clients(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
) -> None:
    """Q5: `deny: ["::ffff:127.0.67.0/120"]` passed `l4lb check` and never matched: 127.0.67.1
    was served. An IPv4-mapped network is the IPv4 network it maps."""
    (port,) = free_ports(1)
    bs = await backends(1, [port])
    text = web_group(port, bs, 'deny: ["::ffff:127.0.67.0/120"]')
    async with running(load_config_text(text, "t.yaml")) as server:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
            await hello_or_raise(port, "127.0.67.1")
        assert await hello(port, "127.0.68.1") == bs[0].name
        assert server.routers["web"].stats.denied == 1


async def hello_or_raise(port: int, src: str) -> str:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        line = await asyncio.wait_for(r.readline(), 5)
        if not line:
            raise ConnectionResetError("closed without a greeting")
        return line.decode().strip()
    finally:
        w.close()

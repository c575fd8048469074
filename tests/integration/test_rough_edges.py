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
from tests.support.helpers import NamedBackend, UdpBackend, UdpClient, free_ports, hello, running

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


@pytest.mark.asyncio
async def test_a_udp_flow_never_ends_before_its_idle_timeout(
    cleanup: Cleanup,
) -> None:
    """A flow was logged `duration_ms: 9158`, `idle_timeout`, with `udp_idle_timeout: 10s`: its
    last datagram was stamped with the clock of the sweep's last tick (a tenth of the timeout
    behind). Ten flows opened at different moments of a tick: each lives its timeout."""
    (port,) = free_ports(1)
    echo = cleanup(await UdpBackend("e").start())
    text = (
        "groups:\n  dns:\n    listen: [127.0.0.1]\n"
        f'    ports: ["{port}/udp"]\n    udp_idle_timeout: 500ms\n'
        f"    backends:\n      - {{name: e, address: 127.0.0.1, ports: {{'{port}/udp': {echo.port}}}}}\n"
    )
    loop = asyncio.get_running_loop()
    async with running(load_config_text(text, "t.yaml")) as server:
        (listener,) = server.listeners.udp_listeners()
        sent: dict[object, float] = {}
        for i in range(10):
            client = cleanup(await UdpClient.open(port, f"127.0.{30 + i}.1"))
            await asyncio.sleep(0.007)  # (ten phases of the sweep's 50 ms tick)
            sent_at = loop.time()
            assert await client.ask(b"x") is not None
            (key,) = [k for k, f in listener.flows.items() if f.client[0] == f"127.0.{30 + i}.1"]
            sent[key] = sent_at
        ended: dict[object, float] = {}
        deadline = loop.time() + 5
        while len(ended) < len(sent) and loop.time() < deadline:
            await asyncio.sleep(0.002)  # (watching the listener's table: no event to await)
            for key in sent:
                if key not in ended and key not in listener.flows:
                    ended[key] = loop.time()
    lived = sorted(ended[k] - sent[k] for k in sent)
    assert len(lived) == 10 and lived[0] >= 0.5, lived

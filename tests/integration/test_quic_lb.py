"""QUIC-LB on real sockets (issue 27): datagrams routed by the server ID in their connection
IDs, from networks l4lb has never seen, beside TCP pinned by address. The QUIC stack's own test
(an aioquic client that moves) is tests/peers/test_quic_migration.py; here the packets are made
by hand, so that each rule of `Router.quic_route` is seen alone."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from l4lb.core.quiclb import Codec
from tests.integration.test_udp import Started, admin_views, backend_yaml, shop, udp_group
from tests.support.helpers import NamedBackend, UdpClient, config_of, free_ports, hello, running

Cleanup = Callable[[Any], Any]
KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
SIDS = ("0a11", "0b22")  # the two backends' server IDs


def quic_yaml(started: Started, quic: str = "", extra: str = "") -> str:
    """The shop's two backends (a, b) with server IDs, and quic_lb as given ("" for none)."""
    tcp, udp, tp, up = started
    lines = [
        backend_yaml(
            t.name, {tp: t.ports[tp]}, {up: u.port}, f", server_id: '{sid}'" if quic else ""
        )
        for t, u, sid in zip(tcp, udp, SIDS, strict=True)
    ]
    return udp_group([tp], [up], lines, (f"quic_lb: {quic}\n" if quic else "") + extra)


def short(codec: Codec, sid: str) -> bytes:
    """A short-header packet whose destination connection ID carries `sid`."""
    return bytes([0x41]) + codec.encode(bytes.fromhex(sid), os.urandom(codec.nonce_len)) + b"data"


async def answered_by(client: UdpClient, packet: bytes) -> str | None:
    answer = await client.ask(packet)
    return answer.split(b" ", 1)[0].decode() if answer is not None else None


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
async def test_short_headers_from_eight_fresh_networks_reach_the_server_named(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
    cleanup: Cleanup,
    tmp_path: Path,
    encrypted: bool,
) -> None:
    key_file = tmp_path / "quic.key"
    key_file.write_text(KEY.hex() + "\n")
    quic = "{server_id_length: 2, nonce_length: 6" + (
        f", key_file: {key_file}}}" if encrypted else "}"
    )
    codec = Codec(0, 2, 6, KEY if encrypted else None)
    started = await shop(backends, cleanup, n=2)
    owners = [1, 1, 0, 1, 0, 0, 1, 0]  # rr alone would answer 0, 1, 0, 1, ...
    async with running(config_of(quic_yaml(started, quic))) as server:
        for i, owner in enumerate(owners):
            src = f"127.0.{40 + i}.9"  # a network l4lb has never seen
            client = cleanup(await UdpClient.open(started[3], src))
            name, sid = started[0][owner].name, SIDS[owner]
            assert await answered_by(client, short(codec, sid)) == name, src
            # the new network follows its QUIC server: its TCP goes there too
            assert await hello(started[2], f"127.0.{40 + i}.10") == name, src
        stats = server.udp_stats["shop"]
        assert stats.quic == {"cid": 8, "pin": 0, "fallback": 0, "unroutable": 0, "full": 0}
        assert stats.migrations == 8


@pytest.mark.asyncio
async def test_a_pinned_network_keeps_its_tcp_while_its_quic_follows_the_other_servers_id(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup, tmp_path: Path
) -> None:
    started = await shop(backends, cleanup, n=2)
    codec = Codec(0, 2, 6)
    (admin_port,) = free_ports(1)
    top = f"admin: {{listen: '127.0.0.1:{admin_port}'}}\n"
    log = tmp_path / "access.log"
    group = quic_yaml(
        started, "{server_id_length: 2, nonce_length: 6}", f"access_log: {{path: {log}}}"
    )
    async with running(config_of(group, top=top)):
        pinned = await hello(started[2], "127.0.50.1")
        names = [t.name for t in started[0]]
        other = names[1 - names.index(pinned)]
        client = cleanup(await UdpClient.open(started[3], "127.0.50.2"))
        sid = SIDS[names.index(other)]
        for _ in range(3):  # the flow, and each datagram of it
            assert await answered_by(client, short(codec, sid)) == other
        assert await hello(started[2], "127.0.50.3") == pinned  # the pin held
        entry, group_json, rows, metrics = await admin_views(admin_port, "127.0.50.1")
        client.close()
    assert entry["backend"] == pinned
    assert group_json["quic_lb"] == {
        "config_id": 0,
        "server_id_length": 2,
        "nonce_length": 6,
        "key_file": "",
        "encrypted": False,
    }
    assert group_json["udp"]["quic"]["cid"] == 1 and group_json["udp"]["migrations"] == 1
    assert tuple(rows[n]["server_id"] for n in names) == SIDS
    assert 'l4lb_quic_packets_total{group="shop",route="cid"} 1.0' in metrics
    assert 'l4lb_quic_migrations_total{group="shop"} 1.0' in metrics
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    (flow,) = [x for x in lines if x.get("protocol") == "udp"]
    assert (flow["affinity"], flow["server_id"], flow["backend"]) == ("cid", sid, other)
    assert {x["affinity"] for x in lines if x.get("protocol") != "udp"} == {"new", "hit"}


@pytest.mark.asyncio
async def test_a_flood_of_random_connection_ids_reaches_no_server_and_costs_no_flow(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup, tmp_path: Path
) -> None:
    """Short headers with random connection IDs from 200 fresh sources: only a packet whose
    random ID happens to carry a known server ID (the codec says which) reaches a server;
    the rest are dropped before any flow, entry or eviction, and a real client's flow and pin
    stay (the edge issue's rules)."""
    started = await shop(backends, cleanup, n=2)
    codec = Codec(0, 2, 6, KEY)
    rng = random.Random(27)
    key_file = tmp_path / "quic.key"
    key_file.write_text(KEY.hex())
    quic = f"{{server_id_length: 2, nonce_length: 6, key_file: {key_file}}}"
    async with running(config_of(quic_yaml(started, quic, "udp_max_flows: 50"))) as server:
        real = cleanup(await UdpClient.open(started[3], "127.0.60.1"))
        owner = await answered_by(real, short(codec, SIDS[1]))
        assert owner == started[0][1].name
        assert await answered_by(real, short(codec, SIDS[1])) == owner  # (validated)
        before = sum(u.datagrams for u in started[1])
        routable = 0
        for i in range(200):
            packet = bytes([0x40 | rng.randrange(64)]) + rng.randbytes(20)
            sid = codec.server_id(packet[1:10])
            routable += sid is not None and sid.hex() in SIDS
            flood = cleanup(await UdpClient.open(started[3], f"127.1.{i}.1"))
            assert flood.transport is not None
            flood.transport.sendto(packet)
        assert await answered_by(real, short(codec, SIDS[1])) == owner  # (the flood was read)
        stats = server.udp_stats["shop"]
        reached = sum(u.datagrams for u in started[1]) - before - 1
        table = server.routers["shop"].table
        assert table is not None
        assert reached == routable, (reached, routable)
        assert stats.drops["quic_unroutable"] == 200 - routable
        assert stats.opened == 1 + routable and stats.evicted == 0
        assert len(table) == 1 + routable
        assert real.transport is not None and not real.errors


def two_backends_yaml(started: Started, extra_b: str, group_extra: str = "") -> str:
    """The shop's backends a and b with plaintext server IDs, `extra_b` on b."""
    tcp, udp, tp, up = started
    lines = [
        backend_yaml(t.name, {tp: t.ports[tp]}, {up: u.port}, f", server_id: '{sid}'{extra}")
        for t, u, sid, extra in zip(tcp, udp, SIDS, ("", extra_b), strict=True)
    ]
    quic = "quic_lb: {server_id_length: 2, nonce_length: 6}\n"
    return udp_group([tp], [up], lines, quic + group_extra)


@pytest.mark.asyncio
async def test_one_replayed_connection_id_cannot_fill_its_server_past_max_conns(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    """Issue 33, Q1 as the probe saw it: b has max_conns 5 and a network pinned to it; ten fresh
    /24s send short headers carrying one ID of b's (learned from the prober's own connection).
    Before: all ten flows reached b (11 active of 5) and the pinned network's TCP went
    elsewhere. Now one ID steers two flows at most, b stays at or under 5, and the pinned
    network's TCP stays on b."""
    started = await shop(backends, cleanup, n=2)
    codec = Codec(0, 2, 6)
    b = started[0][1].name
    async with running(config_of(two_backends_yaml(started, ", max_conns: 5"))) as server:
        home = cleanup(await UdpClient.open(started[3], "127.0.70.5"))
        assert await answered_by(home, short(codec, SIDS[1])) == b  # a fresh network: pinned to b
        learned = short(codec, SIDS[1])  # the prober's own connection's ID, replayed
        for i in range(10):
            prober = cleanup(await UdpClient.open(started[3], f"127.0.{71 + i}.9"))
            await answered_by(prober, learned)
        router = server.routers["shop"]
        assert router.by_name[b].active <= 5, router.by_name[b].active
        assert await hello(started[2], "127.0.70.6") == b  # the pinned network's TCP
        stats = server.udp_stats["shop"]
        assert stats.quic["cid"] == 11 and stats.evicted == 8


@pytest.mark.asyncio
async def test_forged_ids_of_a_backup_pin_no_network_to_it(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    """Issue 33, Q2 as the probe saw it: 3,000 forged /24s send short headers with the backup's
    server ID while the primary is up (each a new ID: plaintext IDs are free to make). Before,
    half of them were pinned to the backup; now the flows reach it (its connections live
    there) and no network is pinned to it."""
    started = await shop(backends, cleanup, n=2)
    codec = Codec(0, 2, 6)
    a, b = (t.name for t in started[0])
    group = two_backends_yaml(started, ", backup: true", "udp_max_flows: 400")
    async with running(config_of(group)) as server:
        for i in range(3000):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.2.{i // 250}.{1 + i % 250}", 0))
                s.sendto(short(codec, SIDS[1]), ("127.0.0.1", started[3]))
            if i % 500 == 499:
                await asyncio.sleep(0)  # (let l4lb read: the socket buffer is bounded)
        real = cleanup(await UdpClient.open(started[3], "127.0.90.1"))
        # (after the flood in the listener's order: every forged datagram was read)
        assert await answered_by(real, short(codec, SIDS[0])) == a
        router = server.routers["shop"]
        table = router.table
        assert table is not None
        pinned = [
            host
            for i in range(3000)
            if (e := table.get(router.keyer(host := f"127.2.{i // 250}.{1 + i % 250}")))
            and e.backend is router.by_name[b]
        ]
        assert pinned == []
        assert server.udp_stats["shop"].quic["cid"] > 0

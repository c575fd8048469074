"""UDP in mark groups (l4lb/udp.py): flows through the group's router and affinity table, on
real sockets on loopback, with many 127/8 sources as many clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from l4lb import Server
from l4lb.config import Config, ConfigError, load_config_text
from l4lb.core.backends import State
from tests.support.cdp import CHROMIUM, browser
from tests.support.helpers import (
    NamedBackend,
    UdpBackend,
    UdpClient,
    config_of,
    free_ports,
    greet,
    hello,
    running,
    wait_until,
)
from tests.support.procs import output, processes, start_backend, start_l4lb, stop, wait_port

Cleanup = Callable[[Any], Any]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def backend_yaml(name: str, tcp: dict[int, int], udp: dict[int, int], extra: str = "") -> str:
    maps = [f"{k}: {v}" for k, v in tcp.items()] + [f'"{k}/udp": {v}' for k, v in udp.items()]
    return f"- {{name: {name}, address: 127.0.0.1, ports: {{{', '.join(maps)}}}{extra}}}"


def udp_group(
    tcp: list[int],
    udp: list[int],
    backends: list[str],
    extra: str = "",
    netmask: str = "/24",
    name: str = "shop",
) -> str:
    ports = [str(p) for p in tcp] + [f'"{p}/udp"' for p in udp]
    lines = [
        f"  {name}:",
        '    listen: ["127.0.0.1"]',
        f"    ports: [{', '.join(ports)}]",
        "    scheduler: rr",
        f"    persistence: {{timeout: 60s, netmask: '{netmask}'}}",
        "    connect_timeout: 1s",
        *(f"    {x}" for x in extra.splitlines() if x.strip()),
        "    backends:",
        *(f"      {b}" for b in backends),
    ]
    return "\n".join(lines)


Started = tuple[list[NamedBackend], list[UdpBackend], int, int]


async def shop(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
    cleanup: Cleanup,
    n: int = 3,
) -> Started:
    """n backends, each a TCP server (greets with its name) and a UDP one (answers with it)."""
    tcp_port, udp_port = free_ports(2)
    tcp = await backends(n, [tcp_port])
    udp = [cleanup(await UdpBackend(b.name).start()) for b in tcp]
    return tcp, udp, tcp_port, udp_port


def shop_yaml(started: Started, extra: str = "", backend_extra: str = "") -> str:
    tcp, udp, tp, up = started
    lines = [
        backend_yaml(t.name, {tp: t.ports[tp]}, {up: u.port}, backend_extra)
        for t, u in zip(tcp, udp, strict=True)
    ]
    return udp_group([tp], [up], lines, extra)


async def echo_group(cleanup: Cleanup, extra: str = "") -> tuple[int, str]:
    """A UDP-only group (one port) in front of one UDP backend named e; the port, the YAML."""
    (up,) = free_ports(1)
    echo = cleanup(await UdpBackend("e").start())
    return up, udp_group([], [up], [backend_yaml("e", {}, {up: echo.port})], extra)


def with_admin(started: Started) -> tuple[Config, int]:
    """The shop's configuration with an admin listener, and its port."""
    (admin_port,) = free_ports(1)
    top = f"admin: {{listen: '127.0.0.1:{admin_port}'}}\n"
    return config_of(shop_yaml(started), top=top), admin_port


@contextlib.asynccontextmanager
async def shop_with_a_flow(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup, source: str
) -> AsyncIterator[tuple[Started, int, str]]:
    """A running shop of two backends with an admin listener, and one flow open from `source`
    (answered): the shop, the admin port, and the backend that answered the flow."""
    started = await shop(backends, cleanup, n=2)
    config, admin_port = with_admin(started)
    async with running(config):
        flow = cleanup(await UdpClient.open(started[3], source))
        yield started, admin_port, await flow.who()


async def admin_views(
    admin_port: int, client: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]], str]:
    """What the admin API says of a one-group l4lb: `client`'s affinity entry, the group, the
    backends by name, and the metrics' text."""
    base = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/v1/affinity", params={"client": client}) as r:
            (entry,) = (await r.json())["entries"]
        async with http.get(f"{base}/api/v1/groups") as r:
            (group,) = (await r.json())["groups"]
        async with http.get(f"{base}/api/v1/backends") as r:
            rows = {b["name"]: b for b in (await r.json())["backends"]}
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
    return entry, group, rows, metrics


def open_clients(cleanup: Cleanup) -> Callable[..., Awaitable[UdpClient]]:
    async def make(port: int, src: str) -> UdpClient:
        return cleanup(await UdpClient.open(port, src))

    return make


# --------------------------------------------------------------------------- configuration


def test_udp_ports_ranges_and_port_maps_parse() -> None:
    config = load_config_text(
        """
groups:
  web:
    ports: [80, 443, "443/udp", "30000-30002/udp"]
    udp_idle_timeout: 30s
    udp_max_flows: 500
    backends:
      - {name: a, address: "10.0.0.1:8080"}
      - {name: b, address: 10.0.0.2, ports: {443: 8443, "443/udp": 9443, "30000-30002/udp": "40000-40002"}}
  dns:
    ports: ["53/udp", "53/tcp"]
    health_check: {type: udp, send: "\\x00\\x01", expect: "ok"}
    backends: [{name: a, address: 10.0.0.3}]
""",
        "t.yaml",
    )
    web, dns = config.groups
    assert (web.ports, web.udp_ports) == ((80, 443), (443, 30000, 30001, 30002))
    assert (web.udp_idle_timeout, web.udp_max_flows) == (30, 500)
    a, b = web.backends
    # an inline port is the first service port's; the others, UDP ones too, keep the offset
    assert dict(a.ports) == {80: 8080, 443: 8443}
    assert dict(a.udp_ports) == {443: 8443, 30000: 38000, 30001: 38001, 30002: 38002}
    assert dict(b.ports) == {443: 8443} and b.udp_port_for(443) == 9443
    assert b.udp_port_for(30002) == 40002 and b.port_for(80) == 80
    assert (dns.ports, dns.udp_ports, dns.first_port) == ((53,), (53,), 53)
    assert dns.health_check is not None and dns.health_check.send == "\x00\x01"
    (g,) = load_config_text(
        "groups: {g: {ports: ['53/udp'], backends: [{name: a, address: 10.0.0.1}]}}"
    ).groups
    assert (g.udp_idle_timeout, g.udp_max_flows) == (60, 0)  # 0: half the descriptors


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            "ports: ['53/udp']\n    backends: [{name: a, address: 10.0.0.1, ports: {53: 5353}}]",
            "t.yaml:4: groups.g.backends[0].ports.53: 53 not among the group's ports (53/udp)"
            ' (a UDP port is mapped as "53/udp")',
        ),
        (
            "ports: ['53/sctp']\n    backends: [{name: a, address: 10.0.0.1}]",
            "t.yaml:3: groups.g.ports[0]: the protocol in '53/sctp' must be tcp or udp",
        ),
        (
            "ports: ['53/udp', '53/udp']\n    backends: [{name: a, address: 10.0.0.1}]",
            "t.yaml:3: groups.g.ports[1]: port 53/udp is listed twice",
        ),
        (
            "ports: [80]\n    health_check: {type: udp}\n    backends: [{name: a, address: 10.0.0.1}]",
            "t.yaml:4: groups.g.health_check.type: a udp check needs one of the group's UDP ports",
        ),
        (
            "ports: [80, '443/udp']\n    kernel_mark: 5\n    backends: [{name: a, address: 10.0.0.1}]",
            "t.yaml:3: groups.g.ports: a kernel_mark group is TCP only (its traffic comes through"
            " the kernel_marks listener): move the UDP ports to a group of their own",
        ),
        (
            "ports: ['53/udp']\n    udp_idle_timeout: 0\n    backends: [{name: a, address: 10.0.0.1}]",
            "t.yaml:4: groups.g.udp_idle_timeout:",
        ),
    ],
)
def test_udp_config_errors_are_one_line_each(body: str, error: str) -> None:
    marks = "kernel_marks: {listen: '127.0.0.1:9999'}\n" if "kernel_mark" in body else ""
    with pytest.raises(ConfigError) as err:
        load_config_text(f"groups:\n  g:\n    {body}\n{marks}", "t.yaml")
    line = err.value.lines[0]
    assert line.startswith(error), line
    assert len(err.value.lines) == 1


def test_a_udp_and_a_tcp_port_of_one_number_may_be_in_two_groups() -> None:
    config = load_config_text(
        """
groups:
  dns_udp: {ports: ["53/udp"], backends: [{name: a, address: 10.0.0.1}]}
  dns_tcp: {ports: [53], backends: [{name: a, address: 10.0.0.2}]}
""",
    )
    assert [g.udp_ports for g in config.groups] == [(53,), ()]
    with pytest.raises(ConfigError, match="port 53/udp is also bound by group 'a'"):
        load_config_text(
            "groups:\n  a: {ports: ['53/udp'], backends: [{name: x, address: 10.0.0.1}]}\n"
            "  b: {ports: ['53/udp'], backends: [{name: x, address: 10.0.0.1}]}\n"
        )


# --------------------------------------------------------------------------- flows


@pytest.mark.asyncio
async def test_a_clients_tcp_and_udp_land_on_one_backend_whichever_comes_first(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    started = await shop(backends, cleanup)
    _, _, tp, up = started
    client = open_clients(cleanup)
    async with running(config_of(shop_yaml(started))) as server:
        seen: dict[str, set[str]] = {}
        for net in range(1, 7):
            for host in (10, 11):
                src = f"127.0.{net}.{host}"
                if net % 2:  # TCP first, then UDP
                    first = await hello(tp, src)
                    second = await (await client(up, src)).who()
                else:  # UDP first, then TCP
                    first = await (await client(up, src)).who() or "none"
                    second = await hello(tp, src)
                assert first == second, src
                seen.setdefault(f"127.0.{net}", set()).add(first)
        assert all(len(names) == 1 for names in seen.values()), seen  # one backend per /24
        assert len({n for names in seen.values() for n in names}) == 3  # and all 3 used
        st = server.udp_stats["shop"]
        assert st.opened == 12 and st.datagrams_in == st.datagrams_out == 12


@pytest.mark.asyncio
async def test_datagrams_pass_whole_and_unmerged_both_ways(
    cleanup: Cleanup,
) -> None:
    up, group = await echo_group(cleanup)
    async with running(config_of(group)):
        c = await UdpClient.open(up, "127.0.0.5")
        cleanup(c)
        # (not 0 bytes: asyncio's and uvloop's sendto send nothing for an empty datagram)
        for size in (1, 1400, 9000, 65507 - 2):  # 65,507: IPv4's largest UDP payload
            data = bytes(i % 251 for i in range(size))
            assert await c.ask(data) == b"e " + data, size
        # a burst of distinct datagrams comes back as as many datagrams, none merged or split
        assert c.transport is not None
        for i in range(50):
            c.transport.sendto(b"%03d" % i)
        got = [await asyncio.wait_for(c.answers.get(), 2) for _ in range(50)]
        assert sorted(got) == [b"e %03d" % i for i in range(50)]


@pytest.mark.asyncio
async def test_an_unreachable_backend_moves_its_flows_at_the_next_datagram(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    started = await shop(backends, cleanup, n=2)
    _, udp, tp, up = started
    async with running(config_of(shop_yaml(started, "passive: {failures: 1}"))) as server:
        c = cleanup(await UdpClient.open(up, "127.0.3.3"))
        first = await c.who()
        victim = next(u for u in udp if u.name == first)
        victim.close()  # its port now answers with ICMP port unreachable
        await wait_until(lambda: port_free(victim.port))  # (uvloop closes it a turn later)
        assert await c.who(within=0.5) is None
        router = server.routers["shop"]
        await wait_until(lambda: server.udp_stats["shop"].unreachable == 1)
        moved = await c.who()
        assert moved is not None and moved != first
        # a passive failure (failures: 1 marks it down), and the pin moved with the flow: the
        # client's TCP follows it
        assert router.by_name[first].state is State.DOWN
        assert router.stats.repins_failed == 1
        assert await hello(tp, "127.0.3.4") == moved


@pytest.mark.asyncio
async def test_a_disabled_backend_loses_its_flows_without_a_lost_datagram(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    started = await shop(backends, cleanup, n=2)
    _, _, _, up = started
    async with running(config_of(shop_yaml(started))) as server:
        c = cleanup(await UdpClient.open(up, "127.0.4.4"))
        first = await c.who()
        router = server.routers["shop"]
        router.set_admin(router.by_name[first], State.DISABLED)
        moved = await c.who()
        assert moved is not None and moved != first  # not blackholed until a timeout
        assert router.stats.repins_unavailable == 1


@pytest.mark.asyncio
async def test_an_idle_flow_ends_and_its_entry_starts_its_persistence_timeout(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    started = await shop(backends, cleanup, n=2)
    log_path = tmp_path / "access.log"
    extra = f"udp_idle_timeout: 0.3s\naccess_log: {{path: '{log_path}', format: json}}"
    async with running(config_of(shop_yaml(started, extra))) as server:
        c = cleanup(await UdpClient.open(started[3], "127.0.5.5"))
        name = await c.ask(b"12345")
        assert name is not None
        router = server.routers["shop"]
        table = router.table
        assert table is not None
        (entry,) = [e for e in table.entries() if e.refs]
        t0 = time.monotonic()
        await wait_until(lambda: server.udp_stats["shop"].flows == 0)
        assert time.monotonic() - t0 >= 0.25  # not before its timeout
        assert entry.refs == 0 and entry.backend is not None  # idle now, still pinned
        assert 59 < entry.expires - table.clock() <= 60
        for w in server.access_logs.values():
            w.flush()
        (line,) = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert line["protocol"] == "udp" and line["client"] == "127.0.5.5"
    assert line["client_port"] == c.transport.get_extra_info("sockname")[1]
    assert (line["port"], line["affinity"], line["termination"]) == (
        started[3],
        "new",
        "idle_timeout",
    )
    assert line["backend"] == name.split(b" ")[0].decode()
    assert (line["bytes_in"], line["bytes_out"]) == (5, len(name))
    assert line["duration_ms"] >= 250


@pytest.mark.asyncio
async def test_a_flood_of_source_ports_stays_within_the_bound_and_spares_a_busy_flow(
    cleanup: Cleanup,
) -> None:
    up, group = await echo_group(cleanup, "udp_max_flows: 50")
    async with running(config_of(group)) as server:
        busy = cleanup(await UdpClient.open(up, "127.0.6.1"))
        assert await busy.ask(b"first") is not None
        st = server.udp_stats["shop"]
        flood = []
        for i in range(500):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            cleanup(s)
            s.bind((f"127.0.7.{1 + i % 200}", 0))
            s.setblocking(False)
            s.sendto(b"x", ("127.0.0.1", up))
            flood.append(s)
            if i % 25 == 0:  # the busy client keeps talking through the flood
                assert await busy.ask(b"still") is not None
                assert st.flows <= 50
        await wait_until(lambda: st.opened == 501)
        assert st.flows == 50 and st.evicted == 451
        # the busy flow was never the oldest idle one: it is the one it opened first
        assert await busy.ask(b"last") is not None
        assert st.opened == 501


@pytest.mark.asyncio
async def test_a_flood_of_forged_sources_never_evicts_a_validated_flow(cleanup: Cleanup) -> None:
    """A client that proved its address (it sent again after an answer) keeps its flow while
    it is idle and 500 single datagrams from forged sources hit a bound of 50 flows: the flood
    evicts its own unvalidated flows, oldest first (it used to evict the idle real one, the
    oldest of all, and its next datagram opened a new flow)."""
    up, group = await echo_group(cleanup, "udp_max_flows: 50")
    async with running(config_of(group)) as server:
        real = cleanup(await UdpClient.open(up, "127.0.6.1"))
        assert await real.ask(b"one") is not None
        assert await real.ask(b"two") is not None  # validated
        st = server.udp_stats["shop"]
        for i in range(500):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.0.{10 + i // 200}.{1 + i % 200}", 0))
                s.sendto(b"x", ("127.0.0.1", up))
        await wait_until(lambda: st.opened == 501)
        assert st.flows == 50 and st.evicted == 451
        # The flood l4lb passed on fills the test backend's receive queue (about 256 datagrams;
        # on the standard loop it reads one per turn), which may drop the next datagram as any
        # full queue would: a real client sends again, as QUIC does.
        answer = None
        for _ in range(3):
            answer = await real.ask(b"three")
            if answer is not None:
                break
        assert answer is not None
        assert st.opened == 501  # its own flow still: no new one


@pytest.mark.asyncio
async def test_a_flow_counts_as_a_connection_for_max_conns(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    started = await shop(backends, cleanup, n=2)
    _, _, tp, up = started
    async with running(config_of(shop_yaml(started, backend_extra=", max_conns: 1"))) as server:
        a = cleanup(await UdpClient.open(up, "127.0.8.1"))
        b = cleanup(await UdpClient.open(up, "127.0.9.1"))
        names = {await a.who(), await b.who()}
        assert len(names) == 2  # the first backend was full with one flow
        router = server.routers["shop"]
        assert all(x.active == 1 for x in router.backends)
        # a third client finds both full: no backend (counted), its datagram dropped
        c = cleanup(await UdpClient.open(up, "127.0.10.1"))
        assert await c.who(within=0.5) is None
        assert server.udp_stats["shop"].drops["no_backend"] >= 1
        _ = tp


@pytest.mark.asyncio
async def test_udp_checks_send_a_datagram_and_match_the_answer(
    cleanup: Cleanup,
) -> None:
    (up,) = free_ports(1)
    good = cleanup(await UdpBackend("good").start())
    closed = UdpBackend("closed")
    await closed.start()
    closed_port = closed.port
    closed.close()  # nothing listens there: ICMP port unreachable
    wrong = cleanup(await UdpBackend("wrong").start())
    check = "health_check: {type: udp, send: 'ping', expect: '^good ping$', interval: 0.1s, timeout: 0.5s, rise: 1, fall: 1}"
    group = udp_group(
        [],
        [up],
        [
            backend_yaml("good", {}, {up: good.port}),
            backend_yaml("closed", {}, {up: closed_port}),
            backend_yaml("wrong", {}, {up: wrong.port}),
        ],
        check,
    )
    async with running(config_of(group)) as server:
        router = server.routers["shop"]
        await wait_until(
            lambda: (
                router.by_name["closed"].state is State.DOWN
                and router.by_name["wrong"].state is State.DOWN
            )
        )
        assert router.by_name["good"].state is State.UP
        results = server.monitor.results
        assert "refused" in results[("shop", "closed")].detail
        assert "did not match" in results[("shop", "wrong")].detail


@pytest.mark.asyncio
async def test_the_api_and_metrics_show_flows(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    async with shop_with_a_flow(backends, cleanup, "127.0.11.7") as (started, admin_port, name):
        _, _, tp, up = started
        _, _r, w = await greet(tp, "127.0.11.8")
        entry, group, rows, metrics = await admin_views(admin_port, "127.0.11.7")
        w.close()
    assert (entry["backend"], entry["connections"], entry["flows"]) == (name, 1, 1)
    assert group["udp_ports"] == [up] and group["udp"]["flows"] == 1
    assert group["udp"]["datagrams_in"] == group["udp"]["datagrams_out"] == 1
    assert rows[name]["flows"] == 1 and f"{up}/udp" in rows[name]["addresses"]
    assert 'l4lb_udp_flows{group="shop"} 1.0' in metrics
    assert 'l4lb_udp_datagrams_total{direction="in",group="shop"} 1.0' in metrics
    assert 'l4lb_udp_dropped_total{group="shop",reason="no_backend"} 0.0' in metrics


@pytest.mark.asyncio
async def test_a_wildcard_listener_answers_from_the_address_the_client_sent_to(
    cleanup: Cleanup,
) -> None:
    up, group = await echo_group(cleanup)
    config = config_of(group.replace('listen: ["127.0.0.1"]', 'listen: ["0.0.0.0"]'))
    async with running(config):
        for dst in ("127.0.0.1", "127.0.0.2", "127.1.2.3"):
            # a connected socket drops datagrams from any other source address
            c = cleanup(await UdpClient.open(up, "127.0.12.1", host=dst))
            assert await c.who() == "e", dst


@pytest.mark.asyncio
async def test_reload_adds_and_removes_udp_ports(cleanup: Cleanup, tmp_path: Path) -> None:
    p1, p2 = free_ports(2)
    echo = cleanup(await UdpBackend("e").start())
    b = backend_yaml("e", {}, {p1: echo.port, p2: echo.port})
    path = tmp_path / "l4lb.yaml"
    path.write_text(
        "groups:\n" + udp_group([], [p1], [b.replace(f', "{p2}/udp": {echo.port}', "")]) + "\n"
    )
    server = Server(load_config_text(path.read_text(), str(path)))
    await server.start()
    try:
        c1 = cleanup(await UdpClient.open(p1, "127.0.13.1"))
        assert await c1.who() == "e"
        path.write_text(
            "groups:\n" + udp_group([], [p2], [b.replace(f'"{p1}/udp": {echo.port}, ', "")]) + "\n"
        )
        changes = await server.reload_from_file()
        assert f"listening on 127.0.0.1:{p2}/udp" in changes
        assert f"stopped listening on 127.0.0.1:{p1}/udp" in changes
        c2 = cleanup(await UdpClient.open(p2, "127.0.13.1"))
        assert await c2.who() == "e"
        assert await c1.who(within=0.3) is None
    finally:
        await server.shutdown(grace=1.0)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
@pytest.mark.asyncio
async def test_the_status_page_shows_udp_ports_and_flows(
    backends: Callable[..., Awaitable[list[NamedBackend]]],
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    async with shop_with_a_flow(backends, cleanup, "127.0.14.1") as (started, admin_port, name):
        up = started[3]
        async with browser(tmp_path, f"http://127.0.0.1:{admin_port}/") as page:
            rows = "[...document.querySelectorAll('#backends tbody tr')]"
            await page.until(f"{rows}.length === 2")
            group = await page.js(
                "[...document.querySelector('#groups tbody tr').children].map(c => c.textContent)"
            )
            assert f"{up}/udp" in group[2]  # the ports column
            assert "1 open, 1 opened, 0 datagrams dropped" in group
            cells = await page.js(f"{rows}.map(r => [...r.children].map(c => c.textContent))")
            mine = next(r for r in cells if r[1] == name)
            assert mine[7] == "1 (1 UDP)"  # open: the flow
            udp_port = next(u.port for u in started[1] if u.name == name)
            assert f"127.0.0.1:{udp_port} ({up}/udp)" in mine[2]  # where its datagrams go
            # At 1280 px (a laptop), every action button is on screen: it was off to the right
            # (issue 33's paper cut), past 18 columns.
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=800,
                deviceScaleFactor=1,
                mobile=False,
            )
            right = await page.js(
                "Math.max(...[...document.querySelectorAll('#backends button')]"
                ".map(b => b.getBoundingClientRect().right))"
            )
            assert 0 < right <= 1280, right


@pytest.mark.asyncio
async def test_client_limits_count_a_flow_as_a_connection(cleanup: Cleanup) -> None:
    up, group = await echo_group(cleanup, "udp_idle_timeout: 0.3s\nclient_limits: {max_conns: 2}")
    async with running(config_of(group)) as server:
        one, two, three = [cleanup(await UdpClient.open(up, f"127.0.15.{i}")) for i in (1, 2, 3)]
        other = cleanup(await UdpClient.open(up, "127.0.16.1"))  # another network
        assert await one.who() == "e" and await two.who() == "e"
        assert await three.who(within=0.3) is None  # its network has two flows open
        assert await other.who() == "e"
        st = server.udp_stats["shop"]
        assert server.routers["shop"].stats.client_limit == 1 and "client_limit" not in st.drops
        await wait_until(lambda: st.flows == 0)  # idle: their slots are released
        assert await three.who() == "e"


class Amplifier(asyncio.DatagramProtocol):
    """A backend that answers every datagram with ten."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        for i in range(10):
            self.transport.sendto(b"%d" % i, addr)


async def test_a_source_that_never_speaks_again_gets_three_answers_at_most(
    cleanup: Cleanup,
) -> None:
    """Reflection: a datagram's source may be forged, so until the client sends a second one
    its flow passes back three answers at most (counted); then every answer."""
    loop = asyncio.get_running_loop()
    amp, _ = await loop.create_datagram_endpoint(Amplifier, local_addr=("127.0.0.1", 0))
    cleanup(amp)
    (up,) = free_ports(1)
    group = udp_group([], [up], [backend_yaml("amp", {}, {up: amp.get_extra_info("sockname")[1]})])
    async with running(config_of(group)) as server:
        c = cleanup(await UdpClient.open(up, "127.0.0.6"))
        assert c.transport is not None
        c.transport.sendto(b"q")
        first = [await asyncio.wait_for(c.answers.get(), 2) for _ in range(3)]
        drops = server.udp_stats["shop"].drops
        await wait_until(lambda: drops["unvalidated"] == 7)
        assert first == [b"0", b"1", b"2"] and c.answers.empty()
        c.transport.sendto(b"q")  # its second datagram: an address that answers is no forgery
        again = [await asyncio.wait_for(c.answers.get(), 2) for _ in range(10)]
        assert again == [b"%d" % i for i in range(10)] and drops["unvalidated"] == 7


async def test_a_udp_backend_that_leads_back_to_l4lb_is_taken_down_after_a_handful_of_loops(
    cleanup: Cleanup,
) -> None:
    """A backend named `localhost` with no port map sends a UDP port's datagrams back to l4lb's
    own listener (the config check cannot know a name's address): one datagram used to loop for
    ever at 100% of a core. Now the datagram from l4lb's own flow socket is dropped, counted, and
    the backend taken down; then the port is quiet."""
    (up,) = free_ports(1)
    group = udp_group([], [up], ["- {name: me, address: localhost}"])
    async with running(config_of(group)) as server:
        me = server.routers["shop"].by_name["me"]
        assert me.address == "127.0.0.1"  # resolved at start
        c = cleanup(await UdpClient.open(up, "127.0.0.7"))
        assert c.transport is not None
        c.transport.sendto(b"once")
        stats = server.udp_stats["shop"]
        await wait_until(lambda: stats.drops["looped"] >= 1 and me.state is State.DOWN)
        loops = stats.datagrams_in
        assert loops <= 5, loops  # a handful, not a storm
        quiet = asyncio.get_running_loop().create_future()  # a second with nothing more:
        asyncio.get_running_loop().call_later(1.0, quiet.set_result, None)
        await quiet
        assert stats.datagrams_in == loops


def test_a_flood_of_udp_sources_cannot_take_the_descriptors_tcp_needs(tmp_path: Path) -> None:
    """nofile 4096 and a group with a UDP port: 4,100 one-byte datagrams from distinct source
    ports (forged, as far as l4lb can tell) used to take every descriptor, and TCP was refused
    (0/20) until the flows idled out. Flows may hold half the descriptors, and a TCP connection
    at the limit ends the flows idle longest: 20/20 TCP served during and after."""
    tcp_port, udp_port, b_tcp, b_udp = free_ports(4)
    cfg = tmp_path / "l4lb.yaml"
    cfg.write_text(
        "groups:\n"
        + udp_group(
            [tcp_port],
            [udp_port],
            [backend_yaml("b", {tcp_port: b_tcp}, {udp_port: b_udp})],
        )
    )
    with processes() as procs:
        procs.append(start_backend("b", http=f"127.0.0.1:{b_tcp}", udp=f"127.0.0.1:{b_udp}"))
        wait_port(b_tcp)
        lb = start_l4lb(cfg, prefix=("prlimit", "--nofile=4096:4096"))
        procs.append(lb)
        for _ in range(4100):  # one datagram from each of 4,100 source ports
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.8", 0))
                s.sendto(b"x", ("127.0.0.1", udp_port))
        during = [http_get(tcp_port, f"127.0.9.{i}") for i in range(1, 21)]
        for _ in range(2000):  # and more while they are open
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.8", 0))
                s.sendto(b"x", ("127.0.0.1", udp_port))
        after = [http_get(tcp_port, f"127.0.10.{i}") for i in range(1, 21)]
        assert during == after == ["b"] * 20, (during, after)
        assert stop(lb) == 0
        assert "Traceback" not in output(lb)


def http_get(port: int, src: str) -> str:
    """The name the demo-style backend answers with, over TCP from `src`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].strip().decode()


async def test_forged_single_datagrams_cost_no_tcp_client_its_pin(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    """max_entries 2000, five TCP clients pinned and gone idle, then 3,000 single datagrams from
    3,000 /24s (sources anyone can forge): they used to evict the five pins (the oldest idle).
    A flow's entry is provisional until its client speaks again after an answer, and never
    evicts a confirmed pin: the five keep their backends."""
    started = await shop(backends, cleanup, n=3)
    _tcp, _udp, tp, up = started
    config = config_of(
        shop_yaml(started).replace("timeout: 60s,", "timeout: 60s, max_entries: 2000,")
    )
    async with running(config) as server:
        router = server.routers["shop"]
        clients = [f"127.0.{200 + i}.1" for i in range(5)]
        before = [await hello(tp, src) for src in clients]
        table = router.table
        assert table is not None and table.max_entries == 2000
        for i in range(3000):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.{20 + i // 250}.{i % 250}.1", 0))
                s.sendto(b"x", ("127.0.0.1", up))
        stats = server.udp_stats["shop"]
        await wait_until(lambda: stats.opened == 3000, within=20)
        for src in clients:
            assert table.get(router.keyer(src)) is not None, src  # still pinned
        assert [await hello(tp, src) for src in clients] == before
        assert table.overflows > 0  # the flood's later flows went unpinned instead

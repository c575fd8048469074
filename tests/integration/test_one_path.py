"""Issue 34: a TCP connection and a UDP flow are admitted and routed through one path
(`dataplane/path.py`). Where the two transports disagreed, they now agree; a test per unified
rule, on real sockets with real clients (many 127/8 sources as many client networks)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.integration.test_udp import backend_yaml, echo_group, shop, shop_yaml, udp_group
from tests.support.helpers import (
    NamedBackend,
    UdpClient,
    config_of,
    free_ports,
    greet,
    hello,
    running,
)
from tests.support.procs import output, processes, start_backend, start_l4lb, stop, wait_port

Cleanup = Callable[[Any], Any]


async def refused(port: int, src: str) -> bool:
    """Whether a TCP connection from `src` is ended by l4lb before any backend's greeting."""
    try:
        name, _r, w = await greet(port, src)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return True
    w.close()
    with contextlib.suppress(ConnectionError, OSError):
        await w.wait_closed()
    return name == ""


async def test_a_refusal_counts_alike_on_tcp_and_udp(
    backends: Callable[..., Awaitable[list[NamedBackend]]], cleanup: Cleanup
) -> None:
    """A denied network and a network over its client_limits: its TCP connection is reset and
    its UDP datagram dropped, and each counts once, in the same counter, whichever transport
    it came by."""
    started = await shop(backends, cleanup, n=1)
    _tcp, _udp, tcp_port, udp_port = started
    extra = "deny: [127.0.30.0/24]\nclient_limits: {max_conns: 1}"
    async with running(config_of(shop_yaml(started, extra))) as server:
        stats = server.routers["shop"].stats
        assert await refused(tcp_port, "127.0.30.1")
        flow = cleanup(await UdpClient.open(udp_port, "127.0.30.2"))
        assert await flow.who(within=0.3) is None
        assert (stats.denied, stats.client_limit) == (2, 0)

        name, _r, held = await greet(tcp_port, "127.0.31.1")  # the network's one connection
        assert name == "b0"
        assert await refused(tcp_port, "127.0.31.2")
        over = cleanup(await UdpClient.open(udp_port, "127.0.31.3"))
        assert await over.who(within=0.3) is None
        assert (stats.denied, stats.client_limit) == (2, 2)
        assert await hello(tcp_port, "127.0.32.1") == "b0"  # other networks are untouched
        held.close()


async def test_a_network_over_its_limit_evicts_no_flow(cleanup: Cleanup) -> None:
    """Client limits are judged before room is made for a new flow, as for a TCP connection:
    a network over its limit is refused without ending another client's flow (UDP made room
    first: at udp_max_flows, a refused datagram still evicted the oldest flow)."""
    up, group = await echo_group(cleanup, "udp_max_flows: 2\nclient_limits: {max_conns: 1}")
    async with running(config_of(group)) as server:
        st = server.udp_stats["shop"]
        a = cleanup(await UdpClient.open(up, "127.0.33.1"))
        b = cleanup(await UdpClient.open(up, "127.0.34.1"))
        assert await a.who() == "e" and await b.who() == "e"
        again = cleanup(await UdpClient.open(up, "127.0.34.2"))  # b's network, over its limit
        assert await again.who(within=0.3) is None
        assert server.routers["shop"].stats.client_limit == 1
        assert st.evicted == 0 and st.flows == 2
        assert await a.who() == "e" and st.opened == 2  # a's own flow still


def test_no_descriptor_counts_alike_on_tcp_and_udp(tmp_path: Path) -> None:
    """At the descriptor limit a new TCP connection and a new UDP flow are refused and both
    counted as `descriptors` in l4lb_connections_failed_total (TCP's refusal was counted only
    as an accept error)."""
    tcp_port, udp_port, b_tcp, b_udp = free_ports(4)
    cfg = tmp_path / "l4lb.yaml"
    (admin_port,) = free_ports(1)
    cfg.write_text(
        f"admin: {{listen: '127.0.0.1:{admin_port}'}}\ngroups:\n"
        + udp_group(
            [tcp_port], [udp_port], [backend_yaml("b", {tcp_port: b_tcp}, {udp_port: b_udp})]
        )
    )
    with processes() as procs:
        procs.append(start_backend("b", http=f"127.0.0.1:{b_tcp}", udp=f"127.0.0.1:{b_udp}"))
        wait_port(b_tcp)
        # 64 descriptors are kept for listeners, the API, logs...; four more: two connections
        lb = start_l4lb(cfg, prefix=("prlimit", "--nofile=68:68"))
        procs.append(lb)
        held = [
            socket.create_connection(("127.0.0.1", tcp_port), source_address=(f"127.0.35.{i}", 0))
            for i in (1, 2)
        ]
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536)  # both relayed: the budget is taken
        assert _answer(tcp_port, "127.0.36.1") == b""  # the third: reset
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.37.1", 0))
            u.settimeout(0.5)
            u.sendto(b"who", ("127.0.0.1", udp_port))
            try:
                answer = u.recv(65536)
            except TimeoutError:
                answer = b""
            assert answer == b""
        metrics = _get(admin_port, "/metrics")
        assert 'l4lb_connections_failed_total{group="shop",reason="descriptors"} 2.0' in metrics
        for s in held:
            s.close()
        assert stop(lb) == 0
        assert "Traceback" not in output(lb)


def _answer(port: int, src: str) -> bytes:
    """What a TCP client from `src` gets for a request (b"": closed or reset unanswered)."""
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), source_address=(src, 0), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while chunk := s.recv(65536):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


def _get(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode()

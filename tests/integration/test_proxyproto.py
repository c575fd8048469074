"""The PROXY protocol: the codec against its spec and hostile input, and l4lb with it, both ways,
in-process (refusals) and against HAProxy as the real peer (when it is installed)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from l4lb.core.proxyproto import encode
from tests.support.helpers import config_of, free_ports, group_yaml, running


def backend_line(port: int, bport: int) -> str:
    return f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}"


async def refused_with_a_reset(port: int, payload: bytes) -> None:
    """Send `payload` and expect an RST, not an ordinary FIN."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.readexactly(1), 5)
    w.close()


async def test_untrusted_malformed_and_late_headers_are_refused(backends) -> None:
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    untrusted = config_of(
        group_yaml("web", [port], [b.yaml()], extra="accept_proxy: {trusted: [10.99.0.0/16]}")
    )
    # Every refusal is a reset (the README's word), not an ordinary FIN, whether the peer sent
    # something or not: an unread byte alone would make the kernel send the RST anyway.
    async with running(untrusted) as server:
        for payload in (encode("v1", ("203.0.113.9", 1234), ("127.0.0.1", port)), b""):
            await refused_with_a_reset(port, payload)
        assert server.routers["web"].stats.rejected == 2
    trusted = config_of(
        group_yaml(
            "web",
            [port],
            [b.yaml()],
            extra="accept_proxy: {trusted: [127.0.0.0/8], timeout: 300ms}",
        )
    )
    async with running(trusted) as server:
        for payload in (b"PROXY TCP4 nonsense\r\n", b"PROXY TCP4 1.2.3.4"):  # malformed; late
            await refused_with_a_reset(port, payload)
        assert server.routers["web"].stats.rejected == 2
        assert b.connections == 0  # nothing reached the backend
        # And a good header: the client is the header's source.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(encode("v2", ("198.51.100.7", 5555), ("127.0.0.1", port)) + b"ping")
        assert (await r.readline()).strip().decode() == b.name
        assert await r.readexactly(4) == b"ping"
        (entry,) = server.routers["web"].table.entries()
        assert entry.key == int(ipaddress.ip_address("198.51.100.7"))
        w.close()


async def test_header_and_data_in_one_segment_or_apart(backends) -> None:
    """The header may arrive with the client's first bytes or before them, whole or in pieces."""
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml(
            "web", [port], [b.yaml() for b in bs], extra="accept_proxy: {trusted: [127.0.0.1/32]}"
        )
    )
    async with running(cfg) as server:
        for i in range(30):
            header = encode(
                ("v1", "v2")[i % 2], (f"192.0.2.{i + 1}", 40000 + i), ("127.0.0.1", port)
            )
            r, w = await asyncio.open_connection("127.0.0.1", port)
            if i % 3 == 0:
                w.write(header + b"ping")
            elif i % 3 == 1:
                w.write(header)
                await w.drain()
                w.write(b"ping")
            else:
                for k in range(0, len(header), 5):
                    w.write(header[k : k + 5])
                    await w.drain()
                w.write(b"ping")
            assert (await asyncio.wait_for(r.readline(), 5)).strip()
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            w.close()
        assert server.routers["web"].stats.rejected == 0
        assert len(server.routers["web"].table) == 30  # thirty clients, by their headers


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
async def test_a_trusted_proxys_own_connection_passes_the_allow_list(backends, header) -> None:
    """Issue 33, Q6: with `allow` set, PROXY v2 LOCAL (HAProxy's send-proxy-v2 health checks)
    and v1 UNKNOWN headers from the trusted proxy were reset as denied, so HAProxy marked l4lb
    down. The proxy speaks for itself there; the lists judge the clients it names."""
    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    extra = "accept_proxy: {trusted: [127.0.0.1/32]}\nallow: [198.51.100.0/24]"
    async with running(config_of(group_yaml("web", [port], [b.yaml()], extra=extra))) as server:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(header + b"ping")
        assert (await asyncio.wait_for(r.readline(), 5)).strip().decode() == b.name
        assert await r.readexactly(4) == b"ping"
        w.close()
        # a client the header names is still judged by the lists
        await refused_with_a_reset(port, encode("v2", ("203.0.113.9", 1), ("127.0.0.1", port)))
        assert server.routers["web"].stats.denied == 1

"""The PROXY protocol: the codec against its spec and hostile input, and l4lb with it, both ways,
in-process (refusals) and against HAProxy as the real peer (when it is installed)."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.core.proxyproto import MAX_HEADER, V2_SIGNATURE, ProxyError, encode, parse
from tests.helpers import config_of, free_ports, group_yaml, running
from tests.procs import ROOT, processes, start_backend, start_l4lb, wait_port

ports = st.integers(0, 65535)


@settings(deadline=None)
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports, st.sampled_from(["v1", "v2"]))
def test_round_trip_ipv4(src, dst, sport: int, dport: int, version: str) -> None:
    header = encode(version, (str(src), sport), (str(dst), dport))
    parsed = parse(header + b"client data")
    assert parsed is not None and parsed.length == len(header)
    assert parsed.source == (str(src), sport) and parsed.dest == (str(dst), dport)
    for cut in range(len(header)):
        assert parse(header[:cut]) is None  # any prefix: read more


@settings(deadline=None)
@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports, st.sampled_from(["v1", "v2"]))
def test_round_trip_ipv6(src, dst, sport: int, dport: int, version: str) -> None:
    header = encode(version, (str(src), sport), (str(dst), dport))
    parsed = parse(header)
    assert parsed is not None and parsed.source is not None and parsed.dest is not None
    assert ipaddress.ip_address(parsed.source[0]) == src and parsed.source[1] == sport
    assert ipaddress.ip_address(parsed.dest[0]) == dst and parsed.dest[1] == dport


@settings(deadline=None)
@given(st.binary(max_size=600))
def test_garbage_is_refused_or_incomplete_never_a_crash(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyError:
        return
    assert header is None or header.length <= len(data)


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_v2_signature_with_garbage_after(data: bytes) -> None:
    try:
        header = parse(V2_SIGNATURE + data)
    except ProxyError:
        return
    assert header is None or header.length <= len(V2_SIGNATURE) + len(data)


def test_spec_cases() -> None:
    assert parse(b"PROXY UNKNOWN\r\nGET /").source is None  # type: ignore[union-attr]
    local = V2_SIGNATURE + bytes((0x20, 0x00)) + struct.pack("!H", 0)
    assert parse(local).source is None  # type: ignore[union-attr]
    # TLVs after the addresses are skipped, whatever they say.
    v2 = encode("v2", ("10.1.2.3", 4000), ("10.9.9.9", 443))
    with_tlv = v2[:14] + struct.pack("!H", 12 + 7) + v2[16:] + b"\x04\x00\x04abcd"
    got = parse(with_tlv + b"rest")
    assert got is not None and got.source == ("10.1.2.3", 4000) and got.length == len(with_tlv)
    for bad in (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",  # port out of range
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",  # address
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",  # protocol
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # fields
        b"PROXY " + b"x" * 120,  # too long without CRLF
        b"GET / HTTP/1.1\r\n",  # not a header at all
        V2_SIGNATURE + bytes((0x11, 0x11)) + struct.pack("!H", 12),  # version 1 in a v2 header
        V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", 4) + b"1234",  # too short for IPv4
        V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", MAX_HEADER),  # oversized
    ):
        with pytest.raises(ProxyError):
            parse(bad)


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


needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (.ci/run installs it)"
)


def haproxy(tmp: Path, config: str) -> subprocess.Popen[str]:
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        "global\n  nbthread 1\n  maxconn 1000\ndefaults\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n"
        + config
    )
    return subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def curl(src: str, url: str) -> str:
    r = subprocess.run(
        ["curl", "-sS", "--interface", src, "--max-time", "5", url],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@needs_haproxy
@pytest.mark.e2e
def test_send_proxy_to_haproxy_logs_the_real_client(tmp_path: Path) -> None:
    lb_port, hp1, hp2 = free_ports(3)
    # HAProxy as the backend, accepting PROXY and answering with the source it was given.
    echo_src = (
        '  mode http\n  http-request return status 200 content-type text/plain lf-string "%[src]"\n'
    )
    with processes() as procs:
        procs.append(
            hp := haproxy(
                tmp_path,
                f"frontend v2\n  bind 127.0.0.1:{hp1} accept-proxy\n{echo_src}"
                f"frontend v1\n  bind 127.0.0.1:{hp2} accept-proxy\n{echo_src}",
            )
        )
        wait_port(hp1)
        cfg = tmp_path / "l4lb.yaml"
        cfg.write_text(
            "groups:\n  web:\n    listen: [127.0.0.1]\n"
            f"    ports: [{lb_port}]\n    scheduler: fo\n    send_proxy: v2\n    backends:\n"
            f"      - {{name: v2, address: 127.0.0.1, weight: 2, ports: {{{lb_port}: {hp1}}}}}\n"
            f"      - {{name: v1, address: 127.0.0.1, send_proxy: v1, ports: {{{lb_port}: {hp2}}}}}\n"
        )
        procs.append(start_l4lb(cfg))
        assert curl("127.0.57.7", f"http://127.0.0.1:{lb_port}/") == "127.0.57.7"
        assert hp.poll() is None


@needs_haproxy
@pytest.mark.e2e
def test_behind_haproxy_sending_proxy_each_real_client_keeps_one_backend(tmp_path: Path) -> None:
    front, lb_port, admin, b1, b2 = free_ports(5)
    (tmp_path / "token").write_text("t")
    with processes() as procs:
        procs.append(start_backend("web1", http=f"127.0.0.1:{b1}"))
        procs.append(start_backend("web2", http=f"127.0.0.1:{b2}"))
        cfg = tmp_path / "l4lb.yaml"
        cfg.write_text(
            f"admin: {{listen: '127.0.0.1:{admin}', token_file: token}}\n"
            "groups:\n  web:\n    listen: [127.0.0.1]\n"
            f"    ports: [{lb_port}]\n    scheduler: rr\n"
            "    accept_proxy: {trusted: [127.0.0.1/32]}\n    backends:\n"
            f"      - {{name: web1, address: 127.0.0.1, ports: {{{lb_port}: {b1}}}}}\n"
            f"      - {{name: web2, address: 127.0.0.1, ports: {{{lb_port}: {b2}}}}}\n"
        )
        procs.append(start_l4lb(cfg))
        procs.append(
            haproxy(
                tmp_path,
                f"frontend f\n  mode tcp\n  bind 127.0.0.1:{front}\n  default_backend l4lb\n"
                f"backend l4lb\n  mode tcp\n  server l 127.0.0.1:{lb_port} send-proxy-v2\n",
            )
        )
        wait_port(front)
        clients = [f"127.0.58.{i}" for i in range(1, 9)]
        seen = {c: {curl(c, f"http://127.0.0.1:{front}/") for _ in range(3)} for c in clients}
        assert all(len(s) == 1 for s in seen.values()), seen
        assert {next(iter(s)) for s in seen.values()} == {
            "web1",
            "web2",
        }  # spread: l4lb saw 8 clients
        listing = subprocess.run(
            [sys.executable, "-m", "l4lb", "ctl", "-c", str(cfg), "--json", "affinity", "list"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        import json

        pinned = {e["client"] for e in json.loads(listing.stdout)["entries"]}
        # The real clients, and 127.0.0.1: the readiness probe above, through HAProxy too.
        assert pinned == {f"{c}/32" for c in clients} | {"127.0.0.1/32"}


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

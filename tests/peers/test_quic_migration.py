"""QUIC-LB with a real QUIC stack (issue 27): two aioquic server processes that issue QUIC-LB
connection IDs carrying their server IDs (tests/support/quic_server.py), l4lb in front of them,
and an aioquic client that completes its handshake from one network, then moves its socket to
another network and port mid-connection (tests/support/quic_client.py), as a phone leaving
Wi-Fi does. Every request must be answered by the server that owns the connection, before and
after the move; the new network's TCP then reaches that server. Without quic_lb the same move
reaches the other server, which knows nothing of the connection: the test that shows it is
here too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_udp import udp_group
from tests.support.helpers import config_of, free_ports, hello, running
from tests.support.procs import ROOT, _started, processes
from tests.support.quic_client import MovingClient

KEY = "8f95f09245765f80256934e50c66207f"
QUIC_LB = "{server_id_length: 2, nonce_length: 6%s}"


@dataclass
class QuicServer:
    name: str
    server_id: str
    quic: int  # its UDP port
    tcp: int


@pytest.fixture
def servers() -> Iterator[list[QuicServer]]:
    """Two QUIC servers (a, b), each with a TCP port, issuing IDs in plaintext."""
    with processes() as procs:
        yield _start(procs, None)


def _start(procs: list[subprocess.Popen[str]], key: str | None) -> list[QuicServer]:
    out = []
    for name, sid in (("a", "0a11"), ("b", "0b22")):
        quic, tcp = free_ports(1)[0], free_ports(1)[0]
        argv = [sys.executable, "-m", "tests.support.quic_server", "--name", name]
        argv += ["--quic", f"127.0.0.1:{quic}", "--tcp", f"127.0.0.1:{tcp}"]
        argv += ["--server-id", sid, "--nonce-length", "6"]
        argv += ["--key", key] if key else []
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        _started(proc, "stdout", "ready", 1)
        out.append(QuicServer(name, sid, quic, tcp))
    return out


def group(servers: list[QuicServer], tp: int, up: int, quic_lb: str) -> str:
    rows = [
        f"- {{name: {s.name}, address: 127.0.0.1, ports: {{{tp}: {s.tcp}, '{up}/udp': {s.quic}}}"
        + (f", server_id: '{s.server_id}'}}" if quic_lb else "}")
        for s in servers
    ]
    return udp_group([tp], [up], rows, f"quic_lb: {quic_lb}" if quic_lb else "")


async def move_and_ask(
    servers: list[QuicServer], quic_lb: str, net: int
) -> tuple[list[str | None], list[str | None], str, dict[str, int]]:
    """Handshake from 127.0.NET.5, three requests; move to 127.0.NET+1.5 (a new port too),
    three requests; then TCP from the new network. The answers before and after, the TCP
    answer, and the group's QUIC counters."""
    tp, up = free_ports(2)
    async with running(config_of(group(servers, tp, up, quic_lb))) as server:
        client = MovingClient("127.0.0.1", up)
        try:
            await client.connect(f"127.0.{net}.5")
            before = [await _who(client) for _ in range(3)]
            old = client.local
            await client.move(f"127.0.{net + 1}.5")
            assert client.local[0] != old[0] and client.local[1] != old[1]
            after = [await _who(client, 2.0) for _ in range(3)]
            tcp = await hello(tp, f"127.0.{net + 1}.6")
        finally:
            client.close()
        st = server.udp_stats["shop"]
        counts = {**st.quic, "migrations": st.migrations}
    return before, after, tcp, counts


async def _who(client: MovingClient, within: float = 3.0) -> str | None:
    answer = await client.ask(b"who", within)
    return answer.decode() if answer is not None else None


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
async def test_a_client_that_moves_network_mid_connection_stays_with_its_server(
    encrypted: bool, tmp_path: Path
) -> None:
    key_file = tmp_path / "quic.key"
    key_file.write_text(KEY + "\n")
    with processes() as procs:
        servers = _start(procs, KEY if encrypted else None)
        quic_lb = QUIC_LB % (f", key_file: {key_file}" if encrypted else "")
        before, after, tcp, counts = await move_and_ask(servers, quic_lb, 80)
    owner = before[0]
    assert owner in ("a", "b") and before == [owner] * 3
    assert after == [owner] * 3  # the same server, from the new network and port
    assert tcp == owner  # the new network was pinned to the connection's server
    # the handshake by the pin (the client chose its first ID), the move by the server's ID
    assert counts["pin"] == 1 and counts["cid"] == 1 and counts["migrations"] == 1
    assert counts["unroutable"] == 0


@pytest.mark.asyncio
async def test_without_quic_lb_the_moved_connection_reaches_a_server_that_does_not_know_it(
    servers: list[QuicServer],
) -> None:
    """The same move with quic_lb removed: the new network's first flow goes to the scheduler's
    next pick (rr: the other server), which drops packets of a connection it never saw; and
    the new network's TCP is pinned there too."""
    before, after, tcp, _ = await move_and_ask(servers, "", 90)
    owner = before[0]
    assert owner in ("a", "b") and before == [owner] * 3
    assert after == [None] * 3
    assert tcp != owner

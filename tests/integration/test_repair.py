"""TCP_REPAIR on loopback (dataplane/repair.py): a live connection frozen, its socket closed
without a packet, made again from its state behind the network lock, and talking on; the lock
holds what the peer sends meanwhile (sent again once the socket runs). Needs CAP_NET_ADMIN and
nftables: CI runs it as root."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.dataplane import repair
from l4lb.runtime import netlock

pytestmark = pytest.mark.skipif(
    not repair.may_repair() or shutil.which("nft") is None,
    reason="TCP_REPAIR and the nftables lock need CAP_NET_ADMIN and nft (CI runs as root)",
)


async def test_a_connection_moves_to_a_new_socket_and_talks_on() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        client = socket.create_connection(srv.getsockname(), source_address=("127.0.0.9", 0))
        server, _ = srv.accept()
    client.settimeout(10)
    client.sendall(b"hello")
    assert server.recv(5) == b"hello"
    client.sendall(b"unread")  # (in the server's receive queue: it moves with the state)
    conn = (*client.getsockname(), *server.getsockname())
    await netlock.lock([conn])
    try:
        state = repair.freeze(server)
        server.close()  # (in repair mode: no FIN, no reset)
        client.sendall(b"meanwhile")  # (dropped by the lock, sent again later)
        state = repair.TcpState.from_json(state.to_json())
        moved = repair.restore(state)
    finally:
        await netlock.unlock()
    repair.thaw(moved)
    moved.settimeout(10)
    got = b""
    while len(got) < len(b"unreadmeanwhile"):
        got += moved.recv(100)
    assert got == b"unreadmeanwhile"
    moved.sendall(b"still here")
    assert client.recv(100) == b"still here"
    moved.close()
    client.close()


def test_a_socket_that_is_not_established_is_refused() -> None:
    with socket.socket() as s, pytest.raises(repair.RepairError, match="not established"):
        repair.freeze(s)


def test_check_says_when_the_pair_lacks_cap_net_admin(tmp_path: Path) -> None:
    """`l4lb check` of an `ha` section, run without CAP_NET_ADMIN (dropped by setpriv from
    the bounding set): one warning line naming the capability; with it, none."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    token = tmp_path / "token"
    token.write_text("t" * 40)
    conf = tmp_path / "l4lb.yaml"
    conf.write_text(
        f"admin: {{listen: '10.9.9.1:9100', token_file: {token}, read_token: true}}\n"
        "ha: {peer: '10.9.9.2:9100', track_file: track}\n"
        "groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [80]\n"
        "    backends: [{name: a, address: 127.0.0.2}]\n"
    )
    l4lb = [sys.executable, "-m", "l4lb", "check", "-c", str(conf)]
    dropped = subprocess.run(
        [setpriv, "--bounding-set=-net_admin", *l4lb], capture_output=True, text=True, timeout=60
    )
    assert dropped.returncode == 0, dropped.stderr
    assert "ha: moving open connections (TCP_REPAIR)" in dropped.stderr
    assert "need CAP_NET_ADMIN" in dropped.stderr
    with_it = subprocess.run(l4lb, capture_output=True, text=True, timeout=60)
    assert with_it.returncode == 0 and "CAP_NET_ADMIN" not in with_it.stderr, with_it.stderr

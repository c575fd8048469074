"""QUIC-LB as a user starts with it (issue 33): `l4lb quic-lb key` writes the key, the example
HTTP/3 server of contrib/quic-lb issues connection IDs that carry its server ID under that key,
and real HTTP/3 requests through l4lb's `quic_lb` reach it from fresh networks."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from l4lb.core.quiclb import Codec
from tests.support.contrib import CONTRIB
from tests.support.h3_client import H3Client, get
from tests.support.helpers import free_ports
from tests.support.procs import ROOT, _started, l4lb_cli, processes, start_l4lb

TLS = ROOT / "l4lb" / "demo_tls"
SIDS = {"web1": "0a11", "web2": "0b22"}


def test_quic_lb_key_writes_a_key_file_only_its_owner_reads(tmp_path: Path) -> None:
    key = tmp_path / "quic.key"
    made = l4lb_cli("quic-lb", "key", str(key))
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 16
    again = l4lb_cli("quic-lb", "key", str(key))  # a key in use is never replaced by mistake
    assert again.returncode == 1 and "File exists (--force replaces it)" in again.stderr
    assert l4lb_cli("quic-lb", "key", "--force", str(key)).returncode == 0


@pytest.mark.asyncio
async def test_the_example_server_issues_ids_l4lb_routes_to_it(tmp_path: Path) -> None:
    key_file = tmp_path / "quic.key"
    assert l4lb_cli("quic-lb", "key", str(key_file)).returncode == 0
    key = bytes.fromhex(key_file.read_text().strip())
    codec = Codec(0, 2, 6, key)
    lb_port, *ports = free_ports(3)
    with processes() as procs:
        for (name, sid), port in zip(SIDS.items(), ports, strict=True):
            argv = [
                sys.executable, str(CONTRIB / "quic-lb" / "server.py"), "--name", name,
                "--listen", f"127.0.0.1:{port}", "--server-id", sid, "--nonce-length", "6",
                "--key-file", str(key_file), "--certificate", str(TLS / "cert.pem"),
                "--private-key", str(TLS / "key.pem"),
            ]  # fmt: skip
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220 (started before any await matters)
            procs.append(proc)
            _started(proc, "stdout", "ready", 1)
        # Straight to web2: every connection ID it gives the client names it, under the key.
        ids = await peer_ids(ports[1])
        assert len(ids) >= 2
        assert {codec.server_id(cid) for cid in ids} == {bytes.fromhex(SIDS["web2"])}
        backends = "\n".join(
            f"      - {{name: {name}, address: 127.0.0.1, server_id: '{sid}',"
            f" ports: {{'{lb_port}/udp': {port}}}}}"
            for (name, sid), port in zip(SIDS.items(), ports, strict=True)
        )
        cfg = tmp_path / "l4lb.yaml"
        cfg.write_text(
            "groups:\n  h3:\n    listen: [127.0.0.1]\n"
            f"    ports: ['{lb_port}/udp']\n    scheduler: rr\n"
            "    persistence: {timeout: 5m, netmask: /24}\n"
            f"    quic_lb: {{server_id_length: 2, nonce_length: 6, key_file: {key_file}}}\n"
            f"    backends:\n{backends}\n"
        )
        procs.append(start_l4lb(cfg))
        answers = [
            await asyncio.wait_for(
                get(f"https://localhost:{lb_port}/", f"127.0.{60 + i}.7", None), 10
            )
            for i in range(6)
        ]
    assert {status for status, _ in answers} == {200}
    assert {body.decode().strip() for _, body in answers} == set(SIDS)  # rr: both served


async def peer_ids(port: int) -> list[bytes]:
    """The connection IDs a server issued to a client that connected to it directly."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.verify_mode = ssl.CERT_NONE
    conn = QuicConnection(configuration=config)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: H3Client(conn), local_addr=("127.0.0.1", 0)
    )
    try:
        proto.connect(("127.0.0.1", port))
        await asyncio.wait_for(proto.wait_connected(), 10)
        await asyncio.wait_for(proto.get(f"localhost:{port}", "/"), 10)
        return [conn._peer_cid.cid] + [c.cid for c in conn._peer_cid_available]
    finally:
        proto.close()
        await proto.wait_closed()
        transport.close()

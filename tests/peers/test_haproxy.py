"""HAProxy as the PROXY protocol peer: l4lb sends it the client (send_proxy), and takes the
client from it (accept_proxy), each real client on one backend."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import free_ports
from tests.support.procs import ROOT, processes, start_backend, start_l4lb, wait_port

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
    (tmp_path / "token").write_text("a-token-of-the-haproxy-test")
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

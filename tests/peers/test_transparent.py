"""`source: client` (issue 25): backends see each client's own address, over TCP and UDP, in
three network namespaces this test makes, as a host would be set up (docs/deployment.md):

    client ns                 l4lb ns                          backend ns
    10.211.1.2, 10.211.4.2 -- 10.211.1.1 | 10.211.2.1 -- 10.211.2.2 (b1), 10.211.2.3 (b2)
                                         (rule: iif lbB lookup 100;   default via 10.211.2.1
                                          local 0.0.0.0/0 dev lo table 100)

An nginx answers `$server_addr $remote_addr` (its access log's peer), a UDP echo answers with
its own address and its peer's; each client network stays on one backend over both. Then the
way back is removed: l4lb says at start what is missing, the dials fail as `source` (counted,
the backends not blamed). Ports inside the namespaces are fixed: every one is free there."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.procs import (
    STARTUP,
    can_make_netns,
    output,
    processes,
    start_l4lb,
    stop,
    wait_for_line,
)

NGINX = shutil.which("nginx")
pytestmark = pytest.mark.skipif(
    not can_make_netns() or NGINX is None,
    reason="needs root, iproute2 and nginx (.ci/run installs them): namespaces of its own",
)
TAG = f"t{os.getpid() % 100000}"
NS = {side: f"l4lb{side}{TAG}" for side in ("c", "l", "b")}
CLIENTS = ("10.211.1.2", "10.211.4.2")  # two client networks (/24)
BACKENDS = {"b1": "10.211.2.2", "b2": "10.211.2.3"}
PORT, UDP_PORT, ADMIN = 8080, 5353, 9090


def ip(*argv: str, ns: str | None = None) -> None:
    prefix = ("ip", "netns", "exec", ns) if ns else ()
    subprocess.run([*prefix, "ip", *argv], check=True, capture_output=True, timeout=30)


def run_in(side: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", NS[side], *argv], capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def topology() -> Iterator[None]:
    for name in NS.values():
        ip("netns", "add", name)
    try:
        c, lb, b = NS["c"], NS["l"], NS["b"]
        ip("link", "add", f"c{TAG}", "type", "veth", "peer", "name", f"lA{TAG}")
        ip("link", "add", f"lB{TAG}", "type", "veth", "peer", "name", f"b{TAG}")
        ip("link", "set", f"c{TAG}", "netns", c)
        ip("link", "set", f"lA{TAG}", "netns", lb)
        ip("link", "set", f"lB{TAG}", "netns", lb)
        ip("link", "set", f"b{TAG}", "netns", b)
        for ns, dev, addrs in (
            (c, f"c{TAG}", ("10.211.1.2/24", "10.211.4.2/24")),
            (lb, f"lA{TAG}", ("10.211.1.1/24",)),
            (lb, f"lB{TAG}", ("10.211.2.1/24",)),
            (b, f"b{TAG}", ("10.211.2.2/24", "10.211.2.3/24")),
        ):
            for addr in addrs:
                ip("addr", "add", addr, "dev", dev, ns=ns)
            ip("link", "set", dev, "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
        ip("route", "add", "default", "via", "10.211.1.1", ns=c)
        ip("route", "add", "10.211.4.0/24", "via", "10.211.1.2", ns=lb)
        ip("route", "add", "default", "via", "10.211.2.1", ns=b)  # answers go through l4lb
        yield
    finally:
        for name in NS.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def way_back(on: bool) -> None:
    """The policy rule and local route that deliver the backends' answers to l4lb."""
    verb = "add" if on else "del"
    ip("rule", verb, "iif", f"lB{TAG}", "lookup", "100", ns=NS["l"])
    ip("route", verb, "local", "0.0.0.0/0", "dev", "lo", "table", "100", ns=NS["l"])


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))  # (its own address: answers come from the one that was asked)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(f"{sys.argv[2]} {peer[0]}:{peer[1]}".encode(), peer)
"""
UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(5)
s.sendto(b"who", (sys.argv[2], int(sys.argv[3])))
print(s.recv(999).decode(), s.getsockname()[1])
"""


def backends(tmp: Path, procs: list[subprocess.Popen[str]]) -> None:
    conf = tmp / "nginx.conf"
    servers = "\n".join(
        f'server {{ listen {a}:80; location / {{ return 200 "{n} $remote_addr\\n"; }} }}'
        for n, a in BACKENDS.items()
    )
    conf.write_text(
        f"worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;\n"
        f"events {{ worker_connections 64; }}\nhttp {{ access_log {tmp}/access.log;\n"
        f"{servers}\n}}\n"
    )
    procs.append(
        subprocess.Popen(
            ["ip", "netns", "exec", NS["b"], NGINX or "nginx", "-p", str(tmp), "-c", str(conf)],
            text=True,
        )
    )
    for name, addr in BACKENDS.items():
        echo = subprocess.Popen(
            ["ip", "netns", "exec", NS["b"], sys.executable, "-c", UDP_ECHO, addr, name],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(echo)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready", addr
    deadline = time.monotonic() + 10
    while run_in("b", "curl", "-s", f"http://{BACKENDS['b1']}/").returncode != 0:
        assert time.monotonic() < deadline, "nginx did not start"
        time.sleep(0.05)


def config(tmp: Path) -> Path:
    cfg = tmp / "l4lb.yaml"
    lines = [
        f"admin: {{listen: '127.0.0.1:{ADMIN}'}}",
        "groups:",
        "  shop:",
        "    listen: [10.211.1.1]",
        f"    ports: [{PORT}, '{UDP_PORT}/udp']",
        "    scheduler: rr",
        "    persistence: {timeout: 5m, netmask: /24}",
        "    connect_timeout: 1s",
        "    source: client",
        "    backends:",
    ]
    lines += [
        f"      - {{name: {n}, address: {a}, ports: {{{PORT}: 80, '{UDP_PORT}/udp': 53}}}}"
        for n, a in BACKENDS.items()
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def ask_tcp(client: str) -> str:
    out = run_in(
        "c", "curl", "-s", "--max-time", "3", "--interface", client, f"http://10.211.1.1:{PORT}/"
    )
    return out.stdout.strip()


def ask_udp(client: str) -> str:
    out = run_in("c", sys.executable, "-c", UDP_ASK, client, "10.211.1.1", str(UDP_PORT))
    return out.stdout.strip()


def metrics() -> str:
    return run_in("l", "curl", "-s", f"http://127.0.0.1:{ADMIN}/metrics").stdout


def test_backends_see_each_clients_own_address_and_persistence_holds(tmp_path: Path) -> None:
    with topology(), processes() as procs:
        backends(tmp_path, procs)
        way_back(True)
        lb = start_l4lb(config(tmp_path), prefix=("ip", "netns", "exec", NS["l"]))
        procs.append(lb)
        assert any("backends see each client's own address" in x for x in STARTUP[lb.pid])
        seen: dict[str, str] = {}
        for client in CLIENTS:
            for _ in range(2):
                name, peer = ask_tcp(client).split()
                assert peer == client  # nginx's $remote_addr: the client itself
                assert seen.setdefault(client, name) == name  # pinned
                udp_name, udp_peer, local_port = ask_udp(client).split()
                assert udp_peer == f"{client}:{local_port}"  # its own address and port
                assert udp_name == name  # one backend for the network, over both
        assert set(seen.values()) == {"b1", "b2"}  # rr: the two networks, two backends
        log = (tmp_path / "access.log").read_text()
        assert all(client in log for client in CLIENTS)  # the backend's own log says so
        assert stop(lb) == 0 and "Traceback" not in output(lb)


def test_without_the_way_back_l4lb_says_so_and_counts_the_dials_as_its_own(
    tmp_path: Path,
) -> None:
    with topology(), processes() as procs:
        backends(tmp_path, procs)
        lb = start_l4lb(config(tmp_path), prefix=("ip", "netns", "exec", NS["l"]))
        procs.append(lb)
        said = "\n".join(STARTUP[lb.pid])
        assert "cannot come back to l4lb: no policy rule" in said, said
        assert ask_tcp(CLIENTS[0]) == ""  # the dial's answer never arrives
        text = metrics()
        assert 'l4lb_connections_failed_total{group="shop",reason="source"} 1.0' in text
        assert 'l4lb_backend_state{backend="b1",group="shop",state="up"} 1.0' in text
        assert 'l4lb_backend_state{backend="b2",group="shop",state="up"} 1.0' in text
        assert stop(lb) == 0 and "Traceback" not in output(lb)


def test_a_reload_that_sets_source_client_says_what_the_host_lacks(tmp_path: Path) -> None:
    """The check runs at the reload that turns `source: client` on, not only at start."""
    with topology(), processes() as procs:
        backends(tmp_path, procs)
        cfg = config(tmp_path)
        cfg.write_text(cfg.read_text().replace("    source: client\n", ""))
        lb = start_l4lb(cfg, prefix=("ip", "netns", "exec", NS["l"]))
        procs.append(lb)
        name, peer = ask_tcp(CLIENTS[0]).split()
        assert peer == "10.211.2.1"  # l4lb's own address, before
        cfg.write_text(
            cfg.read_text().replace("    backends:\n", "    source: client\n    backends:\n")
        )
        lb.send_signal(signal.SIGHUP)
        wait_for_line(lb, "stderr", "cannot come back to l4lb: no policy rule", timeout=10)
        way_back(True)  # the host set up after the warning: the dials work from then on
        assert ask_tcp(CLIENTS[0]).split() == [name, CLIENTS[0]]  # its own address now
        assert stop(lb) == 0 and "Traceback" not in output(lb)


def test_a_way_back_lost_after_the_start_blames_no_backend(tmp_path: Path) -> None:
    """Issue 33: with the policy rule removed after start, connect timeouts marked every backend
    down, though deployment.md says such failures count as `source`, never as the backend's.
    A dial from the client's address that goes unanswered, to a backend that l4lb's own check
    (from l4lb's own address) finds up, is this host's failure: counted as source, and the
    backend stays up."""
    with topology(), processes() as procs:
        backends(tmp_path, procs)
        way_back(True)
        cfg = config(tmp_path)
        cfg.write_text(
            cfg.read_text().replace(
                "    backends:\n", "    health_check: {type: tcp, interval: 300ms}\n    backends:\n"
            )
        )
        lb = start_l4lb(cfg, prefix=("ip", "netns", "exec", NS["l"]))
        procs.append(lb)
        name, peer = ask_tcp(CLIENTS[0]).split()
        assert peer == CLIENTS[0]
        way_back(False)  # the rule removed while l4lb runs
        for _ in range(4):  # more than passive_failures (3) dials go unanswered
            assert ask_tcp(CLIENTS[0]) == ""
        text = metrics()
        assert 'l4lb_connections_failed_total{group="shop",reason="source"} 4.0' in text, text
        assert 'l4lb_backend_state{backend="b1",group="shop",state="up"} 1.0' in text
        assert 'l4lb_backend_state{backend="b2",group="shop",state="up"} 1.0' in text
        way_back(True)
        assert ask_tcp(CLIENTS[0]).split() == [name, CLIENTS[0]]
        assert stop(lb) == 0 and "Traceback" not in output(lb)
        assert "do not come back through this host" in output(lb)

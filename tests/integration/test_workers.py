"""`workers: N`: the steering program on real reuseport sockets, and a real supervisor with two
workers, real backend processes and curl as the clients."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from l4lb.core.reuseport import attach, program, steer
from tests.support.helpers import free_ports, saved_pins
from tests.support.procs import (
    ROOT,
    l4lb_cli,
    processes,
    start_backend,
    start_l4lb,
    wait_for_line,
    wait_port,
)

MASK24 = 0xFFFFFF00
TOKEN = "workers-test-token"


def reuseport_group(family: int, host: str, port: int, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            s.listen(64)
    except OSError:
        for s in socks:
            s.close()
        raise
    attach(socks[0], program(MASK24, 48, n))
    return socks


def accepted_by(socks: list[socket.socket], src: str, dst: str, port: int) -> int:
    """Connect from `src`; the index of the socket the kernel queued the connection on."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.bind((src, 0))
        c.connect((dst, port))
        ready, _, _ = select.select(socks, [], [], 5)
        assert ready, "no socket of the group got the connection"
        conn, _ = ready[0].accept()
        conn.close()
        return socks.index(ready[0])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("n", [2, 3])
def test_the_kernel_steers_as_steer_says_on_every_port(n: int) -> None:
    """IPv4 on an IPv4 socket and on a dual-stack one, and IPv6: a client's /24 (IPv6: /48)
    alone picks the socket, the same on both ports, and the Python twin agrees."""
    p1 = free_ports(1)[0]
    groups = [reuseport_group(socket.AF_INET, "127.0.0.1", p1, n)]
    dual = ipv6_loopback()
    host, family = ("::", socket.AF_INET6) if dual else ("127.0.0.1", socket.AF_INET)
    for attempt in range(5):  # a wildcard port is free only if no address uses it: retry
        p2 = free_ports(1, host)[0]
        try:
            groups.append(reuseport_group(family, host, p2, n))
            break
        except OSError:
            if attempt == 4:
                raise
    try:
        seen = defaultdict(set)
        for net in range(40):
            for host in (3, 200):
                src = f"127.0.{net}.{host}"
                want = steer(ipaddress.ip_address(src).packed, MASK24, 48, n)
                for socks, port in zip(groups, (p1, p2), strict=True):
                    assert accepted_by(socks, src, "127.0.0.1", port) == want, src
                seen[want].add(net)
        assert len(seen) == n, "every worker gets clients"
        if dual:
            want = steer(ipaddress.ip_address("::1").packed, MASK24, 48, n)
            assert accepted_by(groups[1], "::1", "::1", p2) == want
    finally:
        for socks in groups:
            for s in socks:
                s.close()


def admin_get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r) if "json" in r.headers["Content-Type"] else r.read().decode()


def admin_post(
    port: int, path: str, body: dict[str, Any], token: str = TOKEN
) -> tuple[int, str | None]:
    """(status, the backend's state in the answer)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)["state"]
    except urllib.error.HTTPError as exc:
        return exc.code, None


def curl(url: str, src: str) -> str:
    out = subprocess.run(
        ["curl", "-sk", "--max-time", "5", "--interface", src, url],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


NETS = range(30, 42)  # twelve clients' /24s: 127.0.30.0/24 ...


def visit(http: int, https: int) -> dict[int, set[str]]:
    """Two hosts of each /24, each over HTTP and HTTPS: the backends each /24 reached."""
    seen: dict[int, set[str]] = defaultdict(set)
    for net in NETS:
        for host in (11, 12):
            src = f"127.0.{net}.{host}"
            seen[net].add(curl(f"http://127.0.0.1:{http}/", src))
            seen[net].add(curl(f"https://127.0.0.1:{https}/", src))
    return seen


def write_config(tmp_path: Path, ports: list[int], bports: list[list[int]], aport: int) -> Path:
    backends = "\n".join(
        f"      - {{name: b{i}, address: 127.0.0.1, ports: {{{ports[0]}: {b[0]}, {ports[1]}: {b[1]}}}}}"
        for i, b in enumerate(bports)
    )
    cfg = tmp_path / "l4lb.yaml"
    (tmp_path / "token").write_text(TOKEN)
    cfg.write_text(
        f"""workers: 2
admin: {{listen: "127.0.0.1:{aport}", token_file: token}}
groups:
  web:
    listen: [127.0.0.1]
    ports: [{ports[0]}, {ports[1]}]
    scheduler: rr
    persistence: {{timeout: 5m, netmask: /24}}
    backends:
{backends}
"""
    )
    return cfg


def start_site(
    procs: list[subprocess.Popen[str]], cfg: Path, bports: list[list[int]]
) -> subprocess.Popen[str]:
    """HTTP+HTTPS backend processes b0, b1, ... and l4lb on `cfg`; returns l4lb."""
    for i, (h, s) in enumerate(bports):
        procs.append(start_backend(f"b{i}", http=f"127.0.0.1:{h}", https=f"127.0.0.1:{s}"))
    for h, s in bports:
        wait_port(h)
        wait_port(s)
    lb = start_l4lb(cfg)
    procs.append(lb)
    return lb


def test_two_workers_keep_a_subnet_on_one_backend_and_survive_a_crash(tmp_path: Path) -> None:
    http, https, aport, *bp = free_ports(9)
    bports = [bp[0:2], bp[2:4], bp[4:6]]
    cfg = write_config(tmp_path, [http, https], bports, aport)
    with processes() as procs:
        lb = start_site(procs, cfg, bports)

        seen = visit(http, https)
        for net, names in seen.items():
            assert len(names) == 1, f"127.0.{net}.0/24 reached {names}"
        assert len({n for names in seen.values() for n in names}) == 3

        # Each /24 is held by the worker the steering program names, and both workers work.
        entries = admin_get(aport, "/api/v1/affinity")["entries"]
        where = {e["client"]: e["worker"] for e in entries}
        for net in NETS:
            packed = ipaddress.ip_address(f"127.0.{net}.0").packed
            assert where[f"127.0.{net}.0/24"] == steer(packed, MASK24, 128, 2)
        assert set(where.values()) == {0, 1}
        metrics = admin_get(aport, "/metrics")
        assert 'l4lb_connections_accepted_total{group="web"} 48.0' in metrics
        assert "l4lb_workers 2.0" in metrics

        # Kill worker 0: it comes back on the same sockets; worker 1's clients do not move.
        workers = admin_get(aport, "/api/v1/workers")["workers"]
        os.kill(workers[0]["pid"], signal.SIGKILL)
        # A client of worker 0 connecting while it is dead waits in the accept queue: served.
        net0 = next(net for net in NETS if where[f"127.0.{net}.0/24"] == 0)
        assert curl(f"http://127.0.0.1:{http}/", f"127.0.{net0}.13").startswith("b")
        wait_for_line(lb, "stderr", "worker 0 ready")
        again = visit(http, https)
        for net in NETS:
            assert len(again[net]) == 1
            if where[f"127.0.{net}.0/24"] == 1:
                assert again[net] == seen[net], f"worker 1's client 127.0.{net}.0/24 moved"
        # The supervisor's API asks the new worker 0, not a connection to the dead one.
        assert "l4lb_workers 2.0" in admin_get(aport, "/metrics")
        assert admin_get(aport, "/api/v1/affinity")["total"] >= 12
        restarted = admin_get(aport, "/api/v1/workers")
        assert restarted["restarts"] == 1
        assert restarted["workers"][1]["pid"] == workers[1]["pid"]

        # SIGTERM reaches every worker; all exit, cleanly.
        pids = [w["pid"] for w in restarted["workers"]]
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(20) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_reload_reaches_every_worker(tmp_path: Path) -> None:
    """SIGHUP with a new port: the supervisor binds it for both workers, and each client's
    pin holds on it."""
    http, https, extra, aport, *bp = free_ports(8)
    bports = [bp[0:2], bp[2:4]]
    cfg = write_config(tmp_path, [http, https], bports, aport)
    with processes() as procs:
        lb = start_site(procs, cfg, bports)
        # A second l4lb on the same file must not join the first one's reuseport groups.
        second = l4lb_cli("run", "-c", str(cfg))
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{http}" in second.stderr
        assert "Address already in use" in second.stderr
        before = {net: curl(f"http://127.0.0.1:{http}/", f"127.0.{net}.5") for net in NETS}
        text = cfg.read_text().replace(
            f"ports: [{http}, {https}]", f"ports: [{http}, {https}, {extra}]"
        )
        text = text.replace(
            f"{http}: {bports[0][0]},", f"{http}: {bports[0][0]}, {extra}: {bports[0][0]},"
        )
        text = text.replace(
            f"{http}: {bports[1][0]},", f"{http}: {bports[1][0]}, {extra}: {bports[1][0]},"
        )
        cfg.write_text(text.replace("workers: 2", "workers: 3"))
        lb.send_signal(signal.SIGHUP)
        reloaded = wait_for_line(lb, "stderr", "l4lb.supervisor: reloaded")[-1]
        assert "workers 2 -> 3: takes effect at the next upgrade or restart" in reloaded
        assert admin_get(aport, "/metrics").count("l4lb_workers 2.0") == 1
        for net in NETS:
            assert curl(f"http://127.0.0.1:{extra}/", f"127.0.{net}.6") == before[net]
        groups = admin_get(aport, "/api/v1/groups")["groups"]
        assert groups[0]["ports"] == [http, https, extra]

        # A change through the supervisor's API reaches both workers: with b0 drained, new
        # clients (on either worker) all go to b1; a change without the token is refused.
        assert admin_post(aport, "/api/v1/backends/web/b0", {"state": "drain"}) == (200, "drain")
        assert admin_post(aport, "/api/v1/backends/web/b0", {"state": "up"}, token="") == (
            401,
            None,
        )
        fresh = {curl(f"http://127.0.0.1:{http}/", f"127.0.{net}.9") for net in range(60, 72)}
        assert fresh == {"b1"}
        metrics = admin_get(aport, "/metrics")
        assert 'l4lb_admin_requests_refused_total{reason="unauthorized"} 1.0' in metrics
        # each worker's own process metrics, labelled (issue 33: they were summed, unlabelled)
        for i in (0, 1):
            assert f'process_resident_memory_bytes{{worker="{i}"}}' in metrics
        assert "\nprocess_resident_memory_bytes " not in metrics
        assert 'l4lb_reloads_total{result="ok"} 1.0' in metrics


def test_the_kernel_steers_ipv6_clients_by_their_prefix() -> None:
    """Forty IPv6 /48s, two hosts in other /64s of each, in a namespace of the test's own (as
    root; CI runs as root): each /48 reaches the socket `steer` names, and all sockets work."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip to add IPv6 addresses in a network namespace")
    name = f"l4lbsteer{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        ns = ["ip", "netns", "exec", name]
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        batch = "".join(
            f"addr add fd00:0:{p:x}::1/128 dev lo nodad\n"
            f"addr add fd00:0:{p:x}:1::2/128 dev lo nodad\n"
            for p in range(40)
        )
        subprocess.run([*ns, "ip", "-batch", "-"], input=batch, text=True, check=True, timeout=30)
        out = subprocess.run(
            [*ns, sys.executable, "-m", "tests.support.steer_probe", "40"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        result = json.loads(out.stdout)
        for n in ("2", "3"):
            assert result[n]["wrong"] == 0, result
            assert all(c > 0 for c in result[n]["counts"]), result
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=30)


def saved_keys(path: Path) -> set[int]:
    return {key for pins in saved_pins(path).values() for key in pins}


def test_pins_survive_a_move_to_workers_and_a_worker_crash(tmp_path: Path) -> None:
    """A single process saves its pins; two workers started on its state file each take the
    pins of their own clients; a crashed worker's successor reloads its own file."""
    http, https, aport, *bp = free_ports(9)
    bports = [bp[0:2], bp[2:4], bp[4:6]]
    cfg = write_config(tmp_path, [http, https], bports, aport)
    text = cfg.read_text() + "state_file: pins.json\nstate_interval: 200ms\n"
    cfg.write_text(text.replace("workers: 2", "workers: 1"))
    with processes() as procs:
        lb = start_site(procs, cfg, bports)
        first = visit(http, https)
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(20) == 0

        cfg.write_text(text)
        procs.append(lb := start_l4lb(cfg))
        assert visit(http, https) == first  # each worker found its clients in pins.json

        # Each worker saves its own file; once worker 0's holds its clients, kill it.
        mine = {
            int.from_bytes(ipaddress.ip_address(f"127.0.{net}.0").packed, "big")
            for net in NETS
            if steer(ipaddress.ip_address(f"127.0.{net}.0").packed, MASK24, 128, 2) == 0
        }
        deadline = time.monotonic() + 10
        while not mine <= saved_keys(tmp_path / "pins.json.0"):
            assert time.monotonic() < deadline, "worker 0 did not save its pins"
            time.sleep(0.05)
        os.kill(admin_get(aport, "/api/v1/workers")["workers"][0]["pid"], signal.SIGKILL)
        wait_for_line(lb, "stderr", "worker 0 ready")
        assert visit(http, https) == first


def test_one_worker_checks_and_every_worker_follows(tmp_path: Path) -> None:
    """Worker 0 alone probes (the exec check records who ran it); its verdicts reach worker 1,
    also when worker 1 is started again while a backend is down."""
    http, https, aport, *bp = free_ports(7)
    bports = [bp[0:2], bp[2:4]]
    cfg = write_config(tmp_path, [http, https], bports, aport)
    probe = f'echo $PPID >> {tmp_path}/probes; test ! -e {tmp_path}/sick-"$L4LB_BACKEND_NAME"'
    check = (
        f"    health_check: {{type: exec, command: [sh, -c, '{probe}'], interval: 100ms,"
        " timeout: 2s, rise: 1, fall: 1}\n"
    )
    cfg.write_text(cfg.read_text().replace("    backends:\n", check + "    backends:\n"))

    def new_clients(first: int) -> set[str]:
        return {curl(f"http://127.0.0.1:{http}/", f"127.0.{n}.1") for n in range(first, first + 12)}

    with processes() as procs:
        lb = start_site(procs, cfg, bports)
        pids = [w["pid"] for w in admin_get(aport, "/api/v1/workers")["workers"]]
        deadline = time.monotonic() + 10
        while len((tmp_path / "probes").read_text().split()) < 10:
            assert time.monotonic() < deadline, "no health checks ran"
            time.sleep(0.05)
        assert set(map(int, (tmp_path / "probes").read_text().split())) == {pids[0]}

        (tmp_path / "sick-b0").touch()
        wait_for_line(lb, "stderr", "[worker 1] l4lb.health: group web: backend b0 up -> down")
        assert new_clients(100) == {"b1"}

        os.kill(pids[1], signal.SIGKILL)  # started again, it must learn that b0 is down
        wait_for_line(lb, "stderr", "worker 1 ready")
        assert new_clients(120) == {"b1"}

        (tmp_path / "sick-b0").unlink()
        wait_for_line(lb, "stderr", "[worker 1] l4lb.health: group web: backend b0 down -> up")
        assert new_clients(140) == {"b0", "b1"}
        assert set(map(int, (tmp_path / "probes").read_text().split())) == {pids[0]}


def reload_via_api(port: int) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/reload",
        data=b"{}",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_a_stopped_worker_is_replaced_and_reloads_say_what_happened(tmp_path: Path) -> None:
    """SIGSTOP one of two workers: it answers no ping, so it is killed and replaced on the same
    sockets within five seconds, after which every client network is served; a reload while a
    worker is stopped is an error that says which worker applied it, and the next reload is
    answered with its own replies, never a late one of the last."""
    http, https, aport, *bp = free_ports(7)
    bports = [bp[0:2], bp[2:4]]
    cfg = write_config(tmp_path, [http, https], bports, aport)
    with processes() as procs:
        lb = start_site(procs, cfg, bports)
        workers = admin_get(aport, "/api/v1/workers")["workers"]
        stopped = workers[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            # A reload meanwhile: worker 0 applies it, worker 1 cannot: an error, said so.
            cfg.write_text(cfg.read_text().replace("scheduler: rr", "scheduler: wlc"))
            status, answer = reload_via_api(aport)
            assert status == 503 and answer["ok"] is False, answer
            lines = " | ".join(answer["lines"])
            assert "worker 1 ended during the reload" in lines or "worker 1 did not answer" in lines
            assert "scheduler rr -> wlc" in lines  # what worker 0 applied
            wait_for_line(lb, "stderr", "worker 1 (pid")  # answered no ping: killed
            wait_for_line(lb, "stderr", "worker 1 ready")
            replaced = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)  # (killed by then; never left stopped)
        assert replaced < 5 + 3, replaced  # (3 s of it spent in the reload's own wait)
        served = {
            net: curl(f"http://127.0.0.1:{http}/", f"127.0.{net}.1") for net in range(60, 100)
        }
        assert len(served) == 40 and set(served.values()) <= {"b0", "b1"}
        info = admin_get(aport, "/api/v1/workers")
        assert (
            info["workers"][1]["pid"] != stopped and info["workers"][0]["pid"] == workers[0]["pid"]
        )
        metrics = admin_get(aport, "/metrics")
        assert 'l4lb_worker_restarts_total{reason="unresponsive"} 1.0' in metrics
        # The next reload is answered by both workers, with its own change.
        cfg.write_text(cfg.read_text().replace("scheduler: wlc", "scheduler: lc"))
        status, answer = reload_via_api(aport)
        assert status == 200 and answer["ok"] is True, answer
        assert any("scheduler wlc -> lc" in c for c in answer["changes"]), answer

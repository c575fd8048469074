"""Operations: metrics, the admin API, reload, pins across restarts, the status page in Chromium,
and `l4lb ctl`, with real balancer processes where the point is a process's life."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from l4lb.config import load_config_text
from l4lb.runtime.errors import ReloadError
from tests.support.cdp import FLAGS as CHROMIUM_FLAGS
from tests.support.helpers import config_of, free_ports, greet, group_yaml, hello, running
from tests.support.procs import ROOT, STARTUP, processes, start_backend, start_l4lb, wait_for_line

TOKEN = "t0ken-for-the-ops-tests"


def admin_top(tmp_path: Path, port: int, token: bool = True) -> str:
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    return f"admin: {{listen: '127.0.0.1:{port}'{f', token_file: {tf}' if token else ''}}}\n"


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = line[len(name) :].split(" ")[0].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


async def test_metrics_appear_and_move(backends, tmp_path: Path) -> None:
    port, aport = free_ports(2)
    bs = await backends(2, [port])
    cfg = config_of(
        group_yaml(
            "web",
            [port],
            [b.yaml() for b in bs],
            extra="health_check: {type: tcp, interval: 100ms}",
        ),
        top=admin_top(tmp_path, aport),
    )
    async with running(cfg), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{aport}/metrics"
        before = await (await http.get(url)).text()
        assert metric(before, "l4lb_connections_accepted_total", group="web") == 0
        for i in range(1, 6):
            await hello(port, f"127.0.20.{i}")
        name, r, w = await greet(port, "127.0.20.1")
        w.write(b"x" * 1000)
        await r.readexactly(1000)
        after = await (await http.get(url)).text()
        assert metric(after, "l4lb_connections_accepted_total", group="web") == 6
        assert metric(after, "l4lb_affinity_entries", group="web", state="active") == 1
        assert metric(after, "l4lb_affinity_entries", group="web", state="idle") == 4
        assert metric(after, "l4lb_affinity_lookups_total", group="web", result="hit") == 1
        assert metric(after, "l4lb_affinity_lookups_total", group="web", result="miss") == 5
        assert metric(after, "l4lb_connections_active", group="web", backend=name) == 1
        assert (
            metric(after, "l4lb_bytes_total", group="web", backend=name, direction="in") == 1000
        )  # live
        assert metric(after, "l4lb_backend_state", group="web", backend=name, state="up") == 1
        assert metric(after, "l4lb_connect_duration_seconds_count", group="web") == 6
        assert (
            metric(after, "l4lb_health_checks_total", group="web", backend=name, result="pass") >= 0
        )
        for family in (
            "process_resident_memory_bytes",
            "l4lb_reloads_total",
            "l4lb_affinity_repins_total",
            "l4lb_affinity_evictions_total",
            "l4lb_affinity_expirations_total",
            "l4lb_affinity_unpinned_total",
            "l4lb_connections_failed_total",
            "l4lb_backend_weight",
            "l4lb_health_check_duration_seconds",
            "l4lb_sorry_connections_total",
        ):
            assert family in after
        w.close()


async def test_admin_api_reads_changes_and_refusals(backends, tmp_path: Path) -> None:
    port, aport = free_ports(2)
    bs = await backends(3, [port])
    cfg_path = tmp_path / "l4lb.yaml"
    cfg_text = (
        "groups:\n"
        + group_yaml("web", [port], [b.yaml() for b in bs], netmask="/24")
        + "\n"
        + admin_top(tmp_path, aport)
    )
    cfg_path.write_text(cfg_text)
    cfg = load_config_text(cfg_text, str(cfg_path))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        running(cfg) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{aport}") as http,
    ):
        pins = {f"127.0.{n}.9": await hello(port, f"127.0.{n}.9") for n in range(30, 36)}
        assert (await http.get("/healthz")).status == 200
        assert (await http.get("/readyz")).status == 200
        groups = await (await http.get("/api/v1/groups")).json()
        assert (
            groups["groups"][0]["name"] == "web"
            and groups["groups"][0]["persistence"]["entries"] == 6
        )
        listing = await (await http.get("/api/v1/affinity")).json()
        assert listing["total"] == 6
        e = next(x for x in listing["entries"] if x["client"] == "127.0.30.0/24")
        assert e == {
            "group": "web",
            "client": "127.0.30.0/24",
            "backend": pins["127.0.30.9"],
            "connections": 0,
            "flows": 0,
            "expires_in": e["expires_in"],
            "pinned_for": e["pinned_for"],
            "last_repin": None,
        }
        assert 59 < e["expires_in"] <= 60 and 0 <= e["pinned_for"] < 5
        by_prefix = await (
            await http.get("/api/v1/affinity", params={"client": "127.0.32.0/23"})
        ).json()
        assert {x["client"] for x in by_prefix["entries"]} == {"127.0.32.0/24", "127.0.33.0/24"}
        victim = pins["127.0.30.9"]
        by_backend = await (await http.get("/api/v1/affinity", params={"backend": victim})).json()
        assert (
            all(x["backend"] == victim for x in by_backend["entries"]) and by_backend["total"] >= 1
        )

        # Refusals change nothing.
        assert (await http.delete("/api/v1/affinity")).status == 401
        assert (
            await http.delete("/api/v1/affinity", headers={"Authorization": "Bearer nope"})
        ).status == 401
        bad = await http.post("/api/v1/backends/web/b0", data="{not json", headers=auth)
        assert bad.status == 400 and "not valid JSON" in (await bad.json())["error"]
        assert (
            await http.post("/api/v1/backends/web/b0", json={"state": "down"}, headers=auth)
        ).status == 400
        assert (
            await http.post("/api/v1/backends/web/b0", json={"weight": -2}, headers=auth)
        ).status == 400
        assert (
            await http.post("/api/v1/backends/web/b0", json={"colour": "red"}, headers=auth)
        ).status == 400
        assert (
            await http.post("/api/v1/backends/web/nobody", json={"state": "drain"}, headers=auth)
        ).status == 404
        assert (
            await http.post("/api/v1/backends/nogroup/b0", json={"state": "drain"}, headers=auth)
        ).status == 404
        assert (await http.get("/api/v1/affinity", params={"client": "not-an-ip"})).status == 400
        assert all(b.state.value == "up" and b.weight == 1 for b in server.routers["web"].backends)
        assert (await (await http.get("/api/v1/affinity")).json())["total"] == 6
        assert server.admin_refused == {"unauthorized": 2, "bad_request": 5, "not_found": 2}

        # Changes, with the token.
        r = await http.post(
            f"/api/v1/backends/web/{victim}", json={"state": "drain", "weight": 3}, headers=auth
        )
        assert (
            r.status == 200
            and (await r.json())["state"] == "drain"
            and (await r.json())["weight"] == 3
        )
        assert await hello(port, "127.0.30.9") == victim  # drained: pinned clients still come
        flushed = await (
            await http.delete("/api/v1/affinity", params={"client": "127.0.31.0/24"}, headers=auth)
        ).json()
        assert flushed == {"deleted": 1}
        flushed = await (
            await http.delete("/api/v1/affinity", params={"backend": victim}, headers=auth)
        ).json()
        assert flushed["deleted"] >= 1
        assert await hello(port, "127.0.30.9") != victim  # unpinned, and drained: a new backend
        everything = await (await http.delete("/api/v1/affinity", headers=auth)).json()
        assert everything["deleted"] >= 4
        assert (await (await http.get("/api/v1/affinity")).json())["total"] == 0
        events = await (await http.get("/api/v1/events")).json()
        assert [e["new"] for e in events["events"][-2:]] == ["drain", "weight 3"]
        assert (await http.get("/")).status == 200

        # Reload through the API: a bad file is refused and nothing changes.
        cfg_path.write_text(cfg_text.replace("scheduler: rr", "scheduler: nope"))
        r = await http.post("/api/v1/reload", headers=auth)
        assert r.status == 400 and "groups.web.scheduler" in (await r.json())["error"]
        assert server.routers["web"].spec.scheduler == "rr" and server.reloads_failed == 1
        cfg_path.write_text(cfg_text.replace("scheduler: rr", "scheduler: wlc"))
        r = await http.post("/api/v1/reload", headers=auth)
        assert r.status == 200 and server.routers["web"].spec.scheduler == "wlc"
        assert (
            server.routers["web"].by_name[victim].state.value == "drain"
        )  # the operator's word stays


async def test_changes_are_refused_without_a_token_file(backends, tmp_path: Path) -> None:
    port, aport = free_ports(2)
    (b,) = await backends(1, [port])
    cfg = config_of(
        group_yaml("web", [port], [b.yaml()]), top=admin_top(tmp_path, aport, token=False)
    )
    async with running(cfg), aiohttp.ClientSession() as http:
        r = await http.post(
            f"http://127.0.0.1:{aport}/api/v1/reload", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert r.status == 403 and "token_file" in (await r.json())["error"]


async def test_reload_in_process_keeps_pins_open_connections_and_listeners(backends) -> None:
    p1, p2, p3 = free_ports(3)
    bs = await backends(3, [p1, p2, p3])
    first = config_of(group_yaml("web", [p1, p2], [b.yaml(only=[p1, p2]) for b in bs]))
    async with running(first) as server:
        pins = {f"127.0.40.{i}": await hello(p1, f"127.0.40.{i}") for i in range(1, 10)}
        _, r, w = await greet(p2, "127.0.40.1")
        # Second config: one backend removed, a port added, another kept.
        removed = bs[2].name
        second = config_of(group_yaml("web", [p1, p3], [b.yaml(only=[p1, p3]) for b in bs[:2]]))
        changes = await server.apply(second)
        assert f"group web: backend {removed} removed" in changes
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"  # the open connection survived
        after = {}
        for src, was in pins.items():
            after[src] = await hello(p1, src)
            assert after[src] == was if was != removed else after[src] != removed
        assert await hello(p3, "127.0.40.1") == after["127.0.40.1"]  # the new port shares the pin
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", p2)  # the dropped port stopped accepting
        w.close()
        # A reload that cannot bind changes nothing.
        import socket

        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            only_p1 = bs[0].yaml(only=[p1])
            mapped = only_p1.replace("}}", f", {taken}: {bs[0].ports[p1]}}}}}")
            bad = config_of(group_yaml("web", [p1, taken], [mapped]))
            with pytest.raises(ReloadError):
                await server.apply(bad)
        assert [b.name for b in server.routers["web"].backends] == [bs[0].name, bs[1].name]
        assert await hello(p3, "127.0.40.2") == after["127.0.40.2"]


# ------------------------------------------------------------------ real processes


class Site:
    """l4lb as a process on two ports, with three echo backend processes."""

    def __init__(self, tmp: Path, extra_top: str = "") -> None:
        self.tmp = tmp
        ports = free_ports(5)
        self.p1, self.p2, self.admin = ports[:3]
        self.echo = {f"web{i}": p for i, p in enumerate(free_ports(3), 1)}
        (tmp / "token").write_text(TOKEN)
        self.config = tmp / "l4lb.yaml"
        self.top = (
            f"admin: {{listen: '127.0.0.1:{self.admin}', token_file: token}}\n"
            "state_file: pins.json\nshutdown_timeout: 5s\n" + extra_top
        )
        self.write()

    def write(self, weights: dict[str, int] | None = None, scheduler: str = "rr") -> None:
        weights = weights or {}
        lines = [
            f"      - {{name: {n}, address: 127.0.0.1, weight: {weights.get(n, 1)}, ports: {{{self.p1}: {p}, {self.p2}: {p}}}}}"
            for n, p in self.echo.items()
        ]
        self.config.write_text(
            self.top + "groups:\n  web:\n    listen: [127.0.0.1]\n"
            f"    ports: [{self.p1}, {self.p2}]\n    scheduler: {scheduler}\n"
            "    persistence: {timeout: 10m}\n    backends:\n" + "\n".join(lines) + "\n"
        )

    def start_backends(self, procs: list[subprocess.Popen[str]]) -> None:
        for n, p in self.echo.items():
            procs.append(start_backend(n, echo=f"127.0.0.1:{p}"))

    def start(self, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
        lb = start_l4lb(self.config)
        procs.append(lb)
        return lb

    def pin(self, net: str, n: int) -> list[str]:
        """n clients (net.1 to net.n) make one connection each, and so get pinned."""
        clients = [f"{net}.{i}" for i in range(1, n + 1)]
        for c in clients:
            who(self.p1, c)
        return clients


def who(port: int, src: str, payload: bytes = b"hello") -> bool:
    """One connection from `src`: send, read the echo back whole, close."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data == payload, f"broken stream from {src}: {len(data)} of {len(payload)} bytes"
    return True


def ctl(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "ctl", "-c", str(site.config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def pinned(site: Site) -> dict[str, str]:
    r = ctl(site, "--json", "affinity", "list", "--limit", "100000")
    assert r.returncode == 0, r.stderr
    return {e["client"]: e["backend"] for e in json.loads(r.stdout)["entries"]}


def test_twenty_reloads_under_load_lose_no_connection_and_no_pin(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with processes() as procs:
        site.start_backends(procs)
        lb = site.start(procs)
        clients = site.pin("127.0.50", 40)
        before = pinned(site)
        assert len(before) == 40
        stop = threading.Event()
        failures: list[str] = []
        done = Counter()
        progress = threading.Condition()

        def load(port: int) -> None:
            i = 0
            while not stop.is_set() and i < 100_000:
                src = clients[i % len(clients)]
                try:
                    who(port, src, os.urandom(2048))
                    with progress:
                        done[port] += 1
                        progress.notify_all()
                except (OSError, AssertionError) as exc:
                    failures.append(f"{src}:{port}: {exc}")
                i += 1

        threads = [
            threading.Thread(target=load, args=(p,)) for p in (site.p1, site.p2) for _ in range(2)
        ]
        for t in threads:
            t.start()
        try:
            for n in range(20):
                site.write(weights={"web1": 1 + n % 3}, scheduler=("rr", "wlc")[n % 2])
                lb.send_signal(signal.SIGHUP)
                wait_for_line(lb, "stderr", "reloaded")
            with progress:  # the work completes (however fast this machine does it)
                both = progress.wait_for(lambda: min(done[site.p1], done[site.p2]) >= 20, 120)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert both, done
        assert pinned(site) == before
        metrics = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{site.admin}/metrics"], capture_output=True, text=True
        ).stdout
        assert 'l4lb_reloads_total{result="ok"} 20.0' in metrics
        # A bad file is refused and changes nothing.
        site.config.write_text(
            site.config.read_text()
            .replace("scheduler: rr", "scheduler: nope")
            .replace("scheduler: wlc", "scheduler: nope")
        )
        lb.send_signal(signal.SIGHUP)
        wait_for_line(lb, "stderr", "reload refused")
        assert pinned(site) == before and who(site.p1, clients[0])


def test_restart_with_a_state_file_keeps_every_client_on_its_backend(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with processes() as procs:
        site.start_backends(procs)
        lb = site.start(procs)
        clients = site.pin("127.0.60", 50)
        before = pinned(site)
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(10) == 0
        assert (tmp_path / "pins.json").exists()
        lb2 = site.start(procs)
        assert any("restored 50 pins, dropped 0" in line for line in STARTUP[lb2.pid])
        assert pinned(site) == before
        # And connections follow them: the scheduler did not run for these clients.
        r = ctl(site, "--json", "status")
        assert json.loads(r.stdout)["groups"][0]["stats"]["accepted"] == 0
        for c in clients[:10]:
            who(site.p2, c)
        assert pinned(site) == before


def test_sigterm_under_load_lets_open_connections_finish(tmp_path: Path) -> None:
    import socket

    site = Site(tmp_path)
    with processes() as procs:
        site.start_backends(procs)
        lb = site.start(procs)
        s = socket.create_connection(("127.0.0.1", site.p1), timeout=10)
        s.sendall(b"first half;")
        assert s.recv(100) == b"first half;"
        lb.send_signal(signal.SIGTERM)
        wait_for_line(lb, "stderr", "stopped accepting")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", site.p1), timeout=2).close()
        s.sendall(b"second half")  # still relayed during the grace period
        assert s.recv(100) == b"second half"
        s.close()
        assert lb.wait(10) == 0


def test_ctl_and_the_status_page_show_a_drain(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    site = Site(tmp_path)
    with processes() as procs:
        site.start_backends(procs)
        site.start(procs)
        site.pin("127.0.70", 6)
        listing = ctl(site, "affinity", "list")
        assert listing.returncode == 0
        lines = listing.stdout.splitlines()
        assert lines[0].split() == ["GROUP", "CLIENT", "BACKEND", "CONNS", "FLOWS", "EXPIRES", "IN"]
        assert len(lines) == 7 and all(line.split()[5].endswith("s") for line in lines[1:])
        r = ctl(site, "backend", "drain", "web", "web2")
        assert r.returncode == 0 and "state drain" in r.stdout
        status = ctl(site, "status").stdout
        assert any(  # its address with the port of each service port, and its state
            line.split()[:2] == ["web", "web2"]
            and re.search(r" 127\.0\.0\.1:\d+ \(\d+\), 127\.0\.0\.1:\d+ \(\d+\) +drain ", line)
            for line in status.splitlines()
        ), status
        metrics = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{site.admin}/metrics"], capture_output=True, text=True
        ).stdout
        assert 'l4lb_backend_state{backend="web2",group="web",state="drain"} 1.0' in metrics
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "l4lb",
                "ctl",
                "--admin",
                f"http://127.0.0.1:{site.admin}",
                "backend",
                "drain",
                "web",
                "web1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert bad.returncode == 1 and "401" in bad.stderr
        assert ctl(site, "affinity", "flush", "--backend", "web1").returncode == 0
        if chromium is None:
            pytest.skip(
                "chromium is not installed (.ci/run installs it): the status page was not rendered"
            )
        shot = tmp_path / "status.png"
        flags = [
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
        ]
        url = f"http://127.0.0.1:{site.admin}/"
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
        ).stdout
        assert '<span class="state drain">drain</span>' in dom  # rendered from the live API
        assert "web1" in dom and "web3" in dom and "operator via the admin API" in dom
        subprocess.run(
            [chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=60
        )
        assert shot.exists() and shot.stat().st_size > 10_000

"""End to end, as a user would: l4lb as a process, real HTTP/HTTPS backend processes, curl as the
client from many source addresses, SIGTERM to stop."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.helpers import free_ports
from tests.support.procs import (
    can_make_netns,
    private_netns,
    processes,
    start_backend,
    start_l4lb,
    stop,
    wait_for_line,
)

pytestmark = pytest.mark.e2e
if shutil.which("curl") is None:
    pytest.skip("curl is not installed (.ci/run installs it)", allow_module_level=True)

NAMES = ("web1", "web2", "web3")


class Site:
    def __init__(self, tmp: Path, short_timeout: str = "1s") -> None:
        ports = free_ports(4 + 3 * 3)
        self.http, self.https, self.short, self.bulk = ports[:4]
        self.backend_ports = {n: ports[4 + 3 * i : 7 + 3 * i] for i, n in enumerate(NAMES)}
        backends = []
        short_backends = []
        bulk_backends = []
        for n, (h, s, e) in self.backend_ports.items():
            backends.append(
                f"      - {{name: {n}, address: 127.0.0.1, ports: {{{self.http}: {h}, {self.https}: {s}}}}}"
            )
            short_backends.append(
                f"      - {{name: {n}, address: 127.0.0.1, ports: {{{self.short}: {h}}}}}"
            )
            bulk_backends.append(
                f"      - {{name: {n}, address: 127.0.0.1, ports: {{{self.bulk}: {e}}}}}"
            )
        self.config = tmp / "l4lb.yaml"
        self.config.write_text(
            "groups:\n"
            "  web:\n"
            f"    listen: [127.0.0.1]\n    ports: [{self.http}, {self.https}]\n    scheduler: wlc\n"
            "    persistence: {timeout: 10m, netmask: /24}\n    backends:\n"
            + "\n".join(backends)
            + "\n"
            "  short:\n"
            f"    listen: [127.0.0.1]\n    ports: [{self.short}]\n    scheduler: rr\n"
            f"    persistence: {{timeout: {short_timeout}}}\n    backends:\n"
            + "\n".join(short_backends)
            + "\n"
            "  bulk:\n"
            f"    listen: [127.0.0.1]\n    ports: [{self.bulk}]\n    backends:\n"
            + "\n".join(bulk_backends)
            + "\n"
        )

    def start(self, procs: list[subprocess.Popen[str]]) -> None:
        self.backends = {}
        for n, (h, s, e) in self.backend_ports.items():
            p = start_backend(
                n, http=f"127.0.0.1:{h}", https=f"127.0.0.1:{s}", echo=f"127.0.0.1:{e}"
            )
            procs.append(p)
            self.backends[n] = p
        self.lb = start_l4lb(self.config, groups=3)
        procs.append(self.lb)

    def curl(self, src: str, *urls: str) -> list[str]:
        r = subprocess.run(
            ["curl", "-sSk", "--interface", src, "--max-time", "10", *urls],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, f"curl from {src} failed ({r.returncode}): {r.stderr}"
        return r.stdout.split()

    def both(self, src: str, rounds: int = 2) -> list[str]:
        urls = [f"http://127.0.0.1:{self.http}/", f"https://127.0.0.1:{self.https}/"] * rounds
        return self.curl(src, *urls)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("e2e"))
    with processes() as procs:
        s.start(procs)
        yield s


def test_200_clients_alternating_http_and_https_each_stay_on_one_backend(site: Site) -> None:
    sources = [f"127.1.{n}.7" for n in range(200)]  # 200 clients, each its own /24
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(sources, pool.map(site.both, sources), strict=True))
    for src, names in answers.items():
        assert len(names) == 4 and len(set(names)) == 1, (src, names)
    spread = Counter(names[0] for names in answers.values())
    assert set(spread) == set(NAMES) and min(spread.values()) >= 40, spread


def test_a_slash_24_is_one_client(site: Site) -> None:
    sources = [f"127.2.9.{i}" for i in range(1, 31)]
    with ThreadPoolExecutor(8) as pool:
        names = {n for answer in pool.map(site.both, sources) for n in answer}
    assert len(names) == 1


def test_an_idle_client_is_rescheduled_after_the_timeout(site: Site) -> None:
    url = f"http://127.0.0.1:{site.short}/"
    (first,) = site.curl("127.3.0.1", url)
    assert site.curl("127.3.0.1", url, url) == [first, first]
    time.sleep(1.3)  # the pin's 1 s timeout passing is the event under test
    (after,) = site.curl("127.3.0.1", url)
    assert after != first  # rr moved on: the client was scheduled afresh


def test_64_mib_each_way_arrive_intact(site: Site) -> None:
    payload = os.urandom(64 * 1024 * 1024)
    want = hashlib.sha256(payload).hexdigest()
    with socket.create_connection(("127.0.0.1", site.bulk), timeout=30) as s:

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        h = hashlib.sha256()
        n = 0
        while chunk := s.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
        t.join()
    assert n == len(payload) and h.hexdigest() == want


def test_killing_a_pinned_backend_costs_no_failed_connection(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with processes() as procs:
        site.start(procs)
        clients = [f"127.4.{n}.1" for n in range(30)]
        before = {c: site.both(c, rounds=1)[0] for c in clients}
        victim = Counter(before.values()).most_common(1)[0][0]
        proc = site.backends[victim]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after = {c: site.both(c) for c in clients}  # curl asserts every connection succeeds
        for c in clients:
            names = set(after[c])
            assert len(names) == 1, (c, after[c])
            if before[c] == victim:
                assert names != {victim}
            else:
                assert names == {before[c]}  # clients of the others did not move


def test_sigterm_stops_promptly_and_cleanly(tmp_path: Path) -> None:
    site = Site(tmp_path)
    with processes() as procs:
        site.start(procs)
        assert site.both("127.5.0.1", rounds=1)
        t0 = time.monotonic()
        site.lb.send_signal(signal.SIGTERM)
        assert site.lb.wait(10) == 0
        assert time.monotonic() - t0 < 5
        wait_for_line(site.lb, "stderr", "stopped", timeout=1)
        r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{site.http}/"], capture_output=True)
        assert r.returncode == 7  # connection refused: no longer listening


@pytest.mark.skipif(
    not can_make_netns(),
    reason="needs root and iproute2: the demo's ports, in a namespace of its own",
)
def test_make_run_serves_the_demo() -> None:
    """What `make run` runs: the embedded default config with its demo backends, on its own
    ports (8080, 8443, 8053/udp), in a network namespace of the test's own, so that a busy host
    (its own `make run`, say) is no matter."""
    root = Path(__file__).resolve().parents[2]
    with private_netns("demo") as ns, processes() as procs:
        lb = start_l4lb(root / "config" / "l4lb.yaml", "--demo", prefix=ns)
        procs.append(lb)
        wait_for_line(lb, "stdout", "Be another client")
        out = subprocess.run(
            [*ns, "curl", "-sk", "http://127.0.0.1:8080/", "https://127.0.0.1:8443/"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()
        assert len(out) == 2
        name_http, name_https = (line.split()[0] for line in out)
        assert name_http == name_https and name_http in ("demo1", "demo2", "demo3")
        assert "(https)" in out[1]
        echo = subprocess.run(  # and the UDP echo
            [*ns, sys.executable, "-c", UDP_HI, "8053"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        assert echo.startswith(f"{name_http} (udp): hi")
        assert stop(lb) == 0


UDP_HI = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"hi", ("127.0.0.1", int(sys.argv[1])))
print(s.recv(999).decode())
"""


def test_health_as_a_user_kill_drain_and_sorry_server(tmp_path: Path) -> None:
    """Three real backends with a client pinned to each: killing one moves only its clients, with
    no failed connection and in the stated time; draining another keeps its clients and takes no
    new ones; with all down, the sorry server answers."""
    http, admin, sorry_port, *bports = free_ports(6)
    (tmp_path / "token").write_text("a-token-of-the-e2e-test")
    backends = "\n".join(
        f"      - {{name: {n}, address: 127.0.0.1, ports: {{{http}: {p}}}}}"
        for n, p in zip(NAMES, bports, strict=True)
    )
    config = tmp_path / "l4lb.yaml"
    config.write_text(
        f"admin: {{listen: '127.0.0.1:{admin}', token_file: token}}\n"
        "groups:\n  web:\n"
        f"    listen: [127.0.0.1]\n    ports: [{http}]\n    scheduler: rr\n"
        "    persistence: {timeout: 10m}\n"
        "    health_check: {type: http, path: /, interval: 200ms, timeout: 300ms, rise: 2, fall: 2}\n"
        f"    sorry_server: {{address: 127.0.0.1, ports: {{{http}: {sorry_port}}}}}\n"
        "    backends:\n" + backends + "\n"
    )
    url = f"http://127.0.0.1:{http}/"

    def get(src: str) -> str:
        r = subprocess.run(
            ["curl", "-sS", "--interface", src, "--max-time", "5", url],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r.returncode == 0, f"curl from {src} failed: {r.stderr}"
        return r.stdout.strip()

    def ctl(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "l4lb", "ctl", "-c", str(config), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    with processes() as procs:
        procs.append(start_backend("sorry", http=f"127.0.0.1:{sorry_port}"))
        servers = {
            n: start_backend(n, http=f"127.0.0.1:{p}") for n, p in zip(NAMES, bports, strict=True)
        }
        procs.extend(servers.values())
        lb = start_l4lb(config)
        procs.append(lb)
        clients = {f"127.6.{i}.1": get(f"127.6.{i}.1") for i in range(9)}
        assert Counter(clients.values()) == {n: 3 for n in NAMES}  # rr: three clients on each

        t0 = time.monotonic()
        servers["web1"].kill()
        servers["web1"].wait()
        wait_for_line(lb, "stderr", "backend web1 up -> down", timeout=5)
        took = time.monotonic() - t0
        assert took < 2 * 0.2 * 1.1 + 0.3 + 0.3, (
            took
        )  # fall x interval (+jitter) + timeout, + slack
        for src, was in clients.items():
            now = get(src)
            assert (now != "web1") if was == "web1" else (now == was), (src, was, now)
        moved = {src: get(src) for src, was in clients.items() if was == "web1"}

        assert "state drain" in ctl("backend", "drain", "web", "web2")
        for src, was in clients.items():
            if was == "web2":
                assert get(src) == "web2"  # drained: pinned clients keep coming
        assert all(
            get(f"127.7.{i}.1") == "web3" for i in range(6)
        )  # new clients: not web2 (web1 is down)

        for n in ("web2", "web3"):
            servers[n].kill()
            servers[n].wait()
        wait_for_line(lb, "stderr", "sorry server standby -> serving", timeout=5)
        assert {get(src) for src in clients} == {"sorry"}
        assert moved  # (web1's clients had moved before)
        status = ctl("status")
        assert "SORRY" in status and "serving" in status

"""The connection log, read back field by field against what the test did: curl over both
ports of a group from several /24s, a pinned backend killed, a download cut by a backend's
death, an idle timeout, a refused PROXY header, and two workers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import free_ports
from tests.lab import lab, open_from
from tests.procs import start_backend, wait_for_line, wait_port


def curl(port: int, src: str) -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", "--interface", src, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def lines(path: Path, n: int, within: float = 10) -> list[dict[str, object]]:
    """The first n lines of the log, once written (the writer flushes every loop turn)."""
    deadline = time.monotonic() + within
    while True:
        text = path.read_text() if path.exists() else ""
        got = [json.loads(x) for x in text.splitlines()]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_every_connection_ends_in_a_line_that_says_what_happened(tmp_path: Path) -> None:
    log = tmp_path / "access.json"
    p1, p2, h1, h2, h3, h4, proxied, idle = free_ports(8)
    with lab(tmp_path) as lb_:
        https = [
            start_backend("b0", http=f"127.0.0.1:{h1}"),
            start_backend("b1", http=f"127.0.0.1:{h2}"),
        ]
        lb_.procs += https
        for p in (h1, h2):
            wait_port(p)
        # b0 also serves the second port through another of its ports (a second process).
        for name, port in (("b0", h3), ("b1", h4)):
            lb_.procs.append(start_backend(name, http=f"127.0.0.1:{port}"))
            wait_port(port)
        stream = lb_.backend("s0")
        echo = lb_.backend("e0")
        group = (
            f"  web:\n    listen: [127.0.0.1]\n    ports: [{p1}, {p2}]\n    scheduler: rr\n"
            "    persistence: {timeout: 10m, netmask: /24}\n    passive: {failures: 1}\n"
            "    backends:\n"
            f"      - {{name: b0, address: 127.0.0.1, ports: {{{p1}: {h1}, {p2}: {h3}}}}}\n"
            f"      - {{name: b1, address: 127.0.0.1, ports: {{{p1}: {h2}, {p2}: {h4}}}}}\n"
            f"  dl:\n    listen: [127.0.0.1]\n    ports: [{proxied}]\n"
            "    accept_proxy: {trusted: [127.0.0.0/8], timeout: 1s}\n"
            f"    backends: [{{name: s0, address: 127.0.0.1, ports: {{{proxied}: {stream.ports['stream']}}}}}]\n"
            f"  quiet:\n    listen: [127.0.0.1]\n    ports: [{idle}]\n    idle_timeout: 1s\n"
            f"    backends: [{{name: e0, address: 127.0.0.1, ports: {{{idle}: {echo.ports['echo']}}}}}]\n"
        )
        lb, _admin = lb_.l4lb(group, top=f"access_log: {{path: {log}, format: json}}\n")

        # curl from three /24s, over both ports: the first is new, the rest hit the pin.
        seen = {}
        for src, port in (
            ("127.0.201.1", p1),
            ("127.0.201.2", p2),
            ("127.0.202.1", p1),
            ("127.0.202.9", p2),
            ("127.0.203.1", p2),
        ):
            seen[(src, port)] = curl(port, src)
        got = lines(log, 5)
        assert len(got) == 5
        for line, ((src, port), name) in zip(got, seen.items(), strict=True):
            backend_port = {("b0", p1): h1, ("b1", p1): h2, ("b0", p2): h3, ("b1", p2): h4}
            assert line["group"] == "web" and line["client"] == src and line["port"] == port
            assert line["backend"] == name
            assert line["backend_address"] == f"127.0.0.1:{backend_port[(name, port)]}"
            assert line["tries"] == 1 and line["event"] == "end"
            # http.server closes after its answer, and curl once it has it all: either FIN can
            # come first (the client's own close is tested with the workers below)
            assert line["termination"] in ("backend_fin", "client_fin")
            assert int(line["bytes_in"]) > 50 and int(line["bytes_out"]) > 50  # type: ignore[call-overload]
            assert isinstance(line["client_port"], int) and line["client_port"] > 1024
            # whole milliseconds, as HAProxy's tcplog: a loopback connect takes less than one
            assert isinstance(line["connect_ms"], int) and isinstance(line["duration_ms"], int)
            assert line["duration_ms"] >= line["connect_ms"] >= 0
            assert str(line["time"]).endswith("Z") and "peer" not in line
        assert [x["affinity"] for x in got] == ["new", "hit", "new", "hit", "new"]

        # The pinned backend of 127.0.201.0/24 dies: the next connection is re-pinned.
        victim = seen[("127.0.201.1", p1)]
        for proc in lb_.procs:
            if proc.args and "--name" in proc.args and victim in proc.args:
                proc.kill()
                proc.wait(10)
        other = curl(p1, "127.0.201.3")
        assert other != victim
        (repin,) = lines(log, 6)[5:]
        assert repin["affinity"] == "repin" and repin["repin_reason"] == "failed"
        assert repin["tries"] == 2 and repin["backend"] == other

        # A refused PROXY header: no backend, rejected; a good one names its client.
        async def proxy_cases() -> None:
            r, w = await open_from(proxied, "127.0.204.1")
            w.write(b"PROXY TCP4 nonsense\r\n")
            try:
                data = await r.read()
            except ConnectionResetError:
                data = b""
            assert data == b""
            w.close()
            r, w = await open_from(proxied, "127.0.204.2")
            w.write(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n1000\n")
            data = await r.read()
            assert len(data) == 1000
            w.close()

        asyncio.run(proxy_cases())
        refused, good = lines(log, 8)[6:8]
        assert refused["termination"] == "rejected" and refused["backend"] is None
        assert refused["tries"] == 0 and refused["client"] == "127.0.204.1"
        assert good["client"] == "198.51.100.7" and good["client_port"] == 5555
        assert good["peer"] == "127.0.204.2" and good["bytes_out"] == 1000
        assert good["termination"] == "backend_fin" and good["affinity"] == "new"

        # An idle timeout: the echo backend greets, then both sides stay silent.
        async def idle_case() -> None:
            r, w = await open_from(idle, "127.0.205.1")
            assert await r.readline() == b"e0\n"
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()

        asyncio.run(idle_case())
        (quiet,) = lines(log, 9)[8:]
        assert quiet["termination"] == "idle_timeout" and quiet["group"] == "quiet"
        assert 1000 <= float(quiet["duration_ms"]) < 3000  # type: ignore[arg-type]
        assert quiet["bytes_out"] == 3 and quiet["bytes_in"] == 0

        # A download cut by its backend's death.
        async def cut() -> int:
            r, w = await open_from(proxied, "127.0.206.1")
            w.write(
                b"PROXY TCP4 198.51.100.8 127.0.0.1 5556 80\r\n" + str(200 << 20).encode() + b"\n"
            )
            got = len(await r.readexactly(1 << 20))
            stream.kill()
            try:
                while chunk := await r.read(1 << 20):
                    got += len(chunk)
            except ConnectionError:
                pass
            w.close()
            return got

        received = asyncio.run(cut())
        (died,) = lines(log, 10)[9:]
        assert died["termination"] in ("backend_fin", "backend_rst") and died["backend"] == "s0"
        assert received <= int(died["bytes_out"]) < 200 << 20  # type: ignore[call-overload]
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(15) == 0
        assert lb_.tracebacks() == []


def test_with_workers_each_line_names_its_worker_and_sigusr1_reopens(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    (port,) = free_ports(1)
    with lab(tmp_path) as lb_:
        echo = lb_.backend("e0")
        group = (
            f"  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
            "    persistence: {timeout: 10m, netmask: /24}\n"
            f"    backends: [{{name: e0, address: 127.0.0.1, ports: {{{port}: {echo.ports['echo']}}}}}]\n"
        )
        lb, _admin = lb_.l4lb(
            group,
            top=f"workers: 2\naccess_log: {{path: {log}, format: text, log_on_connect: true}}\n",
        )

        async def clients(n: int, base: int) -> None:
            for i in range(n):
                r, w = await open_from(port, f"127.{base + i}.0.1")
                await r.readline()
                w.close()
                await r.read()

        asyncio.run(clients(16, 100))
        deadline = time.monotonic() + 10
        while log.read_text().count("\n") < 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text().splitlines()
        assert len(text) == 32  # a line at connect, a line at the end
        workers = {x.rsplit("worker=", 1)[1] for x in text}
        assert workers == {"0", "1"}
        assert (
            sum(" connect open" in x for x in text) == 16
            and sum(" end client_fin" in x for x in text) == 16
        )
        # logrotate: move the file, SIGUSR1, and new lines go to a new file at the path.
        log.rename(tmp_path / "access.log.1")
        lb.send_signal(signal.SIGUSR1)
        wait_for_line(lb, "stderr", "reopened the access log")
        wait_for_line(lb, "stderr", "reopened the access log")  # each worker
        asyncio.run(clients(4, 150))
        deadline = time.monotonic() + 10
        while (not log.exists() or log.read_text().count("\n") < 8) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().count("\n") == 8
        assert lb_.tracebacks() == []


async def test_a_log_that_cannot_keep_up_drops_lines_and_counts_them(tmp_path: Path) -> None:
    """A FIFO nobody reads: the pipe fills, then the bounded buffer, then lines are dropped,
    counted, and the loop never waits. Once read, what was kept arrives whole."""
    import os

    from l4lb.accesslog import AccessLog, Record, unrouted
    from l4lb.config import AccessLogSpec

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = AccessLog(AccessLogSpec(path=str(fifo)), max_pending=1000)
        rec = Record(("127.0.0.1", 4000), time.monotonic())
        rec.routed = unrouted("web", 80, 0)
        t0 = time.monotonic()
        for _ in range(5000):
            out.log(rec, rec.started, None, 0, 0, True)
            await asyncio.sleep(0)  # a loop turn: a flush that is due runs
        assert time.monotonic() - t0 < 5  # nothing blocked
        assert out.dropped > 0 and out.written + out.dropped + len(out._rows) <= 5000
        got = b""
        while True:
            try:
                chunk = os.read(reader, 1 << 20)
            except BlockingIOError:
                if not out._rows and not out._tail:
                    break
                await asyncio.sleep(0.01)
                continue
            got += chunk
        assert got.count(b"\n") == 5000 - out.dropped
        lines = got.split(b"\n")[:-1]
        assert len(set(lines)) == 1 and json.loads(lines[0])["client_port"] == 4000
        out.close()
    finally:
        os.close(reader)

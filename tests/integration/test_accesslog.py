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

from tests.support.helpers import free_ports
from tests.support.lab import lab, open_from
from tests.support.procs import start_backend, wait_for_line, wait_port


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

    from l4lb.config import AccessLogSpec
    from l4lb.core.connection import Conn, unrouted
    from l4lb.dataplane.accesslog import AccessLog

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = AccessLog(AccessLogSpec(path=str(fifo)), max_pending=1000)
        rec = Conn(("127.0.0.1", 4000), time.monotonic(), 80)
        rec.routed = unrouted("web", 80, 0)
        t0 = time.monotonic()
        for _ in range(5000):
            out.log(rec, rec.started, end=True)
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


async def test_a_batch_of_mixed_rows_gives_each_line_its_own_facts(tmp_path: Path) -> None:
    """Lines are made in batches, reusing the texts consecutive rows share (the time, routing's
    outcome, the end): interleaved rows of two outcomes, three ends, a connect line, a PROXY
    client and an IPv4 client of a dual-stack listener each get their own, in both formats."""
    from l4lb.config import AccessLogSpec
    from l4lb.core.connection import Conn, Routed, unrouted
    from l4lb.dataplane.accesslog import AccessLog

    for fmt in ("json", "text"):
        path = tmp_path / f"log.{fmt}"
        out = AccessLog(AccessLogSpec(path=str(path), format=fmt), worker=3)
        a = Conn(("127.0.0.1", 4001), 100.0, 80)
        a.connected_at = 100.002
        a.routed = Routed("web", 80, "hit", "", "b1", "127.0.0.1", 18080, 1, False)
        b = Conn(("::ffff:127.0.0.2", 4002), 100.0, 443)
        b.connected_at = 100.004
        b.routed = Routed("web", 443, "repin", "unavailable", "b2", "::1", 8443, 2, False)
        c = Conn(("127.0.0.3", 4003), 100.5, 80)
        c.routed = unrouted("web", 80, 3)
        rows = [  # (record, time, PROXY client, bytes in, bytes out, termination)
            (a, 100.010, None, 5, 1500, "client_fin"),
            (b, 100.010, None, 7, 9, "backend_rst"),
            (a, 100.020, ("10.9.9.9", 555), 0, 0, None),
            (a, 101.000, None, 1000, 999, "client_fin"),
            (c, 101.000, None, 0, 0, "no_backend"),
            (b, 101.000, None, 1, 2, ""),
        ]
        for rec, now, via, bi, bo, how in rows:
            rec.termination = how or ""
            rec.via, rec.bytes_in, rec.bytes_out = via, bi, bo  # (read when the row is queued)
            out.log(rec, now, end=how is not None)
        out.close()
        got = path.read_text().splitlines()
        assert len(got) == 6
        if fmt == "text":
            assert got[0].endswith(
                " 127.0.0.1:4001 -> web:80 -> b1@127.0.0.1:18080 affinity=hit tries=1 connect_ms=2"
                " duration_ms=10 bytes_in=5 bytes_out=1500 end client_fin worker=3"
            )
            assert (
                " 127.0.0.2:4002 -> web:443 -> b2@[::1]:8443 affinity=repin(unavailable)" in got[1]
            )
            assert " 10.9.9.9:555 (via 127.0.0.1:4001) -> web:80 " in got[2]
            assert got[2].endswith(" connect open worker=3")
            assert "-> web:80 -> - affinity=none tries=3 connect_ms=-" in got[4]
            assert got[5].endswith(" end unknown worker=3")
            continue
        lines = [json.loads(x) for x in got]
        assert [x["event"] for x in lines] == ["end", "end", "connect", "end", "end", "end"]
        assert [x["client"] for x in lines] == [
            "127.0.0.1",
            "127.0.0.2",
            "10.9.9.9",
            "127.0.0.1",
            "127.0.0.3",
            "127.0.0.2",
        ]
        assert [x["client_port"] for x in lines] == [4001, 4002, 555, 4001, 4003, 4002]
        assert lines[2]["peer"] == "127.0.0.1" and lines[2]["peer_port"] == 4001
        assert all("peer" not in x for i, x in enumerate(lines) if i != 2)
        assert [x["affinity"] for x in lines] == ["hit", "repin", "hit", "hit", "none", "repin"]
        assert lines[1]["repin_reason"] == "unavailable" and "repin_reason" not in lines[0]
        assert [x["backend"] for x in lines] == ["b1", "b2", "b1", "b1", None, "b2"]
        assert lines[1]["backend_address"] == "[::1]:8443"
        assert (
            lines[0]["backend_address"] == "127.0.0.1:18080" and "backend_address" not in lines[4]
        )
        assert [x["tries"] for x in lines] == [1, 2, 1, 1, 3, 2]
        assert [x["connect_ms"] for x in lines] == [2, 4, 2, 2, None, 4]
        assert [x["duration_ms"] for x in lines] == [10, 10, 20, 1000, 500, 1000]
        assert [x["bytes_in"] for x in lines] == [5, 7, 0, 1000, 0, 1]
        assert [x["bytes_out"] for x in lines] == [1500, 9, 0, 999, 0, 2]
        assert [x.get("termination") for x in lines] == [
            "client_fin",
            "backend_rst",
            None,
            "client_fin",
            "no_backend",
            "unknown",
        ]
        assert {x["worker"] for x in lines} == {3}
        # The time is each row's own: the loop's clock to the wall clock, whole milliseconds.
        stamps = [x["time"] for x in lines]
        assert stamps[0] == stamps[1] != stamps[2] != stamps[3] == stamps[4] == stamps[5]

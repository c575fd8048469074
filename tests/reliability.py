"""The reliability suite: faults, floods and hostile input against real l4lb processes, each
experiment a row of one table (experiment, load, expectation, figure, pass/fail).

    python -m tests.reliability            # every experiment at full load (make reliability)
    python -m tests.reliability --fast     # the small loads make test runs
    python -m tests.reliability --only slowloris --only descriptors
    python -m tests.reliability --soak 600 # churn for 10 minutes: descriptors and RSS flat

Every experiment ends its processes and checks that no log line of any balancer it ran is a
traceback. Traffic goes to loopback only, or inside network namespaces the suite creates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.helpers import free_ports
from tests.support.lab import (
    TOKEN,
    Lab,
    cpu_seconds,
    fds,
    group_yaml,
    lab,
    metric,
    metrics,
    open_from,
    raise_nofile,
    rss_kib,
    source,
)
from tests.support.lab_backend import pattern
from tests.support.procs import output, processes, wait_for_line

MIB = 1 << 20


@dataclass
class Row:
    experiment: str
    load: str
    expectation: str
    figure: str
    ok: bool

    def cells(self) -> list[str]:
        return [
            self.experiment,
            self.load,
            self.expectation,
            self.figure,
            "pass" if self.ok else "FAIL",
        ]


@dataclass
class Scale:
    fast: bool

    def pick(self, fast: int, full: int) -> int:
        return fast if self.fast else full


Experiment = Callable[[Path, Scale], Row]
EXPERIMENTS: dict[str, tuple[Experiment, bool]] = {}  # name -> (function, runs in make test)


def experiment(name: str, fast: bool = True) -> Callable[[Experiment], Experiment]:
    def register(fn: Experiment) -> Experiment:
        EXPERIMENTS[name] = (fn, fast)
        return fn

    return register


def clean(lab_: Lab, row: Row) -> Row:
    """The row fails if any balancer of the experiment logged a traceback."""
    bad = lab_.tracebacks()
    if bad:
        row.ok = False
        row.figure += f"; {len(bad)} traceback(s) in the log"
    return row


async def download(
    port: int, src: str, n: int, read_pace: float = 0.0, hurry: asyncio.Event | None = None
) -> tuple[int, bool, float]:
    """(bytes received, byte-exact and complete, monotonic time it ended). Reads at `read_pace`
    per 64 KiB until `hurry` is set, then as fast as it can (to see when the stream ends, not
    how long the buffered bytes take to read slowly)."""
    r, w = await open_from(port, src)
    w.write(f"{n}\n".encode())
    got = 0
    exact = True
    try:
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            if exact and chunk != pattern(got, len(chunk)):
                exact = False
            got += len(chunk)
            if read_pace and not (hurry is not None and hurry.is_set()):
                await asyncio.sleep(read_pace)
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
    return got, exact and got == n, time.monotonic()


async def relayed(admin: int, nbytes: int, within: float = 30) -> None:
    """Until b0 has sent `nbytes` to clients. Another process's progress: its metrics are the
    only signal there is, so this polls them (every 50 ms, for at most `within` seconds)."""
    deadline = time.monotonic() + within
    while (
        metric(metrics(admin), "l4lb_bytes_total", group="web", backend="b0", direction="out")
        < nbytes
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"b0 sent less than {nbytes} bytes in {within} s")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ faults


def _kill_mid_stream(tmp: Path, scale: Scale, relay: str) -> Row:
    n_clients, size = 20, scale.pick(64, 200) * MIB
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(3)]
        (port,) = free_ports(1)
        group = group_yaml(
            bs,
            [port],
            "stream",
            extra=f"scheduler: fo\nrelay: {relay}\npersistence: {{timeout: 10m}}",
        )
        _lb, admin = lb_.l4lb(group)

        async def run() -> tuple[list[tuple[int, bool, float]], float, list[str]]:
            hurry = asyncio.Event()
            tasks = [
                asyncio.create_task(download(port, f"127.0.140.{i + 1}", size, 0.002, hurry))
                for i in range(n_clients)
            ]
            await relayed(admin, n_clients * MIB)
            killed = time.monotonic()
            bs[0].kill()
            hurry.set()
            ended = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            after = []
            for i in range(n_clients):  # the same clients again: re-pinned, served
                r, w = await open_from(port, f"127.0.140.{i + 1}")
                w.write(b"16\n")
                after.append("ok" if await r.read(64) == pattern(0, 16) else "failed")
                w.close()
            return ended, killed, after

        ended, killed, after = asyncio.run(run())
        cut_ends = [t for got, _, t in ended if got < size]
        worst = max(cut_ends, default=killed) - killed
        cut = len(cut_ends)
        row = Row(
            f"backend killed mid-stream ({relay})",
            f"{n_clients} downloads of {size // MIB} MiB, kill -9 of their backend",
            "every cut download ends within 2 s; every client re-pinned and served",
            f"{cut}/{n_clients} cut"
            + (f" ({n_clients - cut} had finished)" if cut < n_clients else "")
            + f", all ended {worst * 1000:.0f} ms after the kill;"
            f" {after.count('ok')}/{n_clients} served again",
            cut >= n_clients // 2 and worst < 2.0 and after.count("ok") == n_clients,
        )
        return clean(lb_, row)


@experiment("kill-copy")
def kill_copy(tmp: Path, scale: Scale) -> Row:
    return _kill_mid_stream(tmp, scale, "copy")


@experiment("kill-splice")
def kill_splice(tmp: Path, scale: Scale) -> Row:
    return _kill_mid_stream(tmp, scale, "splice")


@experiment("slow-readers", fast=False)
def slow_readers(tmp: Path, scale: Scale) -> Row:
    """Clients that read slowly, and a backend that reads slowly: memory per connection stays
    at the write buffers' bound, and nothing stays behind."""
    n, size = 50, 32 * MIB
    with lab(tmp) as lb_:
        (b,) = [lb_.backend("b0", sink_pace=0.004)]
        p1, p2 = free_ports(2)
        group = group_yaml([b], [p1], "stream", extra="persistence: {timeout: 0}")
        group += group_yaml([b], [p2], "sink", name="up", extra="persistence: {timeout: 0}")
        lb, _admin = lb_.l4lb(group)
        base_rss, base_fds = rss_kib(lb.pid), fds(lb.pid)
        peak = [0]

        def sample() -> None:
            peak[0] = max(peak[0], rss_kib(lb.pid))

        async def upload(i: int) -> bool:
            r, w = await open_from(p2, f"127.0.141.{i + 1}")
            await r.readline()
            sent = 0
            while sent < size:
                w.write(pattern(sent, 256 * 1024))
                sent += 256 * 1024
                await w.drain()
            w.write_eof()
            ok = (await r.readline()).strip() == str(size).encode()
            w.close()
            return ok

        async def run() -> tuple[list[tuple[int, bool, float]], list[bool]]:
            async def sampler() -> None:
                while True:
                    sample()
                    await asyncio.sleep(0.2)

            s = asyncio.create_task(sampler())
            downs = [download(p1, f"127.0.142.{i + 1}", size, 0.004) for i in range(n)]
            ups = [upload(i) for i in range(n)]
            res = await asyncio.gather(asyncio.gather(*downs), asyncio.gather(*ups))
            s.cancel()
            return res[0], res[1]

        t0 = time.monotonic()
        downs, ups = asyncio.run(run())
        took = time.monotonic() - t0
        exact = sum(ok for _, ok, _ in downs) + sum(ups)
        time.sleep(0.5)  # the last closes reach the balancer's loop
        end_fds = fds(lb.pid)
        per_conn = (peak[0] - base_rss) / (2 * n)
        row = Row(
            "slow readers both ways",
            f"{n} slow downloads and {n} uploads into a slow backend, {size // MIB} MiB each",
            "byte-exact; under 1 MiB of RSS per connection; descriptors back to the start",
            f"{exact}/{2 * n} exact in {took:.0f} s; peak +{per_conn:.0f} KiB/connection; "
            f"descriptors {base_fds} -> {end_fds}",
            exact == 2 * n and per_conn < 1024 and end_fds <= base_fds,
        )
        return clean(lb_, row)


@experiment("slowloris")
def slowloris(tmp: Path, scale: Scale) -> Row:
    n = scale.pick(300, 2000)
    raise_nofile()
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        lb, _admin = lb_.l4lb(group_yaml([b], [port], extra="idle_timeout: 2s"))
        base_fds = fds(lb.pid)

        async def run() -> list[float]:
            async def one(i: int) -> float:
                r, w = await open_from(port, source(i, 20), within=30)
                t0 = time.monotonic()
                await r.readline()  # the backend's greeting, then silence both ways
                try:
                    while await r.read(1024):
                        pass
                except (ConnectionError, OSError):
                    pass
                w.close()
                return time.monotonic() - t0

            return await asyncio.gather(*(one(i) for i in range(n)))

        lived = asyncio.run(run())
        time.sleep(0.5)
        end_fds = fds(lb.pid)
        row = Row(
            "slowloris (silent connections)",
            f"{n} connections that send nothing, idle_timeout 2s",
            "every one closed by the idle timeout (within one tick); descriptors back",
            f"{len(lived)}/{n} closed after {min(lived):.1f}-{max(lived):.1f} s; "
            f"descriptors {base_fds} -> {end_fds}",
            # (timed from when this client's coroutine saw its connection, which with 2,000
            # opening at once can be a while after l4lb's accept: the lower bound is loose)
            len(lived) == n and min(lived) > 1.5 and max(lived) < 4.0 and end_fds <= base_fds,
        )
        return clean(lb_, row)


@experiment("descriptors")
def descriptors(tmp: Path, scale: Scale) -> Row:
    n = 400
    raise_nofile()
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(group_yaml([b], [port]), prefix=("prlimit", "--nofile=256:256", "--"))

        async def run() -> tuple[int, int, float, float]:
            served = refused = 0
            held = []
            for i in range(n):
                try:  # a reset can beat the connect's own completion
                    r, w = await open_from(port, source(i, 30))
                    held.append(w)
                    line = await asyncio.wait_for(r.readline(), 5)
                except (ConnectionError, OSError):
                    line = b""
                served += line == b"b0\n"
                refused += line == b""
            t0, c0 = time.monotonic(), cpu_seconds(lb.pid)
            await asyncio.sleep(2)  # full, with every held connection open: does it spin?
            idle_cpu = (cpu_seconds(lb.pid) - c0) / (time.monotonic() - t0)
            counted = metric(metrics(admin), "l4lb_accept_errors_total", errno="EMFILE")
            for w in held:
                w.close()
            return served, refused, idle_cpu, counted

        served, refused, idle_cpu, counted = asyncio.run(run())

        async def again() -> bytes:
            r, w = await open_from(port, "127.0.143.1")
            line = await r.readline()
            w.close()
            return line

        time.sleep(0.5)
        recovered = asyncio.run(again()) == b"b0\n"
        row = Row(
            "descriptor exhaustion",
            f"nofile=256, {n} clients holding their connections",
            "the excess refused with a reset, each counted; idle CPU ~0; serves again after",
            f"{served} served, {refused} refused, {counted:.0f} counted; CPU {idle_cpu:.0%}"
            f" while full; {'recovered' if recovered else 'did not recover'}",
            served + refused == n and refused == counted > 0 and idle_cpu < 0.05 and recovered,
        )
        return clean(lb_, row)


@experiment("sources", fast=False)
def distinct_sources(tmp: Path, scale: Scale) -> Row:
    n, bound = 30_000, 10_000
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(
            group_yaml([b], [port], extra=f"persistence: {{timeout: 10m, max_entries: {bound}}}")
        )
        base = rss_kib(lb.pid)

        async def run() -> int:
            sem = asyncio.Semaphore(200)
            ok = 0

            async def one(i: int) -> None:
                nonlocal ok
                async with sem:
                    r, w = await open_from(port, source(i, 40))
                    line = await r.readline()  # (not `ok += await`: a lost update)
                    ok += line == b"b0\n"
                    w.close()

            await asyncio.gather(*(one(i) for i in range(n)))
            return ok

        t0 = time.monotonic()
        ok = asyncio.run(run())
        took = time.monotonic() - t0
        m = metrics(admin)
        entries = metric(m, "l4lb_affinity_entries", group="web", state="idle") + metric(
            m, "l4lb_affinity_entries", group="web", state="active"
        )
        evicted = metric(m, "l4lb_affinity_evictions_total", group="web")
        grew = (rss_kib(lb.pid) - base) / 1024
        row = Row(
            "distinct sources",
            f"{n:,} distinct /32 clients, max_entries {bound:,}",
            "the table stays at max_entries, the oldest evicted; every client served",
            f"{ok:,} served in {took:.0f} s; {entries:,.0f} entries, {evicted:,.0f} evicted;"
            f" RSS +{grew:.1f} MiB",
            ok == n and entries <= bound and evicted >= n - bound,
        )
        return clean(lb_, row)


@experiment("proxy-garbage")
def proxy_garbage(tmp: Path, scale: Scale) -> Row:
    n, rate = scale.pick(300, 3000), 1000
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        _lb, admin = lb_.l4lb(
            group_yaml([b], [port], extra="accept_proxy: {trusted: [127.0.0.0/8], timeout: 2s}")
        )
        junk = [
            b"PROXY TCP4 x\r\n",
            b"GET / HTTP/1.1\r\n\r\n" * 10,
            os.urandom(600),
            b"\r\n\r\n\x00\r\nQUIT\n" + os.urandom(16),
        ]

        async def run() -> tuple[int, int, int]:
            resets = fins = good = 0

            async def bad(i: int) -> None:
                nonlocal resets, fins
                r, w = await open_from(port, source(i, 50))
                w.write(junk[i % len(junk)])
                try:
                    data = await asyncio.wait_for(r.read(1), 5)
                    fins += data == b""
                except ConnectionResetError:
                    resets += 1
                w.close()

            async def fine(i: int) -> None:
                nonlocal good
                r, w = await open_from(port, f"127.0.144.{i % 250 + 1}")
                w.write(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n")
                line = await asyncio.wait_for(r.readline(), 5)
                good += line == b"b0\n"
                w.close()

            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(bad(i)))
                if i % 10 == 0:
                    tasks.append(asyncio.create_task(fine(i)))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)
            return resets, fins, good

        resets, fins, good = asyncio.run(run())
        rejected = metric(
            metrics(admin), "l4lb_connections_failed_total", group="web", reason="rejected"
        )
        goods = (n + 9) // 10
        row = Row(
            "PROXY garbage at rate",
            f"{n} malformed PROXY headers at ~{rate}/s, a good client every 10th",
            "every refusal a reset (not a FIN), counted; the good clients served",
            f"{resets} resets, {fins} FINs, {rejected:.0f} counted; {good}/{goods} good served",
            resets == n and fins == 0 and rejected == n and good == goods,
        )
        return clean(lb_, row)


@experiment("admin-abuse")
def admin_abuse(tmp: Path, scale: Scale) -> Row:
    rounds = scale.pick(20, 200)
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(group_yaml([b], [port]))
        hdr = b"POST /api/v1/reload HTTP/1.1\r\nHost: localhost\r\n"
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        kinds = [
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 1000 + b"\r\n",
            hdr + b"Content-Length: -1\r\n\r\n",
            hdr + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
            hdr + b"Content-Length: 10000000000\r\n\r\n",
            b"POST /api/v1/backends/web/b0 HTTP/1.1\r\nHost: localhost\r\n"
            + auth
            + b"Content-Length: 30006\r\n\r\n"
            + b"[" * 15003
            + b"]" * 15003,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
        ]
        statuses: dict[int, int] = {}
        t0 = time.monotonic()
        for _ in range(rounds):
            for data in kinds:
                with socket.create_connection(("127.0.0.1", admin), timeout=10) as s:
                    s.sendall(data)
                    try:
                        head = s.recv(64)
                    except ConnectionResetError:
                        head = b""
                code = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.") else 0
                statuses[code] = statuses.get(code, 0) + 1
        took = time.monotonic() - t0
        # Connections that got an error answer linger a second (aiohttp reads what the client
        # still sends) and count against max_connections meanwhile: a 503 until they are gone.
        deadline = time.monotonic() + 5
        alive = False
        while not alive and time.monotonic() < deadline:
            try:
                alive = metrics(admin).startswith("#")
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    raise
                time.sleep(0.1)
        lb.terminate()
        lb.wait(15)
        log = output(lb)
        lines = log.count("refused a malformed admin request")
        allowed = (took + 2) * len(kinds)  # one line per kind and second
        total = rounds * len(kinds)
        row = Row(
            "admin abuse",
            f"{total} malformed admin requests of {len(kinds)} kinds",
            "an HTTP answer each: 400 or 413, or 503 past max_connections (an error answer"
            " lingers a second); never a 500; one log line per kind and second; the API"
            " answers after",
            f"statuses {dict(sorted(statuses.items()))}; {lines} log lines in {took:.1f} s",
            set(statuses) <= {400, 413, 503} and lines <= allowed and alive,
        )
        return clean(lb_, row)


# ------------------------------------------------------------------ operations under load


class Load:
    """Threads that make echo connections from `sources` until stopped, counting failures."""

    def __init__(self, port: int, sources: list[str], threads: int = 4) -> None:
        self.port, self.sources = port, sources
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.failed_at: list[float] = []  # monotonic times of the failures
        self.backends: dict[str, set[str]] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, k: int) -> None:
        i = k
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            src = self.sources[i % len(self.sources)]
            i += len(self.threads)
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=10, source_address=(src, 0)
                ) as s:
                    f = s.makefile("rb")
                    name = f.readline().strip().decode()
                    s.sendall(b"ping")
                    echoed = f.read(4)  # (not s.recv(4): TCP may hand it over in pieces)
                    if echoed != b"ping":
                        raise OSError(f"no echo: {echoed!r}")
                self.backends.setdefault(src, set()).add(name)
                self.done += 1
            except OSError as exc:
                self.failures.append(f"{src}: {exc}")
                self.failed_at.append(time.monotonic())


@experiment("reloads", fast=False)
def reloads(tmp: Path, scale: Scale) -> Row:
    n = 100
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(3)]
        (port,) = free_ports(1)
        group = group_yaml(bs, [port], extra="scheduler: rr\npersistence: {timeout: 10m}")
        lb, admin = lb_.l4lb(group)
        cfg = lb_.config_path()
        text = cfg.read_text()
        clients = [f"127.0.145.{i}" for i in range(1, 41)]
        with Load(port, clients) as load:
            for k in range(n):
                cfg.write_text(
                    text.replace("scheduler: rr", ("scheduler: rr", "scheduler: wlc")[k % 2])
                )
                lb.send_signal(signal.SIGHUP)
                wait_for_line(lb, "stderr", "reloaded")
        moved = sum(len(v) > 1 for v in load.backends.values())
        ok = metric(metrics(admin), "l4lb_reloads_total", result="ok")
        row = Row(
            "reloads under load",
            f"{n} SIGHUPs while 4 threads connect from 40 clients",
            "no failed connection; every client keeps its backend",
            f"{load.done} connections, {len(load.failures)} failed; {moved} clients moved;"
            f" {ok:.0f} reloads ok",
            not load.failures and moved == 0 and ok == n,
        )
        return clean(lb_, row)


@experiment("sigterm")
def sigterm(tmp: Path, scale: Scale) -> Row:
    n, size = scale.pick(10, 50), scale.pick(8, 32) * MIB
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(group_yaml([b], [port], "stream"))

        async def run() -> tuple[list[tuple[int, bool, float]], float, bool]:
            tasks = [
                asyncio.create_task(download(port, f"127.0.146.{i + 1}", size, 0.001))
                for i in range(n)
            ]
            await relayed(admin, n * MIB)
            t0 = time.monotonic()
            lb.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # new connections are refused once it stops accepting
                await open_from(port, "127.0.147.1", 2)
                refused = False
            except OSError:
                refused = True
            return await asyncio.gather(*tasks), t0, refused

        ended, t0, refused = asyncio.run(run())
        code = lb.wait(30)
        took = time.monotonic() - t0
        exact = sum(ok for _, ok, _ in ended)
        row = Row(
            "SIGTERM under load",
            f"{n} downloads of {size // MIB} MiB in flight, shutdown_timeout 10s",
            "every download completes byte-exact; new connections refused; exit 0",
            f"{exact}/{n} complete and exact; exit {code} after {took:.1f} s;"
            f" new connections {'refused' if refused else 'accepted'}",
            exact == n and code == 0 and refused and took < 10,
        )
        return clean(lb_, row)


@experiment("worker-killed", fast=False)
def worker_killed(tmp: Path, scale: Scale) -> Row:
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(2)]
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(
            group_yaml(bs, [port], extra="persistence: {timeout: 10m, netmask: /24}"),
            top="workers: 2\nstate_file: pins.json\nstate_interval: 500ms\n",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/v1/workers", timeout=10) as r:
            import json

            pid0 = json.loads(r.read())["workers"][0]["pid"]
        clients = [f"127.{150 + n}.0.1" for n in range(40)]
        with Load(port, clients) as load:
            time.sleep(1.5)  # every client pinned, and the pins in the state file
            before = load.done
            t0 = time.monotonic()
            os.kill(pid0, signal.SIGKILL)
            wait_for_line(lb, "stderr", "worker 0", timeout=20)
            back = None
            while time.monotonic() - t0 < 20:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/v1/workers") as r:
                    w0 = json.loads(r.read())["workers"][0]
                if w0["ready"] and w0["pid"] != pid0:
                    back = time.monotonic() - t0
                    break
                time.sleep(0.05)
            time.sleep(1)
        moved = sum(len(v) > 1 for v in load.backends.values())
        row = Row(
            "a worker killed under load",
            "workers: 2 (state_file), 4 threads from 40 /24s, SIGKILL of worker 0",
            "only connections in flight at the dead worker fail; it is back within 2 s;"
            " nobody changes backend",
            f"{load.done} connections ({before} before), {len(load.failures)} failed;"
            f" back after {back if back is None else f'{back:.2f} s'}; {moved} moved",
            back is not None and back < 2 and len(load.failures) <= 4 and moved == 0,
        )
        return clean(lb_, row)


@experiment("client-limits")
def client_limits(tmp: Path, scale: Scale) -> Row:
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        _lb, admin = lb_.l4lb(
            group_yaml(
                [b],
                [port],
                extra=(
                    "persistence: {timeout: 10m, netmask: /24}\n"
                    "client_limits: {max_conns: 10, rate: 50/s, burst: 100}"
                ),
            )
        )

        async def run() -> tuple[int, int, int]:
            held = []

            async def one(src: str) -> bool:
                try:
                    r, w = await open_from(port, src)
                    held.append(w)
                    return await asyncio.wait_for(r.readline(), 5) == b"b0\n"
                except (ConnectionError, OSError):
                    return False

            flood = await asyncio.gather(*(one(f"127.0.160.{i % 250 + 1}") for i in range(100)))
            others = await asyncio.gather(
                *(one(f"127.{161 + n}.0.{k}") for n in range(20) for k in range(1, 6))
            )
            for w in held:
                w.close()
            return sum(flood), 100 - sum(flood), sum(others)

        served, refused, others = asyncio.run(run())
        counted = metric(
            metrics(admin), "l4lb_connections_failed_total", group="web", reason="client_limit"
        )
        row = Row(
            "a client network over its limits",
            "one /24 opens 100 at once (max_conns 10); 20 other /24s open 5 each",
            "10 served, 90 reset and counted; every other network served",
            f"{served} served, {refused} refused, {counted:.0f} counted; others {others}/100",
            served == 10 and refused == 90 and counted == 90 and others == 100,
        )
        return clean(lb_, row)


# ------------------------------------------------------------------ a lossy, slow link


def _ip(*args: str, ns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=30)


@experiment("lossy-link")
def lossy_link(tmp: Path, scale: Scale) -> Row:
    size = scale.pick(4, 16) * MIB
    name = "lossy link (netns)"
    load = f"{size // MIB} MiB each way, 3% random loss, a 40 Mbit/s tbf link"
    expect = "byte-exact both ways"
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        return Row(name, load, expect, "skipped: needs root, ip and iptables (CI has them)", True)
    tag = f"l4rel{os.getpid() % 100000}"
    client, server = f"{tag}c", f"{tag}s"
    try:
        for ns in (client, server):
            _ip("ip", "netns", "add", ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
        _ip(
            "ip",
            "link",
            "add",
            f"{tag}a",
            "netns",
            client,
            "type",
            "veth",
            "peer",
            "name",
            f"{tag}b",
            "netns",
            server,
        )
        _ip("ip", "addr", "add", "10.213.0.1/30", "dev", f"{tag}a", ns=client)
        _ip("ip", "addr", "add", "10.213.0.2/30", "dev", f"{tag}b", ns=server)
        _ip("ip", "link", "set", f"{tag}a", "up", ns=client)
        _ip("ip", "link", "set", f"{tag}b", "up", ns=server)
        for ns in (client, server):
            _ip(
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.03",
                "-j",
                "DROP",
                ns=ns,
            )
        _ip(
            "tc",
            "qdisc",
            "add",
            "dev",
            f"{tag}b",
            "root",
            "tbf",
            "rate",
            "40mbit",
            "burst",
            "32kbit",
            "latency",
            "400ms",
            ns=server,
        )
        with processes() as procs:
            lb_ = Lab(tmp, procs)
            inside = ("ip", "netns", "exec", server)
            echo = 19300
            b = subprocess.Popen(
                [
                    *inside,
                    sys.executable,
                    "-m",
                    "tests.support.lab_backend",
                    "--name",
                    "b0",
                    "--echo",
                    f"127.0.0.1:{echo}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            procs.append(b)
            wait_for_line(b, "stdout", "ready")
            access = tmp / "access.log"  # (on a failure, l4lb's own word on the connection)
            group = (
                "  web:\n    listen: [10.213.0.2]\n    ports: [19380]\n"
                f"    access_log: {{path: {access}, format: json}}\n"
                f"    backends: [{{name: b0, address: 127.0.0.1, ports: {{19380: {echo}}}}}]\n"
            )
            _lb, _admin = lb_.l4lb(group, prefix=inside)
            data = os.urandom(size)
            digest = hashlib.sha256(data).hexdigest()
            script = (
                "import hashlib,socket,sys,threading\n"
                "s=socket.create_connection(('10.213.0.2',19380),timeout=60)\n"
                "f=s.makefile('rb'); f.readline()\n"
                f"data=open({str(tmp / 'payload')!r},'rb').read()\n"
                "t=threading.Thread(target=lambda:(s.sendall(data),s.shutdown(socket.SHUT_WR)))\n"
                "t.start(); got=b''\n"
                "while chunk:=f.read1(1<<20): got+=chunk\n"
                "t.join(); print(len(got), hashlib.sha256(got).hexdigest())\n"
            )
            (tmp / "payload").write_bytes(data)
            t0 = time.monotonic()
            out = subprocess.run(
                ["ip", "netns", "exec", client, sys.executable, "-c", script],
                capture_output=True,
                text=True,
                timeout=300,
            )
            took = time.monotonic() - t0
            got = out.stdout.split()
            exact = got == [str(size), digest]
            if not exact:  # (the connection's line is written when it ends: stop l4lb first)
                _lb.terminate()
                _lb.wait(15)
                line = access.read_text()[-600:] if access.exists() else "no connection log"
                out.stderr += f"; l4lb's connection log: {line}"
            row = Row(
                name,
                load,
                expect,
                f"{'exact' if exact else 'NOT exact: ' + out.stdout + out.stderr[-900:]}"
                f" in {took:.1f} s ({2 * size * 8 / took / 1e6:.1f} Mbit/s both ways)",
                exact,
            )
            return clean(lb_, row)
    finally:
        for ns in (client, server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ------------------------------------------------------------------ fuzzing


@experiment("fuzz-config")
def fuzz_config(tmp: Path, scale: Scale) -> Row:
    from tests.support.fuzz import fuzz_config_loader

    n = scale.pick(300, 5000)
    found = fuzz_config_loader(n)
    return Row(
        "fuzzing the config loader (hypothesis)",
        f"{n} generated and mutated configurations",
        "a ConfigError of FILE:LINE: lines, or a valid config; never another exception",
        "no failure" if found is None else f"failure: {found}",
        found is None,
    )


@experiment("fuzz-admin")
def fuzz_admin(tmp: Path, scale: Scale) -> Row:
    from tests.support.fuzz import fuzz_admin_api

    n = scale.pick(200, 3000)
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(2)]
        (port,) = free_ports(1)
        _lb, admin = lb_.l4lb(group_yaml(bs, [port], extra="persistence: {timeout: 10m}"))
        found = fuzz_admin_api(admin, port, n)
        row = Row(
            "fuzzing the admin API (hypothesis)",
            f"{n} generated requests (methods, paths, queries, bodies, tokens)",
            "never a 5xx; a refused request changes nothing",
            "no failure" if found is None else f"failure: {found}",
            found is None,
        )
        return clean(lb_, row)


# ------------------------------------------------------------------ the soak


def explain(
    log: Path, events: list[tuple[float, str]], failed_at: list[float], failures: list[str]
) -> None:
    """Print each failure beside the events before it and l4lb's log lines of its client."""
    if not failures or not log.exists():
        return
    import json
    from datetime import datetime

    offset = time.time() - time.monotonic()
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    by_client: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_client.setdefault(str(line.get("client", "")).rsplit(":", 1)[0], []).append(line)
    for t, f in sorted(zip(failed_at, failures, strict=True)):
        src = f.split(":", 1)[0]
        before = [f"{e} {t - at:.2f}s before" for at, e in events if 0 <= t - at < 12]
        wall = t + offset
        near = [
            {
                k: v
                for k, v in x.items()
                if k
                in (
                    "time",
                    "termination",
                    "backend",
                    "affinity",
                    "tries",
                    "bytes_in",
                    "bytes_out",
                    "event",
                )
            }
            for x in by_client.get(src, [])
            if abs(datetime.fromisoformat(str(x["time"]).replace("Z", "+00:00")).timestamp() - wall)
            < 3
        ]
        print(f"FAILURE {f} | after: {before[-3:]} | l4lb said: {near[-3:]}", file=sys.stderr)


def soak(tmp: Path, seconds: float) -> Row:
    """Churn for `seconds`: short and long connections, reloads, a backend killed and started
    again, admin calls. Descriptors and RSS, after a warm-up, must stay flat."""
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(3)]
        p1, p2 = free_ports(2)
        lb, admin = lb_.l4lb(
            group_yaml(
                bs,
                [p1, p2],
                extra=(
                    "persistence: {timeout: 30s, netmask: /24, max_entries: 5000}\n"
                    "health_check: {type: tcp, interval: 500ms, rise: 1, fall: 1}\nidle_timeout: 5s"
                ),
            ),
            # l4lb's own account of each connection: what a failed one met
            top=f"access_log: {{path: '{tmp}/access.log', format: json}}\n",
        )
        events: list[tuple[float, str]] = []
        cfg = lb_.config_path()
        text = cfg.read_text()
        clients = [source(i, 60) for i in range(3000)]
        samples: list[tuple[float, int, int]] = []
        kills: list[float] = []
        t0 = time.monotonic()
        with Load(p1, clients, threads=3) as load, Load(p2, clients[::7], threads=1) as load2:
            k = 0
            while time.monotonic() - t0 < seconds:
                time.sleep(1)
                k += 1
                samples.append((time.monotonic() - t0, rss_kib(lb.pid), fds(lb.pid)))
                if k % 10 == 0:
                    cfg.write_text(text.replace("timeout: 30s", f"timeout: {30 + k % 3}s"))
                    lb.send_signal(signal.SIGHUP)
                    events.append((time.monotonic(), "reload"))
                if k % 30 == 10:
                    victim = bs[(k // 30) % 3]
                    # (the time before the kill: a connection may fail while kill() waits)
                    kills.append(time.monotonic())
                    events.append((kills[-1], f"kill {victim.name}"))
                    victim.kill()
                if k % 30 == 20:
                    dead = bs[(k // 30) % 3]
                    fresh = lb_.backend(dead.name)
                    # the same ports again, as a restarted service would
                    for mode in ("echo", "stream", "sink"):
                        fresh.ports[mode] = dead.ports[mode]
                    fresh.kill()
                    argv = [sys.executable, "-m", "tests.support.lab_backend", "--name", dead.name]
                    for mode in ("echo", "stream", "sink"):
                        argv += [f"--{mode}", f"127.0.0.1:{dead.ports[mode]}"]
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                    lb_.procs.append(proc)
                    events.append((time.monotonic(), f"restart {dead.name}"))
                    wait_for_line(proc, "stdout", "ready")
                    events.append((time.monotonic(), f"ready {dead.name}"))
                    dead.proc = proc
                if k % 5 == 0:
                    metrics(admin)
        warm = [s for s in samples if s[0] >= min(30.0, seconds / 4)]
        first, last = warm[0], warm[-1]
        peak_rss = max(s[1] for s in warm)
        done = load.done + load2.done
        failed_at = load.failed_at + load2.failed_at
        failures = load.failures + load2.failures
        # A connection open on a backend that is killed fails; any other failure is a fault.
        away = [
            (t, f)
            for t, f in zip(failed_at, failures, strict=True)
            if not any(0 <= t - k < 2.0 for k in kills)
        ]
        unexplained = [f for _, f in away]
        explain(tmp / "access.log", events, [t for t, _ in away], unexplained)
        row = Row(
            "soak with churn",
            f"{seconds / 60:.0f} min: 4 client threads over 3,000 clients and 2 ports, a reload"
            " every 10 s, a backend killed and restarted every 30 s",
            "descriptors and RSS flat after the warm-up; no failure but in the 2 s after a"
            " backend's kill (the connections open on it)",
            f"{done:,} connections, {len(failed_at)} failed ({len(unexplained)} outside the 2 s"
            f" after a backend's kill); RSS"
            f" {first[1] / 1024:.1f} -> {last[1] / 1024:.1f} MiB (peak {peak_rss / 1024:.1f});"
            f" descriptors {first[2]} -> {last[2]}"
            + (f"; for example: {'; '.join(sorted(set(unexplained))[:3])}" if unexplained else ""),
            last[1] - first[1] < 4096 and last[2] - first[2] <= 10 and not unexplained,
        )
        return clean(lb_, row)


# ------------------------------------------------------------------ hostile peers, round two


def echo_once(port: int, src: str) -> str:
    """One connection from `src` through l4lb to a lab backend: its name, or the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0)) as s:
            f = s.makefile("rb")
            name = f.readline().strip().decode()
            s.sendall(b"ping")
            return name if f.read(4) == b"ping" else "no echo"
    except OSError as exc:
        return f"error: {exc}"


def admin_call(admin: int, method: str, path: str, head: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        data=b"{}" if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", **(head or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@experiment("worker-stopped", fast=False)
def worker_stopped(tmp: Path, scale: Scale) -> Row:
    import json

    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(2)]
        (port,) = free_ports(1)
        lb, admin = lb_.l4lb(
            group_yaml(
                bs, [port], extra="scheduler: rr\npersistence: {timeout: 10m, netmask: /24}"
            ),
            top="workers: 2\n",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/v1/workers", timeout=10) as r:
            pid1 = json.loads(r.read())["workers"][1]["pid"]
        os.kill(pid1, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_for_line(lb, "stderr", "worker 1 ready", timeout=20)
            replaced = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGCONT)
        served = [echo_once(port, f"127.{160 + n}.0.1") for n in range(40)]
        ok = sum(not name.startswith(("error", "no echo")) for name in served)
        cfg = lb_.config_path()
        cfg.write_text(cfg.read_text().replace("scheduler: rr", "scheduler: wlc"))
        status = admin_call(admin, "POST", "/api/v1/reload")
        restarts = metric(metrics(admin), "l4lb_worker_restarts_total", reason="unresponsive")
        row = Row(
            "a worker stopped (SIGSTOP)",
            "workers: 2, worker 1 SIGSTOPped; then 40 client /24s and a reload",
            "replaced within 5 s; every client network served; the next reload answered truthfully",
            f"replaced in {replaced:.1f} s (restarts unresponsive: {restarts:.0f}); {ok}/40"
            f" networks served; next reload: {status}",
            replaced < 5 and ok == 40 and status == 200 and restarts == 1,
        )
        return clean(lb_, row)


@experiment("store-lies")
def store_lies(tmp: Path, scale: Scale) -> Row:
    from tests.support.hostile import integers, liar

    n = scale.pick(100, 367)
    with lab(tmp) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(2)]
        port, store = free_ports(2)

        async def run() -> list[str]:
            async with liar(store, integers):
                lb_.l4lb(
                    group_yaml(bs, [port], extra="persistence: {timeout: 10m, netmask: /24}"),
                    top=f"affinity_store: {{url: 'redis://127.0.0.1:{store}', budget: 50ms}}\n",
                )
                loop = asyncio.get_running_loop()
                return [
                    await loop.run_in_executor(
                        None, echo_once, port, f"127.{180 + i // 256}.{i % 256}.1"
                    )
                    for i in range(n)
                ]

        served = asyncio.run(run())
        failed = [s for s in served if s.startswith(("error", "no echo"))]
        row = Row(
            "a store that answers integers",
            f"a fake Redis answering :1 to every command; {n} new clients",
            "every client served (the consistent hash); the store down; no traceback",
            f"{n - len(failed)}/{n} served",
            not failed,
        )
        return clean(lb_, row)


@experiment("state-file-corrupt")
def state_file_corrupt(tmp: Path, scale: Scale) -> Row:
    from tests.support.hostile import CORRUPT_STATE

    good = 0
    bad: list[str] = []
    for what, content in CORRUPT_STATE.items():
        with lab(tmp) as lb_:
            b = lb_.backend("a")
            (port,) = free_ports(1)
            (tmp / "pins.json").write_text(content, encoding="utf-8", errors="surrogateescape")
            _lb, admin = lb_.l4lb(
                group_yaml([b], [port], extra="persistence: {timeout: 10m, netmask: /24}"),
                top=f"state_file: '{tmp}/pins.json'\n",
            )
            served = echo_once(port, "127.0.170.1") == "a"
            listed = admin_call(admin, "GET", "/api/v1/affinity")
            if served and listed == 200 and not lb_.tracebacks():
                good += 1
            else:
                bad.append(what)
    return Row(
        "a corrupt state file",
        f"{len(CORRUPT_STATE)} files: nesting 100,000 deep, a 5,000-digit key, a list for a name,"
        " saved_at 'yesterday', keys -1, 2**40, 2**200, NaN, Infinity, bytes, ...",
        "l4lb starts and serves with each; GET /api/v1/affinity answers 200; no traceback",
        f"{good}/{len(CORRUPT_STATE)} started, served and answered"
        + (f"; not: {', '.join(bad)}" if bad else ""),
        good == len(CORRUPT_STATE),
    )


def raw_answer(port: int, head: bytes, src: str = "127.0.0.1") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0)) as s:
        s.sendall(head)
        data = s.recv(65536)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0


@experiment("admin-hostile")
def admin_hostile(tmp: Path, scale: Scale) -> Row:
    n = scale.pick(300, 1000)
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        _lb, admin = lb_.l4lb(group_yaml([b], [port]))
        bad = [
            b"POST /api/v1/reload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\r\n\r\n",
            b"GET /api/v1/groups HTTP/1.1\r\nHost: localhost\r\nX-Name: caf\xc3\xa9\r\n\r\n",
        ]
        statuses = [raw_answer(admin, bad[i % 2]) for i in range(n)]
        fives = sum(s >= 500 for s in statuses)
        slow = []
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", admin), source_address=("127.0.171.1", 0))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")
            slow.append(s)
        try:
            health = [
                raw_answer(
                    admin, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", "127.0.172.1"
                )
                for _ in range(5)
            ]
        finally:
            for s in slow:
                s.close()
        evil = raw_answer(admin, b"GET /api/v1/affinity HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        row = Row(
            "the admin listener, hostile",
            f"{n} requests with non-ASCII header values; 64 slow connections from one peer;"
            " a Host: evil.example",
            "no 5xx, no traceback; /healthz answered to a second peer throughout; the Host refused",
            f"{n - fives}/{n} answered 400/401 ({fives} 5xx); /healthz from another peer:"
            f" {health}; Host: evil.example: {evil}",
            fives == 0 and set(statuses) <= {400, 401} and health == [200] * 5 and evil == 403,
        )
        return clean(lb_, row)


@experiment("config-non-finite")
def config_non_finite(tmp: Path, scale: Scale) -> Row:
    keys = [
        "persistence: {timeout: V}",
        "health_check: {type: tcp, interval: V}",
        "connect_timeout: V",
    ]
    values = [".nan", ".inf", "-.inf", ".NaN"]
    refused = 0
    for key in keys:
        for v in values:
            cfg = tmp / "nan.yaml"
            cfg.write_text(
                "groups:\n  web:\n    ports: [80]\n    backends: [{name: a, address: 192.0.2.1}]\n"
                f"    {key.replace('V', v)}\n"
            )
            out = subprocess.run(
                [sys.executable, "-m", "l4lb", "check", "-c", str(cfg)],
                capture_output=True,
                text=True,
            )
            lines = out.stderr.strip().splitlines()
            refused += out.returncode == 1 and len(lines) == 1 and "not a finite number" in lines[0]
    n = len(keys) * len(values)
    return Row(
        "non-finite numbers in the configuration",
        f"{n} files: .nan, .inf, -.inf, .NaN as a timeout, an interval, a connect timeout",
        "each refused by l4lb check with one line",
        f"{refused}/{n} refused with one line",
        refused == n,
    )


@experiment("proxy-tlv")
def proxy_tlv(tmp: Path, scale: Scale) -> Row:
    import struct

    n = scale.pick(50, 500)
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        (port,) = free_ports(1)
        _lb, admin = lb_.l4lb(
            group_yaml([b], [port], extra="accept_proxy: {trusted: [127.0.0.0/8]}")
        )
        addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1111, 80)
        body = (
            addresses + b"\x01" + struct.pack("!H", 65535) + b"abc"
        )  # a TLV of 65,535 bytes, 3 sent
        header = (
            b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
        )
        resets = 0
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(header + b"hello")
                try:
                    conn.recv(100)  # (a FIN would be b"": not a reset)
                except ConnectionResetError:
                    resets += 1
        rejected = metric(
            metrics(admin), "l4lb_connections_failed_total", group="web", reason="rejected"
        )
        row = Row(
            "PROXY v2 TLVs that do not fit",
            f"{n} v2 headers whose TLV announces 65,535 bytes with 3 present",
            "each a reset before any byte reaches a backend, counted rejected",
            f"{resets}/{n} reset; rejected {rejected:.0f}",
            resets == n and rejected >= n,
        )
        return clean(lb_, row)


# ------------------------------------------------------------------ the edge (issue 24)


def forge(port: int, n: int, base: int, spread: int = 1) -> None:
    """n one-byte datagrams to `port`, each from an address of its own (source(i * spread),
    so spread 256 makes each a /24 of its own): sources anyone could forge. Each socket is
    closed once it has sent: nothing here answers."""
    for i in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source(i * spread, base), 0))
            s.sendto(b"x", ("127.0.0.1", port))


def settled(read: Callable[[], float], within: float = 10.0) -> float:
    """A counter of another process once it stops moving (unchanged for 0.3 s; polled, as
    another process's counters can only be)."""
    deadline = time.monotonic() + within
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = read()
        if now == last:
            break
        last = now
    return last


async def echo_all(port: int, sources: list[str]) -> list[str]:
    """Each source's greeting over TCP, at once ("" for a refused or reset one)."""

    async def one(src: str) -> str:
        try:
            r, w = await open_from(port, src, within=5)
            line = await asyncio.wait_for(r.readline(), 5)
            w.close()
            return line.decode().strip()
        except (ConnectionError, OSError, TimeoutError):
            return ""

    return list(await asyncio.gather(*(one(src) for src in sources)))


@experiment("udp-descriptors")
def udp_descriptors(tmp: Path, scale: Scale) -> Row:
    n = 4_100
    raise_nofile()
    with lab(tmp) as lb_:
        b = lb_.backend("b0")
        tcp, udp = free_ports(2)
        _lb, admin = lb_.l4lb(
            group_yaml([b], [tcp, f"{udp}/udp"]),
            prefix=("prlimit", "--nofile=4096:4096", "--"),
        )
        flooding = threading.Thread(target=forge, args=(udp, n, 60))
        t0 = time.monotonic()
        flooding.start()
        during = asyncio.run(echo_all(tcp, [source(i, 50) for i in range(20)]))
        flooding.join()
        took = time.monotonic() - t0
        after = asyncio.run(echo_all(tcp, [source(i, 51) for i in range(20)]))
        m = metrics(admin)
        flows = metric(m, "l4lb_udp_flows", group="web")
        opened = metric(m, "l4lb_udp_flows_opened_total", group="web")
        served = sum(x == "b0" for x in during), sum(x == "b0" for x in after)
        row = Row(
            "UDP flows and TCP share the descriptors",
            f"nofile 4,096; {n:,} one-byte datagrams from distinct sources ({took:.1f} s)",
            "20/20 TCP connections served during the flood and after; flows within their half",
            f"TCP {served[0]}/20 during, {served[1]}/20 after; {opened:,.0f} flows opened,"
            f" {flows:,.0f} open",
            served == (20, 20) and 0 < flows <= 2048,
        )
        return clean(lb_, row)


@experiment("forged-pins")
def forged_pins(tmp: Path, scale: Scale) -> Row:
    n = 3_000
    with lab(tmp) as lb_:
        bs = [lb_.backend("b0"), lb_.backend("b1")]
        tcp, udp = free_ports(2)
        _lb, admin = lb_.l4lb(
            group_yaml(
                bs,
                [tcp, f"{udp}/udp"],
                extra="persistence: {timeout: 10m, netmask: /24, max_entries: 2000}\nscheduler: rr",
            )
        )
        clients = [source(i << 8, 70) for i in range(5)]  # five /24s
        before = asyncio.run(echo_all(tcp, clients))
        forge(udp, n, 80, spread=256)
        opened = settled(lambda: metric(metrics(admin), "l4lb_udp_flows_opened_total", group="web"))
        after = asyncio.run(echo_all(tcp, clients))
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        unpinned = metric(metrics(admin), "l4lb_affinity_unpinned_total", group="web")
        row = Row(
            "forged UDP sources against TCP clients' pins",
            f"max_entries 2,000; 5 idle TCP clients; {n:,} single datagrams from {n:,} /24s",
            "0 of the 5 move: a forged flow's entry never evicts a confirmed pin",
            f"{moved}/5 moved; {opened:,.0f} flows opened, {unpinned:,.0f} of them unpinned",
            moved == 0 and "" not in before and opened >= 2000,
        )
        return clean(lb_, row)


@experiment("udp-loop")
def udp_loop(tmp: Path, scale: Scale) -> Row:
    with lab(tmp) as lb_:
        (udp,) = free_ports(1)
        lb, admin = lb_.l4lb(
            f"  web:\n    listen: [127.0.0.1]\n    ports: ['{udp}/udp']\n"
            "    backends: [{name: me, address: localhost}]\n"
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.9", 0))
            s.sendto(b"once", ("127.0.0.1", udp))
        deadline = time.monotonic() + 10
        while (
            metric(metrics(admin), "l4lb_udp_dropped_total", group="web", reason="looped") < 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.2)
        m = metrics(admin)
        loops = metric(m, "l4lb_udp_datagrams_total", group="web", direction="in")
        down = metric(m, "l4lb_backend_state", group="web", backend="me", state="down")
        t0, c0 = time.monotonic(), cpu_seconds(lb.pid)
        time.sleep(1.0)
        cpu = (cpu_seconds(lb.pid) - c0) / (time.monotonic() - t0)
        quiet = metric(metrics(admin), "l4lb_udp_datagrams_total", group="web", direction="in")
        row = Row(
            "a UDP backend that leads back to l4lb",
            "a backend named localhost with no port map; one datagram",
            "a handful of loops, the backend down, CPU idle within a second",
            f"{loops:.0f} datagrams in (then {quiet - loops:.0f} more); backend"
            f" {'down' if down else 'not down'}; CPU {cpu:.0%} the second after",
            loops <= 5 and quiet == loops and down == 1 and cpu < 0.05,
        )
        return clean(lb_, row)


@experiment("reflection")
def reflection(tmp: Path, scale: Scale) -> Row:
    n = scale.pick(20, 100)
    with lab(tmp) as lb_:
        b = lb_.backend("amp", udp_answers=10)
        (udp,) = free_ports(1)
        _lb, admin = lb_.l4lb(group_yaml([b], [f"{udp}/udp"]))
        got = 0
        for i in range(n):  # each the victim of a forged source: it never speaks again
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim:
                victim.bind((source(i, 90), 0))
                victim.settimeout(0.2)  # (the answers come within a ms; then silence)
                victim.sendto(b"q", ("127.0.0.1", udp))
                with contextlib.suppress(TimeoutError):
                    while victim.recv(100):
                        got += 1
        dropped = metric(
            metrics(admin), "l4lb_udp_dropped_total", group="web", reason="unvalidated"
        )
        row = Row(
            "reflection toward forged sources",
            f"{n} single datagrams, a backend answering each with 10",
            "at most 3 answers reach each source until it speaks again; the rest counted",
            f"{got / n:.1f} answers per source ({got}); {dropped:.0f} dropped as unvalidated",
            got <= 3 * n and got >= n and dropped >= 7 * n - 7,
        )
        return clean(lb_, row)


@experiment("table-scale", fast=False)
def table_scale_row(tmp: Path, scale: Scale) -> Row:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import table_scale  # bench/table_scale.py: make bench's row, the same measurement

    n = 1_000_000
    _, out = table_scale.run(n, shutil.which("redis-server") is not None)
    windows: dict[str, dict[str, float]] = out["windows"]  # type: ignore[assignment]
    worst_max = max(w["max_ms"] for w in windows.values())
    worst_p99 = max(w["p99_ms"] for w in windows.values())
    first = float(out["first_s"])  # type: ignore[arg-type]
    per_entry = float(out["rss_per_entry"])  # type: ignore[arg-type]
    return Row(
        "a million clients in the table",
        f"{n:,} pins in the state file; a save, listings of 100,000, a reconcile, reloads",
        "first connection within 1 s; relay max < 50 ms, p99 < 10 ms throughout; <= 150 B/entry",
        f"first connection {first:.2f} s; worst max {worst_max:.1f} ms, worst p99"
        f" {worst_p99:.1f} ms; {per_entry:.0f} B/entry",
        first < 1.0
        and worst_max < 50
        and worst_p99 < 10
        and per_entry <= 150
        and out.get("tracebacks") == 0,
    )


# ------------------------------------------------------------------ the table


def table(rows: list[Row]) -> str:
    head = ["experiment", "load", "expectation", "figure", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def run(names: list[str], fast: bool) -> list[Row]:
    rows = []
    for name in names:
        fn, _ = EXPERIMENTS[name]
        with tempfile.TemporaryDirectory(prefix=f"l4lb-{name}-") as tmp:
            t0 = time.monotonic()
            try:
                row = fn(Path(tmp), Scale(fast))
            except Exception as exc:  # a broken experiment is a failed row, not a stopped suite
                row = Row(name, "", "", f"the experiment raised {exc!r}", False)
            print(
                f"{'pass' if row.ok else 'FAIL'} {name} ({time.monotonic() - t0:.0f} s):"
                f" {row.figure}",
                file=sys.stderr,
                flush=True,
            )
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="the small loads of make test")
    ap.add_argument("--only", action="append", choices=sorted(EXPERIMENTS), help="run just these")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="run the soak instead")
    args = ap.parse_args()
    if args.soak:
        with tempfile.TemporaryDirectory(prefix="l4lb-soak-") as tmp:
            rows = [soak(Path(tmp), args.soak)]
    else:
        rows = run(args.only or list(EXPERIMENTS), args.fast)
    print(table(rows))
    passed = sum(r.ok for r in rows)
    print(f"{passed} passed, {len(rows) - passed} failed")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

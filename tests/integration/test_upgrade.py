"""Issue 35: upgrades that lose nothing. A real l4lb process, run from a copy of the package so
that the test can change the code it upgrades to, under load from real clients: new
connections from many /24s, long-lived echo connections, UDP flows and a large upload; then
SIGUSR2 (or POST /api/v1/upgrade), and what every client saw."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.helpers import free_ports, wait_until
from tests.support.procs import (
    ROOT,
    output,
    processes,
    redis_argv,
    start_backend,
    start_l4lb,
    wait_for_line,
)

NETS = 50  # client /24s of the new connections
LONG = 40  # long-lived echo connections
FLOWS = 20  # UDP flows
UPLOAD = 48 << 20  # bytes, checked by sha256
TOKEN = "t" * 32


@dataclass
class Site:
    cfg: Path
    code: Path  # the package copy l4lb runs from
    http: int
    echo: int
    udp: int
    admin: int


@contextlib.contextmanager
def site(tmp: Path, workers: int = 1) -> Iterator[tuple[Site, list[object]]]:
    """Two backends (HTTP names, TCP echo, UDP) and the configuration of a group over them
    (`workers` processes); the package copied to `tmp/code`."""
    http, echo, udp, admin, *bp = free_ports(10)
    code = tmp / "code"
    shutil.copytree(ROOT / "l4lb", code / "l4lb", ignore=shutil.ignore_patterns("__pycache__"))
    backends = "\n".join(
        f"      - {{name: b{i}, address: 127.0.0.1, ports: {{{http}: {bp[3 * i]},"
        f" {echo}: {bp[3 * i + 1]}, '{udp}/udp': {bp[3 * i + 2]}}}}}"
        for i in range(2)
    )
    cfg = tmp / "l4lb.yaml"
    (tmp / "token").write_text(TOKEN + "\n")
    cfg.write_text(
        (f"workers: {workers}\n" if workers > 1 else "")
        + f"admin: {{listen: '127.0.0.1:{admin}', token_file: {tmp / 'token'}}}\n"
        "groups:\n  shop:\n    listen: [127.0.0.1]\n"
        f"    ports: [{http}, {echo}, '{udp}/udp']\n"
        "    scheduler: rr\n    persistence: {timeout: 10m, netmask: /24}\n"
        f"    backends:\n{backends}\n"
    )
    with processes() as procs:
        for i in range(2):
            procs.append(
                start_backend(
                    f"b{i}",
                    http=f"127.0.0.1:{bp[3 * i]}",
                    echo=f"127.0.0.1:{bp[3 * i + 1]}",
                    udp=f"127.0.0.1:{bp[3 * i + 2]}",
                )
            )
        yield Site(cfg, code, http, echo, udp, admin), procs  # type: ignore[misc]


def set_version(code: Path, version: str) -> None:
    path = code / "l4lb" / "version.py"
    text = path.read_text()
    path.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))


def metrics(admin: int) -> str:
    try:
        return _metrics(admin)
    except urllib.error.HTTPError as exc:
        raise AssertionError(exc.read()) from None


def _metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        return str(r.read().decode())


def counter(text: str, name: str) -> float:
    """The sum of a metric's samples in a /metrics text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def post(admin: int, path: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=b"{}", method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Load:
    """What the clients saw."""

    served: dict[str, set[str]] = field(default_factory=dict)  # /24 -> backends that answered
    new_ok: int = 0
    new_failed: list[str] = field(default_factory=list)
    echoes: int = 0
    long_failed: list[str] = field(default_factory=list)
    worst_rtt: float = 0.0  # the longest echo round trip begun once the upgrade was asked for
    upgraded_at: float = 0.0  # (monotonic) when the upgrade was asked for
    datagrams: int = 0
    flows_failed: list[str] = field(default_factory=list)
    upload_ok: bool | None = None
    upload_error: str = ""
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def new_connections(load: Load, port: int, worker: int) -> None:
    """New HTTP connections one after another, each from a /24 of its own turn."""
    i = worker
    while not load.stop.is_set():
        net = f"127.0.{10 + i % NETS}"
        i += 8
        w = None
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"{net}.9", 0))
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            body = (await asyncio.wait_for(r.read(), 10)).split(b"\r\n\r\n", 1)[-1].strip()
            name = body.decode()
            if not name:
                raise ConnectionError("no answer")
            load.served.setdefault(net, set()).add(name)
            load.new_ok += 1
        except (OSError, TimeoutError, ConnectionError) as exc:
            load.new_failed.append(f"{net}: {exc!r}")
        finally:
            if w is not None:
                w.close()
        await asyncio.sleep(0.02)  # (8 workers: about 250 connections a second, no more)


async def long_lived(load: Load, port: int, n: int) -> None:
    """One connection for the whole test: a numbered line every 20 ms, echoed in order."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.70.{n + 1}", 0))
    seq = 0
    try:
        while not load.stop.is_set():
            t0 = time.monotonic()
            w.write(b"%d\n" % seq)
            got = await asyncio.wait_for(r.readline(), 10)
            if (
                load.upgraded_at and t0 >= load.upgraded_at
            ):  # (the upgrade's stall, not the start's)
                load.worst_rtt = max(load.worst_rtt, time.monotonic() - t0)
            if got != b"%d\n" % seq:
                raise ConnectionError(f"echo {got!r} for {seq}")
            load.echoes += 1
            seq += 1
            await asyncio.sleep(0.02)
    except (OSError, TimeoutError, ConnectionError) as exc:
        load.long_failed.append(f"{n}: {exc!r} after {seq}")
    w.close()


async def udp_flow(load: Load, port: int, n: int) -> None:
    """One client address and port: a datagram every 50 ms, each answered (a lost one is sent
    again, as a real client would, up to three times)."""
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((f"127.0.80.{n + 1}", 0))
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    seq = 0
    try:
        while not load.stop.is_set():
            payload = b"d%d" % seq
            for _ in range(3):
                await loop.sock_sendall(s, payload)
                try:
                    got = await asyncio.wait_for(loop.sock_recv(s, 2048), 1.0)
                except TimeoutError:
                    continue
                if got.endswith(b" " + payload):
                    break
            else:
                raise TimeoutError(f"datagram {seq} unanswered")
            load.datagrams += 1
            seq += 1
            await asyncio.sleep(0.05)
    except (OSError, TimeoutError) as exc:
        load.flows_failed.append(f"{n}: {exc!r}")
    s.close()


async def upload(load: Load, port: int) -> None:
    """48 MiB through the echo backend at about 12 MiB/s (so that it spans the upgrade), read
    back whole: the sha256 of what came back is that of what was sent."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.90.1", 0))
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def reader() -> int:
        n = 0
        while n < UPLOAD:
            chunk = await asyncio.wait_for(r.read(1 << 20), 30)
            if not chunk:
                break
            got.update(chunk)
            n += len(chunk)
        return n

    reading = asyncio.create_task(reader())
    try:
        for _ in range(UPLOAD // (256 << 10)):
            chunk = os.urandom(256 << 10)
            sent.update(chunk)
            w.write(chunk)
            await w.drain()
            await asyncio.sleep(0.02)
        w.write_eof()
        n = await reading
        load.upload_ok = n == UPLOAD and sent.digest() == got.digest()
    except (OSError, TimeoutError) as exc:  # (said by assert_nothing_lost, with the log)
        load.upload_ok = False
        load.upload_error = repr(exc)
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
    w.close()


def end_new_processes(tmp: Path) -> None:
    """End, by PID, the processes an upgrade in this test started (the old l4lb's children,
    which outlive it): their command line names this test's configuration; and their workers."""
    new = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--takeover-fd" in argv and str(tmp / "l4lb.yaml").encode() in argv:
            new.add(int(entry.name))
        elif b"worker" in argv and b"l4lb" in argv:  # a new worker, its supervisor killed
            with contextlib.suppress(OSError, IndexError):
                mine = str(tmp / "code").encode() in (entry / "environ").read_bytes()
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
                parent = Path(f"/proc/{fields[1]}/cmdline").read_bytes().split(b"\0")
                old = str(tmp / "l4lb.yaml").encode() in parent and b"--takeover-fd" not in parent
                if mine and not old:  # (the old tree's workers serve on)
                    new.add(int(entry.name))
    for pid in [*new, *(c for p in new for c in children(p))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def children(parent: int) -> list[int]:
    """The PIDs of `parent`'s children (its workers, for a supervisor)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            if int(fields[1]) == parent:
                out.append(int(entry.name))
    return out


def new_pid(lb: object) -> int:
    """The new process's PID, as the old one said it."""
    m = re.search(r"to process (\d+)", output(lb))  # type: ignore[arg-type]
    assert m is not None, output(lb)  # type: ignore[arg-type]
    return int(m.group(1))


async def run_load(s: Site, load: Load, during: object) -> None:
    tasks = [asyncio.create_task(new_connections(load, s.http, i)) for i in range(8)]
    tasks += [asyncio.create_task(long_lived(load, s.echo, n)) for n in range(LONG)]
    tasks += [asyncio.create_task(udp_flow(load, s.udp, n)) for n in range(FLOWS)]
    uploading = asyncio.create_task(upload(load, s.echo))
    await asyncio.sleep(1.5)
    await asyncio.to_thread(during)  # type: ignore[arg-type]
    await asyncio.sleep(2.0)
    await uploading
    load.stop.set()
    await asyncio.gather(*tasks)


def assert_nothing_lost(load: Load, lb: subprocess.Popen[str] | None = None) -> None:
    """What every client saw; if anything was lost, the l4lb log's tail says what it did."""
    try:
        _nothing_lost(load)
    except AssertionError:
        if lb is not None:
            tail = "\n".join(history(lb)[-150:])
            sys.stderr.write(f"l4lb's log (old and new process), last lines:\n{tail}\n")
        raise


def history(lb: subprocess.Popen[str]) -> list[str]:
    """The lines l4lb (and the processes it started, which share its stderr) wrote so far."""
    from tests.support import procs

    return list(procs._history.get((lb.pid, "stderr"), []))


def _nothing_lost(load: Load) -> None:
    assert load.new_failed == [], load.new_failed[:5]
    assert load.new_ok > 500
    assert load.long_failed == [] and load.echoes > LONG * 50, load.long_failed[:5]
    assert load.flows_failed == [] and load.datagrams > FLOWS * 30, load.flows_failed[:5]
    assert load.upload_ok is True, load.upload_error
    moved = {net: names for net, names in load.served.items() if len(names) > 1}
    assert moved == {}, moved  # every /24 on the backend it had


@pytest.mark.parametrize("to", ["this release", "a release that reads format 1 only"])
def test_an_upgrade_under_load_refuses_and_cuts_nothing(tmp_path: Path, to: str) -> None:
    """To this release, the connections move after the commit, in waves; to a release that
    reads only the first format (the previous one), everything moves before the commit."""
    with site(tmp_path) as (s, _procs):
        lb = start_l4lb(s.cfg, env={"PYTHONPATH": str(s.code)}, cwd=tmp_path)
        _procs.append(lb)
        load = Load()
        accepted: list[float] = []

        def upgrade() -> None:
            accepted.append(counter(metrics(s.admin), "l4lb_connections_accepted_total"))
            set_version(s.code, "0.1.0+upgraded")
            if to != "this release":
                form = s.code / "l4lb" / "runtime" / "handform.py"
                form.write_text(form.read_text().replace("READS = (1, 2)", "READS = (1,)"))
            load.upgraded_at = time.monotonic()
            lb.send_signal(signal.SIGUSR2)
            assert lb.wait(30) == 0  # the old process is gone: one l4lb left

        try:
            asyncio.run(run_load(s, load, upgrade))
            assert_nothing_lost(load, lb)
            said = re.search(r"upgrade: handed over .*", output(lb))
            assert said is not None, output(lb)[-2000:]
            assert ("in waves" in said.group(0)) == (to == "this release"), said.group(0)
            text = metrics(s.admin)
            # the totals count on (those the old process counted during the waves added)
            assert counter(text, "l4lb_connections_accepted_total") >= accepted[0] + 100
            assert 'l4lb_build_info{build="' in text and 'version="0.1.0+upgraded"' in text
            assert 'l4lb_upgrades_total{result="ok"} 1.0' in text
            assert load.worst_rtt < 2.0, (load.worst_rtt, output(lb)[-3000:])
            assert "Traceback" not in output(lb)
            new = new_pid(lb)
            assert os.kill(new, 0) is None  # the new one serves (no exception: it is alive)
            assert inheritable(new) == []  # (its next upgrade's process would keep copies)
        finally:
            end_new_processes(tmp_path)


@pytest.mark.parametrize(
    ("workers", "how"),
    [(1, "config"), (1, "import"), (1, "killed"), (2, "config"), (2, "killed"),
     (2, "killed resizing"), (1, "killed growing")],
)  # fmt: skip
def test_a_failed_upgrade_changes_nothing(tmp_path: Path, workers: int, how: str) -> None:
    """A broken configuration, an import error in the new code, the new process (a new worker,
    with `workers: 2`) killed mid-hand-over, also while the number of workers changes (2 to 3,
    one process to 2): the old process, or tree, serves every connection on, refuses nothing,
    says why."""
    with site(tmp_path, workers) as (s, procs):
        env = {"PYTHONPATH": str(s.code)}
        if how.startswith("killed"):
            env["L4LB_TEST_HANDOVER_STOP"] = "adopted"
        lb = start_l4lb(s.cfg, env=env, cwd=tmp_path)
        procs.append(lb)
        load = Load()
        answers: list[tuple[int, dict[str, object]]] = []

        def upgrade() -> None:
            text = s.cfg.read_text()
            if how == "config":
                s.cfg.write_text(text.replace("scheduler: rr", "scheduler: nope"))
            elif how == "killed growing":  # (one process to 2 workers)
                s.cfg.write_text("workers: 2\n" + text)
            elif how == "killed resizing":  # (to 3 workers: the group grows, then shrinks back)
                s.cfg.write_text(text.replace("workers: 2\n", "workers: 3\n"))
            elif how == "import":
                cli = s.code / "l4lb" / "cli.py"
                text = cli.read_text().replace(
                    "import argparse\n", "import argparse\nimport l4lb_no_such_module\n", 1
                )
                cli.write_text(text)
            load.upgraded_at = time.monotonic()
            if how.startswith("killed"):
                lb.send_signal(signal.SIGUSR2)
                # (the new process itself; with workers, one of the new supervisor's workers)
                tree = workers > 1 or how == "killed growing"
                os.kill(stopped_child(lb.pid, depth=2 if tree else 1), signal.SIGKILL)
            else:
                answers.append(post(s.admin, "/api/v1/upgrade"))

        try:
            asyncio.run(run_load(s, load, upgrade))
        finally:
            end_new_processes(tmp_path)
        assert_nothing_lost(load, lb)
        assert lb.poll() is None  # the old process (tree) serves on
        why = {
            "config": "scheduler",
            "import": "l4lb_no_such_module",
        }
        if how in why:
            status, body = answers[0]
            assert status == 503 and why[how] in str(body["error"]), body
        who = "l4lb.supervisor: " if workers > 1 else ""  # (not a worker's own line)
        said = wait_for_line(lb, "stderr", f"{who}upgrade failed; serving on", timeout=30)[-1]
        if how.startswith("killed"):
            killed = {"killed": "status -9" if workers == 1 else "worker"}
            assert killed.get(how, "went away" if workers == 1 else "worker") in said, said
        text = metrics(s.admin)
        ups = [x for x in text.splitlines() if x.startswith("l4lb_upgrades")]
        assert 'l4lb_upgrades_total{result="failed"} 1.0' in text, (ups, history(lb)[-30:])
        if workers > 1:
            assert f"l4lb_workers {workers}.0" in text


def stopped_child(parent: int, within: float = 30.0, depth: int = 1) -> int:
    """The PID of `parent`'s child (grandchild, at `depth` 2: a new supervisor's worker) once
    it has stopped itself (L4LB_TEST_HANDOVER_STOP)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        parents = {parent}
        for _ in range(depth - 1):
            parents = {c for p in parents for c in children(p)}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if fields[0] == "T" and int(fields[1]) in parents:
                return int(entry.name)
        time.sleep(0.02)
    raise AssertionError("the new process never got to its hand-over")


def test_an_http3_connection_opened_before_an_upgrade_answers_after_it(tmp_path: Path) -> None:
    """An aioquic HTTP/3 client's connection, opened before the upgrade, asks again after it:
    the same server answers on the same QUIC connection (its second request there: no new
    handshake) and path (the flow handed over with its socket)."""
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from tests.support.h3_client import H3Client

    port, admin, *bq = free_ports(4)
    code = tmp_path / "code"
    shutil.copytree(ROOT / "l4lb", code / "l4lb", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = tmp_path / "l4lb.yaml"
    (tmp_path / "token").write_text(TOKEN + "\n")
    backends = "\n".join(
        f"      - {{name: q{i}, address: 127.0.0.1, ports: {{'{port}/udp': {bq[i]}}}}}"
        for i in range(2)
    )
    cfg.write_text(
        f"admin: {{listen: '127.0.0.1:{admin}', token_file: {tmp_path / 'token'}}}\n"
        f"groups:\n  h3:\n    listen: [127.0.0.1]\n    ports: ['{port}/udp']\n"
        f"    persistence: {{timeout: 10m}}\n    backends:\n{backends}\n"
    )
    with processes() as procs:
        for i in range(2):
            argv = [sys.executable, "-m", "tests.support.quic_server", "--name", f"q{i}", "--h3"]
            argv += ["--quic", f"127.0.0.1:{bq[i]}", "--server-id", f"0{i}11"]
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            wait_for_line(proc, "stdout", "ready", timeout=30)
        lb = start_l4lb(cfg, env={"PYTHONPATH": str(code)}, cwd=tmp_path)
        procs.append(lb)

        async def run() -> tuple[bytes, bytes]:
            loop = asyncio.get_running_loop()
            config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
            config.server_name = "localhost"
            config.verify_mode = ssl.CERT_NONE
            transport, proto = await loop.create_datagram_endpoint(
                lambda: H3Client(QuicConnection(configuration=config)),
                local_addr=("127.0.95.1", 0),
            )
            try:
                proto.connect(("127.0.0.1", port))
                await asyncio.wait_for(proto.wait_connected(), 10)
                _, before = await asyncio.wait_for(proto.get(f"localhost:{port}", "/"), 10)
                set_version(code, "0.1.0+upgraded")
                lb.send_signal(signal.SIGUSR2)
                assert await asyncio.to_thread(lb.wait, 30) == 0
                _, after = await asyncio.wait_for(proto.get(f"localhost:{port}", "/"), 10)
                return before, after
            finally:
                proto.close()
                transport.close()

        try:
            before, after = asyncio.run(run())
            name, n, path = before.split()
            assert n == b"1", before
            # The same server, the same QUIC connection (no new handshake), on the same path
            # (the flow's socket to the server was handed over, not made anew).
            assert after.split() == [name, b"2", path], (before, after, output(lb)[-2000:])
            assert re.search(r"handed over .* 1 flows", output(lb)), output(lb)[-2000:]
        finally:
            end_new_processes(tmp_path)


def test_a_slow_dial_does_not_stall_the_connections_already_relaying(tmp_path: Path) -> None:
    """The freeze waits for a dial still in flight (here to a backend that drops SYNs, 1.5 s
    before the dial moves on to the next), and the connections already paired relay on
    meanwhile: stopped only once the dials are done, they pause for the hand-over alone, not
    for the dials. Every client, slow or not, is served through it."""
    port, good = free_ports(2)
    pit = socket.socket()
    pit.bind(("127.0.0.1", 0))
    pit.listen(0)
    filler = [socket.socket() for _ in range(3)]  # (the backlog full: SYNs are dropped)
    for f in filler:
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(pit.getsockname())
    code = tmp_path / "code"
    shutil.copytree(ROOT / "l4lb", code / "l4lb", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = tmp_path / "l4lb.yaml"
    cfg.write_text(
        f"groups:\n  slow:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
        "    scheduler: wrr\n    connect_timeout: 1500ms\n    passive: {failures: 1000}\n"
        "    backends:\n"
        f"      - {{name: pit, address: 127.0.0.1, weight: 100,"
        f" ports: {{{port}: {pit.getsockname()[1]}}}}}\n"
        f"      - {{name: b0, address: 127.0.0.1, weight: 1, ports: {{{port}: {good}}}}}\n"
    )
    load = Load()
    slow_ok: list[int] = []

    async def slow_clients() -> None:
        """A new client every 100 ms, each dialed to the pit first: a dial is always in
        flight. Each must get its echo."""

        async def one(n: int) -> None:
            w = None
            try:
                r, w = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(f"127.0.60.{n % 250 + 1}", 0)
                )
                w.write(b"s\n")
                if await asyncio.wait_for(r.readline(), 15) != b"s\n":
                    raise ConnectionError("no echo")
                slow_ok.append(n)
            except (OSError, TimeoutError, ConnectionError) as exc:
                load.new_failed.append(f"slow {n}: {exc!r}")
            finally:
                if w is not None:
                    w.close()

        started = []
        n = 0
        while not load.stop.is_set():
            started.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(0.1)
        await asyncio.gather(*started)

    async def run() -> None:
        relaying = [asyncio.create_task(long_lived(load, port, n)) for n in range(5)]
        slow = asyncio.create_task(slow_clients())
        # (each long-lived one past the pit, paired and echoing)
        await wait_until(lambda: load.echoes >= 5 * 10, within=20)
        load.upgraded_at = time.monotonic()
        lb.send_signal(signal.SIGUSR2)
        assert await asyncio.to_thread(lb.wait, 30) == 0
        await asyncio.sleep(2.0)
        load.stop.set()
        await asyncio.gather(slow, *relaying)

    with processes() as procs:
        procs.append(start_backend("b0", echo=f"127.0.0.1:{good}"))
        lb = start_l4lb(cfg, env={"PYTHONPATH": str(code)}, cwd=tmp_path)
        procs.append(lb)
        try:
            asyncio.run(asyncio.wait_for(run(), 60))
            said = re.search(r"clients paused \d+ ms: flushing (\d+)", output(lb))
            assert said is not None, output(lb)[-2000:]
            waited = int(said.group(1)) / 1000
            assert load.new_failed == [] and load.long_failed == [], (
                load.new_failed[:5],
                load.long_failed[:5],
            )
            assert len(slow_ok) > 20
            assert waited >= 0.3, output(lb)[-2000:]  # a dial was in flight, and waited for
            # Stopped for the whole wait, a long-lived connection's round trip would be as long
            assert load.worst_rtt < waited / 2, (load.worst_rtt, waited)
        finally:
            end_new_processes(tmp_path)
            pit.close()
            for f in filler:
                f.close()


def test_a_new_process_killed_during_the_waves_leaves_the_old_one_serving(tmp_path: Path) -> None:
    """The new process serves, then dies (SIGKILL) at its first wave of connections, before it
    has adopted any: the old process serves on, every long-lived connection, flow and the
    upload with it (the wave it had frozen thaws). What the dead process served in the moment
    it served (a new client or two) went with it."""
    with site(tmp_path) as (s, procs):
        env = {"PYTHONPATH": str(s.code), "L4LB_TEST_HANDOVER_STOP": "wave"}
        lb = start_l4lb(s.cfg, env=env, cwd=tmp_path)
        procs.append(lb)
        load = Load()

        def upgrade() -> None:
            load.upgraded_at = time.monotonic()
            lb.send_signal(signal.SIGUSR2)
            os.kill(stopped_child(lb.pid), signal.SIGKILL)

        try:
            asyncio.run(run_load(s, load, upgrade))
        finally:
            end_new_processes(tmp_path)
        assert load.long_failed == [] and load.echoes > LONG * 50, load.long_failed[:5]
        assert load.flows_failed == [], load.flows_failed[:5]
        assert load.upload_ok is True
        assert len(load.new_failed) <= 5, load.new_failed
        assert lb.poll() is None  # the old process serves on
        said = wait_for_line(lb, "stderr", "upgrade failed; serving on", timeout=30)[-1]
        assert "status -9" in said and "during the waves" in said, said
        assert 'l4lb_upgrades_total{result="failed"} 1.0' in metrics(s.admin)


@pytest.mark.parametrize(("n", "m"), [(2, 2), (2, 3), (3, 2), (1, 2), (2, 1)])
def test_an_upgrade_of_workers_under_load_refuses_and_cuts_nothing(
    tmp_path: Path, n: int, m: int
) -> None:
    """`workers: N`: the whole tree is replaced, each worker handing over to its successor on
    the same sockets; nothing refused or cut, every /24 on its backend, one tree left. The
    same when the upgrade's configuration changes `workers` to M (the group grows, or its
    last sockets retire, and every pin and flow goes to the worker the kernel now steers
    its client to); from one process to workers (it hands itself over as a tree of one), and
    from workers to `workers: 1` (a supervisor of one worker, until a restart)."""
    with site(tmp_path, workers=n) as (s, _procs):
        lb = start_l4lb(s.cfg, env={"PYTHONPATH": str(s.code)}, cwd=tmp_path)
        _procs.append(lb)
        load = Load()
        old_workers: list[int] = []

        def upgrade() -> None:
            old_workers.extend(children(lb.pid))
            set_version(s.code, "0.1.0+upgraded")
            text = re.sub(r"(?m)^workers: \d+\n", "", s.cfg.read_text())
            s.cfg.write_text((f"workers: {m}\n" if m > 1 else "") + text)
            load.upgraded_at = time.monotonic()
            lb.send_signal(signal.SIGUSR2)
            assert lb.wait(30) == 0  # the old supervisor is gone, its workers before it

        try:
            asyncio.run(run_load(s, load, upgrade))
            assert_nothing_lost(load, lb)
            who = "l4lb.supervisor" if n > 1 else "l4lb.server"  # (not a worker's own line)
            line = wait_for_line(lb, "stderr", f"INFO {who}: upgrade: handed over", timeout=10)[-1]
            said = re.search(r"upgrade: handed over .*", line)
            assert said is not None, line
            assert said.group(0).count("in waves") == n, said.group(0)
            assert len(old_workers) == (n if n > 1 else 0)
            for pid in old_workers:
                assert not Path(f"/proc/{pid}").exists() or "Z" in stat_of(pid), pid
            text = metrics(s.admin)
            assert 'version="0.1.0+upgraded"' in text
            assert 'l4lb_upgrades_total{result="ok"} 1.0' in text
            assert f"l4lb_workers {m}.0" in text
            # every UDP flow kept its socket (its datagrams queued on the old steering's
            # socket sent on by it too): none opened anew, so its backend saw one source port
            opened = [x for x in text.splitlines() if x.startswith("l4lb_udp_flows")]
            assert counter(text, "l4lb_udp_flows_opened") == FLOWS, opened
            assert "Traceback" not in output(lb)
            new = re.search(r"to process (\d+)", said.group(0))
            assert new is not None and len(children(int(new.group(1)))) == m  # its workers
            for pid in [int(new.group(1)), *children(int(new.group(1)))]:
                assert inheritable(pid) == [], pid
        finally:
            end_new_processes(tmp_path)


def inheritable(pid: int) -> list[str]:
    """`pid`'s sockets that a process it starts would inherit (not close-on-exec): each one
    a connection or listener that would never close while that child lives."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            flags = int((Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().split()[3], 8)
            if int(fd.name) > 2 and not flags & 0o2000000 and "socket" in os.readlink(fd):
                out.append(fd.name)
    return out


def stat_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_moving_the_admin_api_and_adding_a_store_take_an_upgrade_and_lose_nothing(
    tmp_path: Path,
) -> None:
    """What a reload cannot change (the admin section, `affinity_store`) an upgrade does, under
    load, losing nothing: the API answers on its new address only, pins go to the store."""
    redis_port, admin2 = free_ports(2)
    store = subprocess.Popen(redis_argv(redis_port), stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(store, "stdout", "Ready to accept connections")
        with site(tmp_path) as (s, procs):
            lb = start_l4lb(s.cfg, env={"PYTHONPATH": str(s.code)}, cwd=tmp_path)
            procs.append(lb)
            load = Load()

            def upgrade() -> None:
                text = s.cfg.read_text().replace(f"127.0.0.1:{s.admin}'", f"127.0.0.1:{admin2}'")
                s.cfg.write_text(
                    f"affinity_store: {{type: redis, url: 'redis://127.0.0.1:{redis_port}/0',"
                    " key_prefix: 'up:', budget: 1s}\n" + text
                )
                load.upgraded_at = time.monotonic()
                lb.send_signal(signal.SIGUSR2)
                assert lb.wait(30) == 0

            try:
                asyncio.run(run_load(s, load, upgrade))
                assert_nothing_lost(load, lb)
                assert 'l4lb_upgrades_total{result="ok"} 1.0' in metrics(admin2)
                with pytest.raises(urllib.error.URLError):
                    metrics(s.admin)  # (refused: nobody listens there any more)
                keys = subprocess.run(
                    ["redis-cli", "-p", str(redis_port), "--scan", "--pattern", "up:*"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                assert keys, "no pin reached the store"
            finally:
                end_new_processes(tmp_path)
    finally:
        store.terminate()
        store.wait(10)
        if store.stdout is not None:
            store.stdout.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_process_started_apart_takes_over_through_the_handover_socket(
    tmp_path: Path, workers: int
) -> None:
    """The edge container's recipe without the containers: the new l4lb is not the old one's
    child but asks on the old one's `--handover-socket` (`--take-over`), under load; nothing
    lost, the old one exits, and the new one listens there for the next."""
    with site(tmp_path, workers=workers) as (s, procs):
        door = str(tmp_path / "handover.sock")
        env = {"PYTHONPATH": str(s.code)}
        lb = start_l4lb(s.cfg, "--handover-socket", door, env=env, cwd=tmp_path)
        procs.append(lb)
        wait_for_line(lb, "stderr", "may take over")
        load = Load()
        started: list[subprocess.Popen[str]] = []

        def take_over() -> None:
            set_version(s.code, "0.1.0+apart")
            load.upgraded_at = time.monotonic()
            new = start_l4lb(s.cfg, "--handover-socket", door, "--take-over", door, env=env,
                             cwd=tmp_path)  # fmt: skip
            procs.append(new)
            started.append(new)
            assert lb.wait(30) == 0  # the old one is gone: one l4lb left

        asyncio.run(run_load(s, load, take_over))
        assert_nothing_lost(load, lb)
        assert re.search(r"upgrade: handed over .*", output(lb)), output(lb)[-2000:]
        text = metrics(s.admin)
        assert 'version="0.1.0+apart"' in text and 'l4lb_upgrades_total{result="ok"} 1.0' in text
        new = started[0]
        wait_for_line(new, "stderr", "may take over")  # (the socket is the new one's now)
        assert os.stat(door).st_mode & 0o777 == 0o600

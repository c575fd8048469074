"""An upgrade under load, l4lb against HAProxy, from one run (`make bench`'s upgrade rows):
l4lb gets SIGUSR2 (it hands everything to a new process and exits; with `workers: 2`, a new
supervisor and each worker to its successor, the whole tree), HAProxy 2.x in master-worker
mode gets SIGUSR2 (a new worker; the old one keeps its connections until they end). The same
load on each: new HTTP connections from 50 /24s (about 400 a second), 40 long-lived echo
connections probed every 20 ms, for 6 s around the upgrade.

    .venv/bin/python bench/upgrade_vs.py [--json FILE]

What it prints, per proxy: new connections failed, long-lived connections cut, the longest
round trip of a long-lived connection begun after the upgrade was asked for, the seconds until
one serving process remained (l4lb with workers: one supervisor and its workers; HAProxy: its
master aside; "-" if the old worker outlived the run), and the peak RSS of the proxy's
processes meanwhile against their RSS before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from upgrade_bench import free_ports, rss_kib  # noqa: E402

NETS = 50
NEW_WORKERS = 16  # each a connection every 40 ms at best: about 400 a second
LONG = 40
BEFORE, AFTER = 2.0, 4.0  # seconds of load before the upgrade and after it

BACKEND = """
import asyncio, sys, uvloop
name = sys.argv[1].encode()
async def http(r, w):
    await r.readuntil(b"\\r\\n\\r\\n")
    w.write(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(name), name))
    await w.drain()
    w.close()
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main(h, e):
    await asyncio.start_server(http, "127.0.0.1", h, backlog=4096)
    await asyncio.start_server(echo, "127.0.0.1", e, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main(int(sys.argv[2]), int(sys.argv[3])))
"""


@dataclass
class Seen:
    new_ok: int = 0
    new_failed: int = 0
    cut: int = 0
    worst_ms: float = 0.0
    one_process_s: float | None = None
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    upgraded_at: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def new_connections(seen: Seen, port: int, i: int) -> None:
    while not seen.stop.is_set():
        net = f"127.0.{10 + i % NETS}"
        i += NEW_WORKERS
        w = None
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"{net}.9", 0))
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            body = (await asyncio.wait_for(r.read(), 10)).split(b"\r\n\r\n", 1)[-1]
            if not body:
                raise ConnectionError("no answer")
            seen.new_ok += 1
        except (OSError, TimeoutError, ConnectionError):
            seen.new_failed += 1
        finally:
            if w is not None:
                w.close()
        await asyncio.sleep(0.04)


async def long_lived(seen: Seen, port: int, n: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.70.{n + 1}", 0))
    seq = 0
    try:
        while not seen.stop.is_set():
            t0 = time.monotonic()
            w.write(b"%d\n" % seq)
            if await asyncio.wait_for(r.readline(), 10) != b"%d\n" % seq:
                raise ConnectionError("out of order")
            if seen.upgraded_at and t0 >= seen.upgraded_at:
                seen.worst_ms = max(seen.worst_ms, (time.monotonic() - t0) * 1000)
            seq += 1
            await asyncio.sleep(0.02)
    except (OSError, TimeoutError, ConnectionError):
        seen.cut += 1
    w.close()


class Proxy:
    """A proxy under test: its processes, its upgrade, and how many serve."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def upgrade(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def serving(self) -> int:
        raise NotImplementedError

    def end(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


class L4lb(Proxy):
    """The l4lb process and, after an upgrade, the one it handed over to (its child, which
    outlives it: found by the configuration named on its command line)."""

    def __init__(self, proc: subprocess.Popen[bytes], cfg: Path, name: str = "l4lb") -> None:
        super().__init__(name, proc)
        self.cfg = str(cfg).encode()

    def pids(self) -> list[int]:
        """Every l4lb process: the supervisors' workers too (for RSS)."""
        tops = self.tops()
        return tops + [c for p in tops for c in children(p)]

    def tops(self) -> list[int]:
        """The processes started as `l4lb run` (a single process, or a supervisor)."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if self.cfg in argv and b"l4lb" in argv:
                    out.append(int(entry.name))
        return out

    def serving(self) -> int:
        return len(self.tops())


class Resized(L4lb):
    """l4lb whose upgrade also changes `workers` (the configuration edited, then SIGUSR2)."""

    def __init__(self, proc: subprocess.Popen[bytes], cfg: Path, name: str, to: int) -> None:
        super().__init__(proc, cfg, name)
        self.path, self.to = cfg, to

    def upgrade(self) -> None:
        text = re.sub(r"(?m)^workers: \d+$", f"workers: {self.to}", self.path.read_text())
        self.path.write_text(text)
        super().upgrade()


class Haproxy(Proxy):
    """HAProxy's master (not counted as serving) and its workers."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__("haproxy", proc)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def serving(self) -> int:
        return len(children(self.proc.pid))


def rss_mib(proxy: Proxy) -> float:
    total = 0
    for pid in proxy.pids():
        with contextlib.suppress(OSError):
            total += rss_kib(pid)
    return total / 1024


async def run_load(proxy: Proxy, http: int, echo: int) -> Seen:
    seen = Seen()
    seen.rss_before_mib = rss_mib(proxy)
    tasks = [asyncio.create_task(new_connections(seen, http, i)) for i in range(NEW_WORKERS)]
    tasks += [asyncio.create_task(long_lived(seen, echo, n)) for n in range(LONG)]
    await asyncio.sleep(BEFORE)
    seen.upgraded_at = time.monotonic()
    proxy.upgrade()
    end = seen.upgraded_at + AFTER
    went_to_two = False
    while time.monotonic() < end:
        seen.rss_peak_mib = max(seen.rss_peak_mib, rss_mib(proxy))
        n = proxy.serving()
        went_to_two = went_to_two or n > 1
        if went_to_two and n == 1 and seen.one_process_s is None:
            seen.one_process_s = time.monotonic() - seen.upgraded_at
        await asyncio.sleep(0.05)
    seen.stop.set()
    await asyncio.gather(*tasks)
    seen.rss_after_mib = rss_mib(proxy)
    return seen


def start(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload, no-any-return]


def wait_listening(port: int, within: float = 30.0) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def l4lb(tmp: Path, http: int, echo: int, bp: list[int], workers: int = 1, to: int = 0) -> Proxy:
    cfg = tmp / f"l4lb{workers}{to}.yaml"
    rows = "\n".join(
        f"      - {{name: b{i}, address: 127.0.0.1,"
        f" ports: {{{http}: {bp[2 * i]}, {echo}: {bp[2 * i + 1]}}}}}"
        for i in range(2)
    )
    cfg.write_text(
        f"workers: {workers}\n"
        f"groups:\n  shop:\n    listen: [127.0.0.1]\n    ports: [{http}, {echo}]\n"
        f"    persistence: {{timeout: 10m, netmask: /24}}\n    backends:\n{rows}\n"
    )
    name = "l4lb" if workers == 1 else f"l4lb {workers} workers"
    proc = start([sys.executable, "-m", "l4lb", "run", "-c", str(cfg)], cwd=ROOT)
    if to:
        return Resized(proc, cfg, f"l4lb {workers} -> {to} workers", to)
    return L4lb(proc, cfg, name)


def l4lb_workers(tmp: Path, http: int, echo: int, bp: list[int]) -> Proxy:
    """The same with `workers: 2`: the whole tree replaced, worker by worker."""
    return l4lb(tmp, http, echo, bp, workers=2)


def l4lb_resized(tmp: Path, http: int, echo: int, bp: list[int]) -> Proxy:
    """`workers: 2` upgraded to 3: the group grows, every pin dealt out again."""
    return l4lb(tmp, http, echo, bp, workers=2, to=3)


def haproxy(tmp: Path, http: int, echo: int, bp: list[int]) -> Proxy:
    """HAProxy in master-worker mode (-W), as its systemd unit runs it; `balance source` for
    its stickiness (a client address to a server, as l4lb's pins)."""
    text = (
        "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 2s\n"
        "  timeout client 15m\n  timeout server 15m\n"
    )
    for name, port, k in (("http", http, 0), ("echo", echo, 1)):
        text += f"listen {name}\n  bind 127.0.0.1:{port}\n  balance source\n"
        text += "".join(f"  server b{i} 127.0.0.1:{bp[2 * i + k]}\n" for i in range(2))
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(text)
    return Haproxy(start(["haproxy", "-W", "-db", "-f", str(cfg)]))


def bench(tmp: Path) -> dict[str, Seen]:
    (*bp,) = free_ports(4)
    backends = [
        start([sys.executable, "-c", BACKEND, f"b{i}", str(bp[2 * i]), str(bp[2 * i + 1])])
        for i in range(2)
    ]
    out: dict[str, Seen] = {}
    try:
        for b in backends:
            assert b.stdout is not None and b.stdout.readline().strip() == b"ready"
        makers = [l4lb, l4lb_workers, l4lb_resized]
        makers += [haproxy] if shutil.which("haproxy") else []
        for make in makers:
            http, echo = free_ports(2)
            proxy = make(tmp, http, echo, bp)
            try:
                wait_listening(echo)
                out[proxy.name] = asyncio.run(run_load(proxy, http, echo))
            finally:
                proxy.end()
    finally:
        for b in backends:
            b.terminate()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4lb-upgrade-vs-") as tmp:
        out = bench(Path(tmp))
    print(
        f"{'upgrade under load':30} {'new failed':>14} {'cut':>7} {'worst RTT':>10}"
        f" {'one process':>12} {'RSS before/peak/after':>22}"
    )
    for name, s in out.items():
        one = f"{s.one_process_s:.1f} s" if s.one_process_s is not None else f"> {AFTER:.0f} s"
        print(
            f"{name + ' (SIGUSR2)':30} {s.new_failed:>5} of {s.new_ok + s.new_failed:<6,}"
            f" {s.cut:>3} of {LONG} {s.worst_ms:>7.0f} ms {one:>12}"
            f" {s.rss_before_mib:>6.0f}/{s.rss_peak_mib:.0f}/{s.rss_after_mib:.0f} MiB"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {k: {f: v for f, v in asdict(s).items() if f != "stop"} for k, s in out.items()}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

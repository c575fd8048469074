"""`make bench`: l4lb side by side with HAProxy, nginx and a direct connection, on this machine.

    .venv/bin/python bench/bench.py [--quick] [--rounds N] [--seconds S]

Every target gets the same job: two listening ports sharing one client->backend pin (HAProxy:
`stick on src` in a backend shared by two frontends; nginx stream: `hash $remote_addr
consistent`; l4lb: one group, persistence on), two HTTP backends (an nginx), and a bulk port to an
iperf3 server. The load generator and the backends run on core 0, the proxy alone on core 1
(taskset). Targets run interleaved over several rounds; the table shows medians with min-max and
the ratios to HAProxy and to direct. Before each measurement the machine must be quiet (less than
15% CPU busy over half a second); a run that was not is marked with '!'.

Measured: new connections per second (wrk, `Connection: close`), small keepalive requests per
second with p50/p99 latency (wrk), bulk Gbit/s (iperf3, one stream), the proxy's CPU per new
connection and per GiB (from /proc), and its RSS with 50 and 5,000 idle connections; l4lb as
built (compiled by `make native` where it can be) and as pure Python (`l4lb-pure`), with issue
26's targets and each build's gap, and the instructions a connection costs each (callgrind,
beside the bare relay's). Then the
UDP table (bench/udp_bench.py): datagrams and new flows per second against nginx's stream
module and direct, and the memory per idle flow. Last, the table-scale row (bench/table_scale.py):
a million pins, the start, the bytes per entry and the relay's latency while the table is walked.
Everything binds 127.0.0.1; every process started here is ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.procs import wait_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# l4lb: the build `make native` made (compiled where it can be); l4lb-pure: the same source as
# pure Python (L4LB_PURE=1), so the two builds stand side by side in one run.
TARGETS = ("direct", "haproxy", "nginx", "bare", "l4lb", "l4lb-pure", "l4lb-log", "l4lb-auto")
TOOLS = ("haproxy", "nginx", "wrk", "iperf3", "taskset")
LOAD_CORE, PROXY_CORE = "0", "1"


def nginx_stream_head(tmp: Path, name: str, nofile: int, connections: int) -> str:
    """The top of an nginx stream configuration: one worker in the foreground, its pid and
    error log in `tmp` under `name`, the stream module loaded."""
    return f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1; daemon off; master_process off; pid {tmp}/{name}.pid; error_log {tmp}/{name}.err;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
"""


def haproxy_head(threads: int) -> str:
    """HAProxy's global and defaults sections, the same for every benchmark."""
    return f"""
global
  nbthread {threads}
  maxconn 9000
defaults
  mode tcp
  timeout connect 2s
  timeout client 15m
  timeout server 15m"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def busy_fraction(window: float = 0.5) -> float:
    def snap() -> tuple[int, int]:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = parts[3] + parts[4]
        return sum(parts), idle

    t1, i1 = snap()
    time.sleep(window)
    t2, i2 = snap()
    return 1 - (i2 - i1) / max(1, t2 - t1)


@dataclass
class Proxy:
    """A running target: where to send load, and which PIDs to measure."""

    name: str
    http: int  # the first of the two pinned ports
    bulk: int
    pids: list[int] = field(default_factory=list)


class Spawner:
    """Processes started on a core by `spawn`, each ended by its PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, argv: list[str], core: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.tmp,
            env={**os.environ, **(env or {})},
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        self.stop_pids([p.pid for p in self.procs])

    def stop_pids(self, pids: list[int]) -> None:
        mine = [p for p in self.procs if p.pid in pids]
        for p in mine:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in mine:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Bench(Spawner):
    def __init__(self, tmp: Path, seconds: float) -> None:
        super().__init__(tmp)
        self.seconds = seconds
        (
            self.b1,
            self.b2,
            self.iperf,
            self.h_http,
            self.h_http2,
            self.h_bulk,
            self.n_http,
            self.n_http2,
            self.n_bulk,
            self.l_http,
            self.l_http2,
            self.l_bulk,
        ) = free_ports(12)

    # ------------------------------------------------------------------ the backends

    def start_backends(self) -> None:
        conf = self.tmp / "backends.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; pid {self.tmp}/backends.pid; error_log {self.tmp}/backends.err;
events {{ worker_connections 12000; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.b1} backlog=4096; location / {{ return 200 "b1\\n"; }} }}
  server {{ listen 127.0.0.1:{self.b2} backlog=4096; location / {{ return 200 "b2\\n"; }} }}
}}
""")
        self.spawn(["nginx", "-p", str(self.tmp), "-c", str(conf)], LOAD_CORE)
        self.spawn(["iperf3", "-s", "-p", str(self.iperf), "--bind", "127.0.0.1"], LOAD_CORE)
        for port in (self.b1, self.b2, self.iperf):
            wait_port(port)

    # ------------------------------------------------------------------ the targets

    def start(self, name: str) -> Proxy:
        if name == "l4lb-auto":
            return self._l4lb(relay="auto")
        if name == "l4lb-log":  # the connection log on (JSON, to a file): what it costs
            return self._l4lb(log=True)
        if name == "l4lb-pure":
            return self._l4lb(pure=True)
        return {
            "direct": self._direct,
            "haproxy": self._haproxy,
            "nginx": self._nginx,
            "bare": self._bare,
            "l4lb": self._l4lb,
        }[name]()

    def _bare(self) -> Proxy:
        """bench/bare_relay.py on l4lb's ports: the same loop with nothing of l4lb's."""
        p = self.spawn(
            [
                sys.executable,
                str(ROOT / "bench" / "bare_relay.py"),
                f"{self.l_http}:{self.b1},{self.b2}",
                f"{self.l_http2}:{self.b1},{self.b2}",
                f"{self.l_bulk}:{self.iperf}",
            ],
            PROXY_CORE,
        )
        wait_port(self.l_http)
        return Proxy("bare", self.l_http, self.l_bulk, [p.pid])

    def _direct(self) -> Proxy:
        return Proxy("direct", self.b1, self.iperf)

    def _haproxy(self) -> Proxy:
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(
            haproxy_head(1)
            + f"""
frontend web1
  bind 127.0.0.1:{self.h_http} backlog 4096
  default_backend web
frontend web2
  bind 127.0.0.1:{self.h_http2} backlog 4096
  default_backend web
frontend bulk
  bind 127.0.0.1:{self.h_bulk}
  default_backend bulk
backend web
  balance roundrobin
  stick-table type ip size 1m expire 5m
  stick on src
  server b1 127.0.0.1:{self.b1}
  server b2 127.0.0.1:{self.b2}
backend bulk
  server i 127.0.0.1:{self.iperf}
"""
        )
        p = self.spawn(["haproxy", "-db", "-f", str(conf)], PROXY_CORE)
        wait_port(self.h_http)
        return Proxy("haproxy", self.h_http, self.h_bulk, [p.pid])

    def _nginx(self) -> Proxy:
        conf = self.tmp / "nginx-stream.conf"
        conf.write_text(f"""{nginx_stream_head(self.tmp, "stream", 19000, 12000)}
stream {{
  upstream web {{ hash $remote_addr consistent; server 127.0.0.1:{self.b1}; server 127.0.0.1:{self.b2}; }}
  server {{ listen 127.0.0.1:{self.n_http} backlog=4096; proxy_pass web; proxy_timeout 15m; }}
  server {{ listen 127.0.0.1:{self.n_http2} backlog=4096; proxy_pass web; proxy_timeout 15m; }}
  server {{ listen 127.0.0.1:{self.n_bulk}; proxy_pass 127.0.0.1:{self.iperf}; proxy_timeout 15m; }}
}}
""")
        p = self.spawn(["nginx", "-p", str(self.tmp), "-c", str(conf)], PROXY_CORE)
        wait_port(self.n_http)
        return Proxy("nginx", self.n_http, self.n_bulk, [p.pid])

    def _l4lb(self, relay: str = "copy", log: bool = False, pure: bool = False) -> Proxy:
        conf = self.tmp / "l4lb.yaml"
        top = f"access_log: {{path: {self.tmp / 'access.log'}, format: json}}\n" if log else ""
        conf.write_text(f"""{top}
groups:
  web:
    listen: [127.0.0.1]
    ports: [{self.l_http}, {self.l_http2}, {self.l_bulk}]
    scheduler: rr
    relay: {relay}
    persistence: {{timeout: 5m}}
    backends:
      - {{name: b1, address: 127.0.0.1, ports: {{{self.l_http}: {self.b1}, {self.l_http2}: {self.b1}, {self.l_bulk}: {self.iperf}}}}}
      - {{name: b2, address: 127.0.0.1, ports: {{{self.l_http}: {self.b2}, {self.l_http2}: {self.b2}, {self.l_bulk}: {self.iperf}}}}}
""")
        p = self.spawn(
            [sys.executable, "-m", "l4lb", "--log-level", "warning", "run", "-c", str(conf)],
            PROXY_CORE,
            {"L4LB_PURE": "1"} if pure else {},
        )
        wait_port(self.l_http)
        name = "l4lb-log" if log else "l4lb-pure" if pure else "l4lb"
        name = name if relay == "copy" else f"l4lb-{relay}"
        return Proxy(name, self.l_http, self.l_bulk, [p.pid])

    def stop(self, proxy: Proxy) -> None:
        self.stop_pids(proxy.pids)

    # ------------------------------------------------------------------ measurements

    def wrk(self, port: int, close: bool) -> dict[str, float]:
        argv = [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            "-c50",
            f"-d{self.seconds:g}s",
            "--latency",
            "--timeout",
            "5s",
            f"http://127.0.0.1:{port}/",
        ]
        if close:
            argv[5:5] = ["-H", "Connection: close"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=self.seconds + 30).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"wrk on port {port} printed no rate: {out.strip()[-300:]!r}")
        rps = float(m.group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
        return {
            "rps": rps,
            "requests": total,
            "p50_ms": _ms(lat.get("50", "0ms")),
            "p99_ms": _ms(lat.get("99", "0ms")),
            "errors": (1 if errors else 0) + (int(non2xx.group(1)) if non2xx else 0),
        }

    def iperf3(self, port: int) -> dict[str, float]:
        out = subprocess.run(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                f"{max(2, int(self.seconds))}",
                "-J",
            ],
            capture_output=True,
            text=True,
            timeout=self.seconds + 60,
        ).stdout
        data = json.loads(out)
        received = data["end"]["sum_received"]
        return {"gbit": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}

    def idle_rss(self, proxy: Proxy, n: int) -> float:
        """The proxy's RSS in KiB with n idle proxied connections open (each made a request)."""
        socks = []
        try:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", proxy.http), timeout=10)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(4096)
                socks.append(s)
            time.sleep(0.3)  # let the proxy settle its buffers before reading RSS
            return rss_kib(proxy.pids) if proxy.pids else 0
        finally:
            for s in socks:
                s.close()


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return 0.0
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def run_round(
    bench: Bench, target: str, quiet_marks: list[str], only_conn: bool = False
) -> dict[str, float]:
    proxy = bench.start(target)
    try:
        out: dict[str, float] = {}

        def quiet() -> None:
            busy = busy_fraction()
            if busy > 0.15:
                quiet_marks.append(f"{target}: {busy:.0%} busy before a measurement")

        quiet()
        c0 = cpu_seconds(proxy.pids) if proxy.pids else 0
        close = bench.wrk(proxy.http, close=True)
        c1 = cpu_seconds(proxy.pids) if proxy.pids else 0
        out["conn_per_s"] = close["rps"]
        out["conn_errors"] = close["errors"]
        out["cpu_us_per_conn"] = (c1 - c0) / max(1, close["requests"]) * 1e6 if proxy.pids else 0
        if only_conn:
            return out
        quiet()
        keep = bench.wrk(proxy.http, close=False)
        out["req_per_s"], out["p50_ms"], out["p99_ms"] = keep["rps"], keep["p50_ms"], keep["p99_ms"]
        quiet()
        c0 = cpu_seconds(proxy.pids) if proxy.pids else 0
        bulk = bench.iperf3(proxy.bulk)
        c1 = cpu_seconds(proxy.pids) if proxy.pids else 0
        out["bulk_gbit"] = bulk["gbit"]
        out["cpu_s_per_gib"] = (c1 - c0) / (bulk["bytes"] / 2**30) if proxy.pids else 0
        base = rss_kib(proxy.pids) if proxy.pids else 0
        out["rss_mib_50"] = bench.idle_rss(proxy, 50) / 1024
        rss_5000 = bench.idle_rss(proxy, 5000)
        out["rss_mib_5000"] = rss_5000 / 1024
        out["kib_per_idle_conn"] = (rss_5000 - base) / 5000 if proxy.pids else 0
        return out
    finally:
        bench.stop(proxy)


ROWS = [
    ("conn_per_s", "new connections/s", "{:,.0f}", True),
    ("req_per_s", "keepalive requests/s", "{:,.0f}", True),
    ("p50_ms", "keepalive p50 ms", "{:.2f}", False),
    ("p99_ms", "keepalive p99 ms", "{:.2f}", False),
    ("bulk_gbit", "bulk Gbit/s", "{:.1f}", True),
    ("cpu_us_per_conn", "CPU us per connection", "{:.0f}", False),
    ("cpu_s_per_gib", "CPU s per GiB", "{:.2f}", False),
    ("rss_mib_50", "RSS MiB, 50 idle", "{:.1f}", False),
    ("rss_mib_5000", "RSS MiB, 5,000 idle", "{:.1f}", False),
    ("kib_per_idle_conn", "KiB per idle connection", "{:.1f}", False),
]


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        f"{'':26}"
        + "".join(f"{t:>22}" for t in TARGETS)
        + f"{'l4lb/HAProxy':>14}{'l4lb/bare':>11}{'pure/bare':>11}{'l4lb/direct':>13}"
    ]
    for key, label, fmt, _higher in ROWS:
        cells = []
        med: dict[str, float] = {}
        for t in TARGETS:
            vals = [r[key] for r in results[t]]
            med[t] = statistics.median(vals)
            if t == "direct" and key not in (
                "conn_per_s",
                "req_per_s",
                "p50_ms",
                "p99_ms",
                "bulk_gbit",
            ):
                cells.append(f"{'-':>22}")
                continue
            spread = f" ({fmt.format(min(vals))}-{fmt.format(max(vals))})" if len(vals) > 1 else ""
            cells.append(f"{fmt.format(med[t]) + spread:>22}")
        ratio_h = f"{med['l4lb'] / med['haproxy']:.2f}x" if med["haproxy"] else "-"
        ratio_b = f"{med['l4lb'] / med['bare']:.2f}x" if med["bare"] else "-"
        ratio_p = f"{med['l4lb-pure'] / med['bare']:.2f}x" if med["bare"] else "-"
        ratio_d = (
            f"{med['l4lb'] / med['direct']:.2f}x"
            if med["direct"] and key in ("conn_per_s", "req_per_s", "bulk_gbit", "p50_ms", "p99_ms")
            else "-"
        )
        lines.append(
            f"{label:26}" + "".join(cells) + f"{ratio_h:>14}{ratio_b:>11}{ratio_p:>11}{ratio_d:>13}"
        )

    def median(target: str, key: str) -> float:
        return statistics.median(r[key] for r in results[target])

    on, off = median("l4lb-log", "conn_per_s"), median("l4lb", "conn_per_s")
    cpu_on, cpu_off = median("l4lb-log", "cpu_us_per_conn"), median("l4lb", "cpu_us_per_conn")
    lines.append(
        f"connection log (JSON, a line per connection), one run after the other: {on:,.0f} new"
        f" connections/s with it on against {off:,.0f} off ({on / off:.2f}x); CPU per connection"
        f" {cpu_on:.0f} us against {cpu_off:.0f} us ({cpu_on / cpu_off - 1:+.1%})"
    )
    bare, haproxy = median("bare", "cpu_us_per_conn"), median("haproxy", "cpu_us_per_conn")
    lines.append(
        f"per new connection, CPU: l4lb {cpu_off:.0f} us, the bare relay on the same loop"
        f" {bare:.0f} us, HAProxy {haproxy:.0f} us: l4lb's own machinery {cpu_off - bare:.0f} us"
        f" ({cpu_off / bare - 1:+.0%} over the loop); pure Python"
        f" {median('l4lb-pure', 'cpu_us_per_conn'):.0f} us"
    )
    return "\n".join([*lines, *goals(median)])


def goals(median: Callable[[str, str], float]) -> list[str]:
    """Issue 26's targets, each with both builds' figure and its gap (a figure gates nothing)."""

    def per_core(t: str) -> float:  # new connections per busy core: 1 / CPU per connection
        return 1e6 / median(t, "cpu_us_per_conn")

    def line(what: str, goal: float, higher: bool, fig: Callable[[str], float], unit: str) -> str:
        cells = []
        for t in ("l4lb", "l4lb-pure"):
            v = fig(t)
            met = v >= goal if higher else v <= goal
            gap = "met" if met else f"gap {abs(v / goal - 1):.0%}"
            cells.append(f"{t} {v:.2f}{unit} ({gap})")
        return f"target: {what}: " + ", ".join(cells)

    bare, hap = per_core("bare"), per_core("haproxy")
    return [
        line("new connections per busy core >= 1.0x the bare relay", 1.0, True,
             lambda t: per_core(t) / bare, "x"),
        line("stretch: new connections per busy core >= 0.6x HAProxy", 0.6, True,
             lambda t: per_core(t) / hap, "x"),
        line("keepalive requests/s >= 1.0x HAProxy", 1.0, True,
             lambda t: median(t, "req_per_s") / median("haproxy", "req_per_s"), "x"),
        line("bulk >= 1.0x the bare relay", 1.0, True,
             lambda t: median(t, "bulk_gbit") / median("bare", "bulk_gbit"), "x"),
        line("RSS at 5,000 idle connections <= 40 MiB", 40.0, False,
             lambda t: median(t, "rss_mib_5000"), " MiB"),
        line("at most 3 KiB per idle connection", 3.0, False,
             lambda t: median(t, "kib_per_idle_conn"), " KiB"),
    ]  # fmt: skip


def brief(results: dict[str, list[dict[str, float]]]) -> str:
    """A subset's table: new connections and CPU per connection, medians with min-max, and the
    ratio of each target's median CPU per connection to the first target's."""
    first = statistics.median(r["cpu_us_per_conn"] for r in next(iter(results.values())))
    lines = [f"{'':12}{'new conn/s':>26}{'CPU us per connection':>26}{'CPU vs first':>14}"]
    for t, rows in results.items():
        conn = [r["conn_per_s"] for r in rows]
        cpu = [r["cpu_us_per_conn"] for r in rows]
        c = statistics.median(cpu)
        lines.append(
            f"{t:12}{f'{statistics.median(conn):,.0f} ({min(conn):,.0f}-{max(conn):,.0f})':>26}"
            f"{f'{c:.1f} ({min(cpu):.1f}-{max(cpu):.1f})':>26}{c / first:>13.3f}x"
        )
    return "\n".join(lines)


def instruction_counts(n: int) -> tuple[str, dict[str, float]]:
    """Instructions per new connection (callgrind, bench/conn_instructions.py --proxy-only):
    the bare relay, l4lb as built and l4lb as pure Python; repeatable where the CPU time moves
    by 10-20% from run to run."""
    if shutil.which("valgrind") is None:
        return "instructions per connection: valgrind is missing (apt-get install valgrind)", {}
    import conn_instructions  # bench/conn_instructions.py, beside this file

    counts: dict[str, float] = {}
    for variant in ("bare", "plain", "pure"):
        print(f"instructions: {variant}", file=sys.stderr, flush=True)
        counts[variant] = conn_instructions.per_connection(variant, n)
    bare = counts["bare"]
    names = {"bare": "the bare relay", "plain": "l4lb (as built)", "pure": "l4lb, pure Python"}
    lines = [
        f"instructions per new connection (callgrind, the proxy process alone, {n} connections):"
    ]
    lines += [
        f"  {names[v]:22} {c:10,.0f}  {c / bare:.3f}x the bare relay" for v, c in counts.items()
    ]
    return "\n".join(lines), counts


@contextmanager
def bench_env(seconds: float) -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="l4lb-bench-") as tmp:
        bench = Bench(Path(tmp), seconds)
        try:
            bench.start_backends()
            yield bench
        finally:
            bench.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="one round of 2 s runs (about two minutes)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--targets", help=f"a comma-separated subset of {','.join(TARGETS)} (default: all)"
    )
    ap.add_argument("--no-udp", action="store_true", help="leave out the UDP table")
    ap.add_argument(
        "--no-instructions",
        action="store_true",
        help="leave out the instruction counts (callgrind, about four minutes)",
    )
    ap.add_argument(
        "--no-table", action="store_true", help="leave out the table-scale row (a million pins)"
    )
    ap.add_argument(
        "--only-conn",
        action="store_true",
        help="new connections only (conn/s and CPU per connection): for A/B runs of many rounds",
    )
    args = ap.parse_args()
    targets = tuple(args.targets.split(",")) if args.targets else TARGETS
    unknown = set(targets) - set(TARGETS)
    if unknown:
        print(f"unknown targets: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(
            f"missing: {', '.join(missing)} (make bench installs them with apt-get)",
            file=sys.stderr,
        )
        return 1
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    results: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    marks: list[str] = []
    started = time.time()
    with bench_env(seconds) as bench:
        for r in range(rounds):
            # Interleaved, so that drift hits every target alike, and every other round in the
            # other order: a target's place in a round (after how many others' connections
            # left TIME_WAIT behind, say) must not favour it.
            for t in targets if r % 2 == 0 else targets[::-1]:
                print(f"round {r + 1}/{rounds}: {t}", file=sys.stderr, flush=True)
                results[t].append(run_round(bench, t, marks, args.only_conn))
        side: dict[str, dict[str, object]] = {}
        if targets == TARGETS and not args.only_conn:
            # The log's cost, side by side (bench/ab.py): one after the other, the l4lb and
            # l4lb-log columns move by 10-20% from run to run, more than what is measured.
            import ab  # bench/ab.py, beside this file

            for variant, n in (("log", 2 * rounds), ("same", rounds)):
                print(f"side by side: l4lb, l4lb ({variant})", file=sys.stderr, flush=True)
                side[variant] = ab.side_by_side(bench, variant, n, seconds)
    text = table(results) if targets == TARGETS and not args.only_conn else brief(results)
    if side:
        import ab

        text += (
            "\nconnection log, side by side (l4lb with it and without, both at once on the proxy"
            f" core, {2 * rounds} rounds): {ab.summary(side['log'])} the new connections per second"
            f" without it; l4lb against itself, {rounds} rounds: {ab.summary(side['same'])}"
        )
    print(text)
    instructions: dict[str, float] = {}
    if targets == TARGETS and not args.only_conn and not args.no_instructions:
        instr_text, instructions = instruction_counts(100 if args.quick else 500)
        print("\n" + instr_text)
        text += "\n\n" + instr_text
    udp: dict[str, list[dict[str, float]]] = {}
    if targets == TARGETS and not args.only_conn and not args.no_udp:
        import udp_bench  # bench/udp_bench.py, beside this file

        udp_text, udp = udp_bench.run(rounds, seconds)
        print("\nUDP (l4lb: a group of a TCP and a UDP port; nginx: listen ... udp, hash):")
        print(udp_text)
        text += "\n\n" + udp_text
    scale: dict[str, object] = {}
    if targets == TARGETS and not args.only_conn and not args.no_table:
        import table_scale  # bench/table_scale.py, beside this file

        entries = 200_000 if args.quick else 1_000_000
        print(f"table scale: {entries:,} entries", file=sys.stderr, flush=True)
        scale_text, scale = table_scale.run(entries, shutil.which("redis-server") is not None)
        print("\n" + scale_text)
        text += "\n\n" + scale_text
    print(
        f"\n{rounds} round(s) of {seconds:g} s per measurement, {time.time() - started:.0f} s in all; "
        "load generator and backends on core 0, proxy on core 1."
    )
    print("The machine was quiet throughout." if not marks else "NOT QUIET: " + "; ".join(marks))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "rounds": rounds,
                "seconds": seconds,
                "results": results,
                "udp": udp,
                "instructions": instructions,
                "side_by_side": side,
                "table_scale": scale,
                "not_quiet": marks,
                "table": text,
                "python": sys.version.split()[0],
            },
            indent=1,
        )
    )
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

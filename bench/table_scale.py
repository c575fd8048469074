"""A million clients in the table: what the relay feels (issue 24, point 8).

    .venv/bin/python bench/table_scale.py [--entries N] [--no-store]

One l4lb process (one group, two nginx backends, persistence /24 for an hour, `max_entries`
above N, a Redis `affinity_store` from a redis-server started here) starts on a state file of N
pins (default 1,000,000). Measured:

- start: from the process's spawn to the first connection served (connect and the first byte
  of an HTTP answer, tried every 2 ms), and to the restore's "restored N pins" line;
- RSS per entry: the process's RSS with the N pins minus its RSS on an empty file, over N;
- the relay's latency while each table walk runs: a probe connects and reads the first byte
  every 20 ms (from another process), and its p99 and max are taken over each window: idle,
  one whole periodic state save (state_interval 5 s), three reloads (POST /api/v1/reload; the
  last turns the periodic save off, so that the windows after it hold no save), idle, `GET
  /api/v1/affinity?limit=100000` three times, and the store's reconcile (Redis flushed: l4lb
  writes every pin back).

Everything binds 127.0.0.1; every process started here is ended by its PID. The file is made
here (bench/table_scale.py writes it as l4lb would, in version 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import free_ports, rss_kib  # noqa: E402  (bench/bench.py, beside this file)
from l4lb.runtime import pins  # noqa: E402  (the writer l4lb itself uses)
from tests.support.procs import redis_argv  # noqa: E402

TOKEN = "bench-token-" + "x" * 20


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port}")


def first_byte(port: int, timeout: float = 2.0) -> float | None:
    """Seconds to connect through l4lb and read the first byte of the answer; None: failed."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if not s.recv(1):
                return None
    except OSError:
        return None
    return time.perf_counter() - t0


class Probe:
    """A connection every 20 ms, from a process of its own (this one's GIL, busy parsing a
    100,000-entry answer, must not delay the probe and be blamed on l4lb): it prints each
    probe's start time and latency, a thread here collects them, and `window()` takes those
    that started since the last call."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.samples: list[tuple[float, float | None]] = []
        self._since = time.time()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at, took = line.split()
            with self._lock:
                self.samples.append((float(at), None if took == "-" else float(took)))

    def window(self) -> tuple[list[float], int]:
        time.sleep(0.1)  # (the last probe's line)
        now = time.time()
        with self._lock:
            mine = [(at, took) for at, took in self.samples if self._since <= at < now]
            self.samples = [(at, took) for at, took in self.samples if at >= now]
        self._since = now
        seen = [took for _, took in mine if took is not None]
        return seen, len(mine) - len(seen)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def probe_forever(port: int) -> None:
    while True:
        at = time.time()
        took = first_byte(port)
        print(f"{at:.6f} {'-' if took is None else f'{took:.6f}'}", flush=True)
        time.sleep(max(0.0, 0.02 - (time.time() - at)))


def write_state(path: Path, n: int) -> None:
    header = {
        "version": pins.VERSION,
        "saved_at": time.time(),
        "groups": {"web": {"netmask": 0xFFFFFF00, "ipv6_prefix": 128, "backends": ["b1", "b2"]}},
    }
    base = 1 << 24  # 1.0.0.0/24 onwards, one /24 per client
    lines = []
    for i in range(0, n, pins.CHUNK):
        m = min(pins.CHUNK, n - i)
        keys = [base + ((i + j) << 8) for j in range(m)]
        lines.append(
            pins.encode_chunk("web", False, keys, [(i + j) & 1 for j in range(m)], [3000.0] * m)
        )
    pins.write(str(path), header, lines)


@contextmanager
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        started.append(p)
        return p  # type: ignore[no-any-return]

    try:
        yield spawn
    finally:
        for p in started:
            if p.poll() is None:
                p.terminate()
        for p in started:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def config(tmp: Path, port: int, admin: int, b1: int, b2: int, n: int, redis: int | None) -> str:
    store = (
        f"affinity_store: {{type: redis, url: 'redis://127.0.0.1:{redis}/0'}}\n" if redis else ""
    )
    return f"""\
admin: {{listen: '127.0.0.1:{admin}', token_file: '{tmp}/token'}}
state_file: '{tmp}/pins.json'
state_interval: 5s
{store}groups:
  web:
    listen: ["127.0.0.1"]
    ports: [{port}]
    persistence: {{timeout: 1h, netmask: /24, max_entries: {n + n // 10}}}
    backends:
      - {{name: b1, address: 127.0.0.1, ports: {{{port}: {b1}}}}}
      - {{name: b2, address: 127.0.0.1, ports: {{{port}: {b2}}}}}
"""


def start_l4lb(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp: Path, port: int, name: str
) -> tuple[subprocess.Popen[bytes], float, float | None, Path]:
    """The process, seconds to its first served connection, seconds to its restored line."""
    log = tmp / f"{name}.log"
    t0 = time.perf_counter()
    proc = spawn(
        [sys.executable, "-m", "l4lb", "run", "-c", str(tmp / "l4lb.yaml")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    first = None
    while first is None and time.perf_counter() - t0 < 30:
        if first_byte(port, 0.5) is not None:
            first = time.perf_counter() - t0
        else:
            time.sleep(0.002)
    restored = None
    while restored is None and time.perf_counter() - t0 < 60:
        if "restored" in log.read_text(errors="replace"):
            restored = time.perf_counter() - t0
        else:
            time.sleep(0.01)
    if first is None:
        raise RuntimeError(f"l4lb served nothing: {log.read_text()[-2000:]}")
    return proc, first, restored, log


def post(admin: int, path: str) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        method="POST",
        data=b"",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    urllib.request.urlopen(req, timeout=60).read()


def stats(seen: list[float], failed: int) -> dict[str, float]:
    ms = sorted(x * 1000 for x in seen) or [float("nan")]
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return {
        "probes": len(seen),
        "failed": failed,
        "p99_ms": p99,
        "max_ms": ms[-1],
        "p50_ms": statistics.median(ms),
    }


def run(n: int, store: bool) -> tuple[str, dict[str, object]]:
    for tool in ("nginx", *(("redis-server", "redis-cli") if store else ())):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing (make bench installs it)")
    out: dict[str, object] = {"entries": n}
    with tempfile.TemporaryDirectory(prefix="l4lb-scale-") as t, processes() as spawn:
        tmp = Path(t)
        port, admin, b1, b2, redis = free_ports(5)
        (tmp / "token").write_text(TOKEN)
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{b1}; location / {{ return 200 "b1\\n"; }} }}
  server {{ listen 127.0.0.1:{b2}; location / {{ return 200 "b2\\n"; }} }} }}
""")
        spawn(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")])
        if store:
            spawn(redis_argv(redis), stdout=subprocess.DEVNULL)
            wait_port(redis)
        for p in (b1, b2):
            wait_port(p)
        (tmp / "l4lb.yaml").write_text(
            config(tmp, port, admin, b1, b2, n, redis if store else None)
        )

        # The empty table first: the RSS baseline and the start without a file.
        proc, first_empty, _, _ = start_l4lb(spawn, tmp, port, "empty")
        time.sleep(1.0)
        rss_empty = rss_kib([proc.pid])
        proc.terminate()
        proc.wait(30)
        (tmp / "pins.json").unlink(missing_ok=True)

        t0 = time.perf_counter()
        write_state(tmp / "pins.json", n)
        print(
            f"state file of {n:,} pins written in {time.perf_counter() - t0:.1f} s "
            f"({(tmp / 'pins.json').stat().st_size / 1e6:.0f} MB)",
            file=sys.stderr,
        )
        proc, first, restored, log = start_l4lb(spawn, tmp, port, "full")
        out.update(first_empty_s=first_empty, first_s=first, restored_s=restored)
        time.sleep(1.0)  # (start_l4lb returned once the pins were restored)
        rss_full = rss_kib([proc.pid])
        out["rss_per_entry"] = (rss_full - rss_empty) * 1024 / n
        out["rss_mib"] = rss_full / 1024

        probe = Probe(port)
        windows: dict[str, dict[str, float]] = {}

        def window(name: str, action: Callable[[], None]) -> None:
            probe.window()
            action()
            windows[name] = stats(*probe.window())
            print(f"{name}: {windows[name]}", file=sys.stderr, flush=True)

        state = tmp / "pins.json"

        def next_save(timeout: float = 30.0) -> None:
            was = state.stat().st_mtime
            end = time.monotonic() + timeout
            while state.stat().st_mtime == was and time.monotonic() < end:
                time.sleep(0.02)

        # A save starts state_interval after the last one ended: from one save's end to the
        # next's, a window holds exactly one whole save (its walk and its write).
        next_save()
        window(f"state save ({n:,} pins)", next_save)

        def reload() -> None:  # (the third turns the periodic save off, for the windows after)
            for i in range(3):
                if i == 2:
                    path = tmp / "l4lb.yaml"
                    path.write_text(
                        path.read_text().replace("state_interval: 5s", "state_interval: 1h")
                    )
                post(admin, "/api/v1/reload")
                time.sleep(1.0)

        window("reload (x3)", reload)
        next_save()  # (the save the 5 s sleep before the reload still makes)
        window("idle (3 s)", lambda: time.sleep(3))

        def query() -> None:
            for _ in range(3):
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{admin}/api/v1/affinity?limit=100000", timeout=60
                ) as r:
                    body = json.load(r)
                assert len(body["entries"]) == 100_000, len(body["entries"])

        window("affinity query, limit=100000 (x3)", query)
        if store:

            def reconcile() -> None:
                subprocess.run(
                    ["redis-cli", "-p", str(redis), "flushall"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                end = time.monotonic() + 120
                while time.monotonic() < end and "lost its data" not in log.read_text(
                    errors="replace"
                ):
                    time.sleep(0.05)

            window("store reconcile (Redis flushed)", reconcile)
            keys = subprocess.run(
                ["redis-cli", "-p", str(redis), "dbsize"], capture_output=True, text=True
            ).stdout.strip()
            out["redis_keys_after_reconcile"] = int(keys or 0)

        probe.stop()
        out["windows"] = windows
        proc.terminate()
        proc.wait(60)
        lost = re.findall(r"Traceback", log.read_text(errors="replace"))
        out["tracebacks"] = len(lost)
    return text(out), out


def text(out: dict[str, object]) -> str:
    n = out["entries"]
    lines = [
        f"table scale: {n:,} entries (one l4lb, a state file of {n:,} pins"
        + (", a Redis store)" if "redis_keys_after_reconcile" in out else ")"),
        f"  first connection served {out['first_s']:.2f} s after the spawn "
        f"({out['first_empty_s']:.2f} s with no state file); pins restored at "
        f"{out['restored_s'] or float('nan'):.1f} s",
        f"  RSS {out['rss_mib']:.0f} MiB: {out['rss_per_entry']:.0f} bytes per entry",
        "  the relay's latency, connect to first byte, a probe every 20 ms:",
    ]
    for name, s in out["windows"].items():  # type: ignore[attr-defined]
        lines.append(
            f"    {name:38} p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms  "
            f"max {s['max_ms']:7.2f} ms  ({s['probes']} probes, {s['failed']} failed)"
        )
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--probe"]:
        probe_forever(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--no-store", action="store_true", help="no Redis store (no reconcile row)")
    args = ap.parse_args()
    report, out = run(args.entries, not args.no_store)
    print(report)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"table-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

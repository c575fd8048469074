"""Where a new connection's time goes in l4lb, step by step, against the bare relay: a
deterministic profile (cProfile) of a fixed number of connections through the proxy, run in
this process on uvloop, the client and the backend in another process.

    .venv/bin/python bench/conn_breakdown.py [--connections 3000]

Every Python function and every call into C that the proxy makes is charged to a step of the
path (accept and key, table, router, dial with its timeout, pairing, relaying, close and
finish, the rest); the event loop's own C work between callbacks (epoll, accept, reading) is
not a call and shows as neither. cProfile adds its own cost to every call, so the figures are
larger than a real run's; they are for comparing steps and the two proxies, not absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from conn_instructions import PEER  # noqa: E402  (the same client and backend)

from bench import free_ports  # noqa: E402

# (step, test on "file:function") in order: the first match wins.
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("table", ("affinity.py:",)),
    ("router and scheduler", ("routing.py:", "schedulers.py:", "backends.py:", "limits.py:")),
    ("accept and key", ("keys.py:", "relay.py:connection_made", "relay.py:_start",
                        "relay.py:__init__", "<method 'get_extra_info'", "context.py:track")),
    ("dial", ("dialer.py:", "timeouts.py:", "<method 'create_connection'", "<method 'create_task'",
              "tasks.py:", "<method 'setsockopt'", "base_events.py:create_task",
              "relay.py:_connect", "bare_relay.py:dial")),
    ("pairing", ("relay.py:pair", "relay.py:_dialed", "relay.py:begin_splice")),
    ("relaying", ("relay.py:data_received", "relay.py:eof_received", "relay.py:pause",
                  "relay.py:resume", "<method 'write'", "<method 'write_eof'",
                  "bare_relay.py:data_received", "bare_relay.py:eof_received")),
    ("close and finish", ("relay.py:connection_lost", "relay.py:finish", "relay.py:_pass_on",
                          "relay.py:log_line", "context.py:forget", "histogram.py:",
                          "<method 'close'", "bare_relay.py:connection_lost")),
]  # fmt: skip


def step_of(where: str) -> str:
    for step, tests in STEPS:
        if any(t in where for t in tests):
            return step
    return "the rest"


async def _run(
    peer: subprocess.Popen[str], port: int, bport: int, bare: bool, prof: cProfile.Profile
) -> None:
    assert peer.stdin is not None and peer.stdout is not None
    loop = asyncio.get_running_loop()
    if bare:
        import itertools

        from bare_relay import Client

        cycle = itertools.cycle([bport])
        server = await loop.create_server(lambda: Client(cycle), "127.0.0.1", port)
    else:
        from l4lb import Server
        from l4lb.config import load_config_text

        balancer = Server(
            load_config_text(
                f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
                "    persistence: {timeout: 5m, netmask: /24}\n"
                f"    backends: [{{name: a, address: 127.0.0.1, ports: {{{port}: {bport}}}}}]\n"
            )
        )
        await balancer.start()
    prof.enable()
    peer.stdin.write("go\n")
    peer.stdin.flush()
    await loop.run_in_executor(None, peer.stdout.readline)  # "done"
    prof.disable()
    if bare:
        server.close()
    else:
        await balancer.shutdown(grace=0.1)


def profile(n: int, bare: bool) -> dict[str, tuple[float, float]]:
    """step -> (microseconds per connection, calls per connection)."""
    port, bport = free_ports(2)
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(port), str(bport), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert peer.stdout is not None
    peer.stdout.readline()  # "ready": its backend listens
    prof = cProfile.Profile()
    with peer:
        uvloop.run(_run(peer, port, bport, bare, prof))
        peer.wait(30)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, list[float]] = {}
    for (file, _line, func), (_cc, calls, tottime, _ct, _callers) in stats.items():
        if func == "readline" or "thread" in file or "futures" in file:
            continue  # the executor waiting for "done", not the proxy's work
        where = f"{Path(file).name}:{func}" if file != "~" else func
        acc = out.setdefault(step_of(where), [0.0, 0.0])
        acc[0] += tottime * 1e6 / n
        acc[1] += calls / n
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3, help="interleaved; medians are shown")
    args = ap.parse_args()
    n = args.connections
    runs: dict[bool, list[dict[str, tuple[float, float]]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory():
        for _ in range(args.runs):
            for which in (False, True):
                runs[which].append(profile(n, bare=which))
    lb, bare = (
        {
            step: (
                statistics.median(r.get(step, (0.0, 0.0))[0] for r in runs[which]),
                statistics.median(r.get(step, (0.0, 0.0))[1] for r in runs[which]),
            )
            for step in [s for s, _ in STEPS] + ["the rest"]
        }
        for which in (False, True)
    )
    steps = [s for s, _ in STEPS] + ["the rest"]
    print(f"{'step':22}{'l4lb us':>10}{'calls':>8}{'bare us':>10}{'calls':>8}{'l4lb - bare':>13}")
    total = [0.0, 0.0]
    for s in steps:
        a, b = lb.get(s, (0.0, 0.0)), bare.get(s, (0.0, 0.0))
        total[0] += a[0]
        total[1] += b[0]
        print(f"{s:22}{a[0]:>10.1f}{a[1]:>8.1f}{b[0]:>10.1f}{b[1]:>8.1f}{a[0] - b[0]:>+13.1f}")
    print(
        f"{'all':22}{total[0]:>10.1f}{'':>8}{total[1]:>10.1f}{'':>8}{total[0] - total[1]:>+13.1f}"
    )
    print(f"\n{n} connections a run, medians of {args.runs} interleaved runs: microseconds of"
          " Python per connection under cProfile (inflated by its own cost per call), and calls."
          "\nuvloop's methods are Cython, which cProfile does not see: their cost is their"
          " caller's (create_connection in the dial, call_later in the step that calls it).")  # fmt: skip


if __name__ == "__main__":
    main()

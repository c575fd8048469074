"""Start-up time and memory of l4lb listening on N ports (default: 1 and 1,000).

    .venv/bin/python bench/ports_startup.py [--first 21000] [--counts 1,1000]

Times `l4lb run` from exec to its "listening" log line, and reads its RSS then. Ports are bound
on 127.0.0.1 only; the balancer is stopped by its PID.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.procs import processes, start_l4lb  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--first", type=int, default=21000)
    ap.add_argument("--counts", default="1,1000")
    args = ap.parse_args()
    print(f"{'ports':>6} {'start-up s':>11} {'RSS MiB':>8}")
    for n in (int(x) for x in args.counts.split(",")):
        last = args.first + n - 1
        with tempfile.TemporaryDirectory() as tmp, processes() as procs:
            cfg = Path(tmp) / "ports.yaml"
            cfg.write_text(
                "groups:\n  range:\n    listen: [127.0.0.1]\n"
                f"    ports: ['{args.first}-{last}']\n"
                "    backends: [{name: a, address: 127.0.0.2}]\n"
            )
            t0 = time.monotonic()
            lb = start_l4lb(cfg)
            took = time.monotonic() - t0
            procs.append(lb)
            print(f"{n:>6} {took:>11.2f} {rss_kib(lb.pid) / 1024:>8.1f}")


if __name__ == "__main__":
    main()

"""The HA pair's planned hand-over at several sizes (docs/deployment.md, "An HA pair"): the pair
of tests/support/pairlab.py (network namespaces, real keepalived, nftables, redis-server), N
long-lived echo connections, each echoing every 100 ms, moved by `l4lb ctl handover`; the
hand-over's duration, the longest pause a client saw, and how many were cut. As root.

    .venv/bin/python bench/ha_pair.py [--sizes 20,200,1000]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.pairlab import NETS, VIP, PairLab, missing  # noqa: E402
from tests.support.procs import wait_for_line  # noqa: E402


def one(n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        lab = PairLab(Path(tmp))
        try:
            lab.build()
            lab.start_backends()
            lab.start_keepalived(1)
            lab.wait_holds(1)
            lab.start_keepalived(2)
            lab.start_l4lb(1)
            lab.start_l4lb(2)
            nets = ",".join(str(i % NETS) for i in range(n))
            echo = lab.client("echo", VIP, "7000", nets, "0.1")
            wait_for_line(echo, "stdout", "ready", 120)
            time.sleep(1.0)
            done = lab.ctl(1, "handover")
            time.sleep(2.0)
            assert echo.stdin is not None
            echo.stdin.write("stop\n")
            echo.stdin.flush()
            conns = json.loads(wait_for_line(echo, "stdout", "{", 120)[-1])["conns"]
        finally:
            lab.close()
    took = re.search(r"in (\d+) ms", done.stdout)
    return {
        "connections": n,
        "handover_ms": int(took.group(1)) if took else None,
        "answer": (done.stdout or done.stderr).strip(),
        "worst_pause_ms": round(max(float(c["worst"]) for c in conns) * 1000),
        "cut": sum(1 for c in conns if c["error"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20,200,1000")
    args = ap.parse_args()
    why = missing()
    if why is not None:
        raise SystemExit(f"ha_pair: {why}")
    rows = [one(int(n)) for n in args.sizes.split(",")]
    print("| connections | hand-over | longest echo pause | cut |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['connections']:,} | {r['handover_ms']} ms | {r['worst_pause_ms']} ms | {r['cut']} |"
        )
    for r in rows:
        print(r["answer"])


if __name__ == "__main__":
    main()

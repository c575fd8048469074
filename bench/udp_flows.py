"""New UDP flows per second: each flow is a fresh socket (a new source address and port) that
sends one datagram and waits for the answer, `--window` of them in flight at once. Prints one
JSON line: flows answered, per second, and how many went unanswered (within `--wait`).

    python bench/udp_flows.py --port 9000 --seconds 5 [--window 64] [--hold N]

`--hold N`: instead, open N flows one after the other and keep their sockets open until stdin
closes (for the proxy's memory per idle flow); prints {"held": N} once all are answered.
Sources cycle through 127.1.0.0/16, so that a closed socket's port coming back soon is
another client's. `--quic-cids FILE`: each flow's datagram is a QUIC short header to one of
the file's connection IDs, in turn (a quic_lb group routes every new flow by its ID; one ID
steers two flows at most, so each flow is given an ID of its own connection). Bounded in count and time; sends only to
127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time


def source(i: int) -> str:
    return f"127.1.{(i >> 8) & 0xFF}.{i & 0xFF or 1}"


PAYLOADS = [b"flow"]  # what flow i sends: the i-th, in turn (--quic-cids: short headers)


def run(port: int, seconds: float, window: int, wait: float) -> dict[str, float]:
    poller = select.epoll()
    inflight: dict[int, tuple[socket.socket, float]] = {}
    sent = answered = lost = 0
    i = 0
    target = ("127.0.0.1", port)
    start = time.monotonic()
    deadline = start + seconds
    while True:
        now = time.monotonic()
        while len(inflight) < window and now < deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((source(i), 0))
            i += 1
            s.sendto(PAYLOADS[i % len(PAYLOADS)], target)
            sent += 1
            inflight[s.fileno()] = (s, now)
            poller.register(s.fileno(), select.EPOLLIN)
        if not inflight:
            break
        for fd, _ in poller.poll(0.05):
            s, _t = inflight.pop(fd)
            poller.unregister(fd)
            try:
                s.recv(2048)
                answered += 1
            except OSError:
                lost += 1
            s.close()
        now = time.monotonic()
        for fd, (s, t) in list(inflight.items()):
            if now - t > wait:
                inflight.pop(fd)
                poller.unregister(fd)
                s.close()
                lost += 1
        if now > deadline + wait:
            break
    elapsed = min(time.monotonic(), deadline) - start
    return {"flows": answered, "flows_per_s": answered / elapsed, "lost": lost, "sent": sent}


def hold(port: int, n: int) -> None:
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source(i), 0))
        s.settimeout(5)
        s.sendto(PAYLOADS[i % len(PAYLOADS)], ("127.0.0.1", port))
        s.recv(2048)
        socks.append(s)
    print(json.dumps({"held": n}), flush=True)
    sys.stdin.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--wait", type=float, default=1.0)
    ap.add_argument("--hold", type=int, default=0)
    ap.add_argument(
        "--quic-cids",
        help="a file of connection IDs, hex, one a line: flow i sends a QUIC"
        " short header to the i-th (in turn), as flows of that many connections",
    )
    args = ap.parse_args()
    if args.quic_cids:
        with open(args.quic_cids) as f:
            PAYLOADS[:] = [b"\x40" + bytes.fromhex(line) + bytes(40) for line in f if line.strip()]
    if args.hold:
        hold(args.port, args.hold)
        return
    print(json.dumps(run(args.port, args.seconds, args.window, args.wait)), flush=True)


if __name__ == "__main__":
    main()

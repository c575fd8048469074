"""Clients of the HA pair's test (tests/peers/test_pair.py), run inside its client namespace.
One JSON line out when done; bounded in count and time.

    python -m tests.support.pair_client who VIP PORT NETS        # each /24's backend (HTTP GET)
    python -m tests.support.pair_client echo VIP PORT NETS [SECONDS]   # long-lived echo
        connections: prints "ready", echoes every 20 ms (or SECONDS) on each until a line on
        stdin, then its JSON
    python -m tests.support.pair_client stream VIP PORT NETS SECONDS   # new connections
    python -m tests.support.pair_client idle VIP PORT NETS       # open, "ready", wait for a line,
        then one echo on each: how many answer

NETS is a comma list of /24 indexes: client addresses are 10.100.N.1 (echo) and 10.100.N.2.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

INTERVAL = 0.02


def _src(net: int, host: int) -> str:
    return f"10.100.{net}.{host}"


def get_name(vip: str, port: int, src: str, timeout: float = 2.0) -> str:
    """The backend's name, by an HTTP GET from `src`."""
    with socket.create_connection((vip, port), timeout=timeout, source_address=(src, 0)) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def _until_told(threads: list[threading.Thread], stop: threading.Event) -> None:
    """Run `threads`, say "ready", and stop them at the first line on stdin."""
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(30)


def who(vip: str, port: int, nets: list[int]) -> dict[str, str]:
    return {str(n): get_name(vip, port, _src(n, 2)) for n in nets}


def echo(vip: str, port: int, nets: list[int], interval: float = INTERVAL) -> dict[str, object]:
    conns = []
    for n in nets:
        s = socket.create_connection((vip, port), timeout=10, source_address=(_src(n, 1), 0))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(s)
    stop = threading.Event()
    results: list[dict[str, object]] = [{} for _ in conns]

    def run(i: int, s: socket.socket) -> None:
        seq, worst, last, err = 0, 0.0, time.monotonic(), None
        deadline = time.monotonic() + 300
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                line = f"{i}:{seq}\n".encode()
                s.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(100)
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                if got != line:
                    raise ValueError(f"out of order: sent {line!r}, got {got!r}")
                now = time.monotonic()
                worst, last = max(worst, now - last), now
                seq += 1
                stop.wait(interval)
        except (OSError, ValueError) as exc:
            err = f"{type(exc).__name__}: {exc}"
        results[i] = {"echoes": seq, "worst": worst, "error": err}

    _until_told([threading.Thread(target=run, args=(i, s)) for i, s in enumerate(conns)], stop)
    for s in conns:
        s.close()
    return {"conns": results}


def stream(vip: str, port: int, nets: list[int], seconds: float) -> dict[str, object]:
    """A new connection every 50 ms, cycling through the /24s, each in its own thread (a SYN
    lost in a gap retries on its own): each one's start time, /24, backend or error."""
    out: list[dict[str, object]] = []
    lock = threading.Lock()
    t0 = time.time()

    def one(n: int, began: float) -> None:
        try:
            name: str | None = get_name(vip, port, _src(n, 2), timeout=3.0)
            err = None
        except OSError as exc:
            name, err = None, f"{type(exc).__name__}: {exc}"
        with lock:
            out.append({"net": n, "began": began, "ended": time.time(), "backend": name,
                        "error": err})  # fmt: skip

    threads = []
    i = 0
    print("ready", flush=True)
    while time.time() - t0 < seconds and i < 2000:
        t = threading.Thread(target=one, args=(nets[i % len(nets)], time.time()))
        t.start()
        threads.append(t)
        i += 1
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    return {"tries": out}


def udp(vip: str, port: int, nets: list[int]) -> dict[str, object]:
    """A UDP client on each /24 (one source port each), a datagram every 50 ms until a line on
    stdin: the backends that answered each, and how many went unanswered."""
    stop = threading.Event()
    results: list[dict[str, object]] = [{} for _ in nets]

    def run(i: int, n: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((_src(n, 1), 0))
        s.connect((vip, port))
        s.settimeout(0.5)
        names: set[str] = set()
        answered = unanswered = seq = 0
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            s.send(f"{n}:{seq}".encode())
            try:
                name, _, _ = s.recv(200).decode().partition(" ")
                names.add(name)
                answered += 1
            except OSError:
                unanswered += 1
            seq += 1
            stop.wait(0.05)
        s.close()
        results[i] = {"names": sorted(names), "answered": answered, "unanswered": unanswered}

    _until_told([threading.Thread(target=run, args=(i, n)) for i, n in enumerate(nets)], stop)
    return {"flows": results}


def idle(vip: str, port: int, nets: list[int]) -> dict[str, object]:
    conns = []
    for n in nets:
        s = socket.create_connection((vip, port), timeout=10, source_address=(_src(n, 1), 0))
        s.sendall(b"hello\n")
        if s.recv(100) != b"hello\n":
            raise SystemExit("no first echo")
        conns.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    answered, errors = 0, []
    for s in conns:
        s.settimeout(5)
        try:
            s.sendall(b"again\n")
            if s.recv(100) == b"again\n":
                answered += 1
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        s.close()
    return {"answered": answered, "errors": errors}


def main() -> None:
    mode, vip, port, nets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ns = [int(x) for x in nets.split(",")]
    if mode == "who":
        out: object = who(vip, port, ns)
    elif mode == "echo":
        out = echo(vip, port, ns, *(float(x) for x in sys.argv[5:6]))
    elif mode == "udp":
        out = udp(vip, port, ns)
    elif mode == "stream":
        out = stream(vip, port, ns, float(sys.argv[5]))
    else:
        out = idle(vip, port, ns)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

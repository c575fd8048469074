"""Real processes for end-to-end tests: backends and l4lb itself, ended by their PID."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


STARTUP: dict[int, list[str]] = {}  # pid -> the log lines l4lb wrote while starting
_readers: dict[tuple[int, str], tuple[queue.Queue[str | None], threading.Thread]] = {}
_history: dict[tuple[int, str], list[str]] = {}  # every line each pump has read


def _lines(proc: subprocess.Popen[str], stream: str) -> queue.Queue[str | None]:
    """A queue fed by a thread reading `stream` of `proc` line by line (None at EOF), so waiting
    for a line can time out; select() on a buffered pipe cannot be trusted."""
    key = (proc.pid, stream)
    if key not in _readers:
        q: queue.Queue[str | None] = queue.Queue()
        pipe = getattr(proc, stream)
        seen = _history.setdefault(key, [])

        def pump() -> None:
            with pipe:
                for line in pipe:
                    seen.append(line.rstrip("\n"))
                    q.put(seen[-1])
            q.put(None)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        _readers[key] = (q, t)
    return _readers[key][0]


def wait_for_line(
    proc: subprocess.Popen[str], stream: str, needle: str, timeout: float = 15
) -> list[str]:
    """Read `stream` of `proc` until a line contains `needle`; the lines read so far."""
    q = _lines(proc, stream)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(
                f"no {needle!r} from pid {proc.pid} in {timeout}s: {lines}"
            ) from None
        if line is None:
            q.put(None)  # stay at EOF for later callers
            raise RuntimeError(f"pid {proc.pid} exited ({proc.wait()}) before {needle!r}: {lines}")
        lines.append(line)
        if needle in line:
            return lines


def output(proc: subprocess.Popen[str], stream: str = "stderr") -> str:
    """Everything `proc` wrote on `stream`, once it has exited (for checks of the whole log)."""
    _lines(proc, stream)
    proc.wait(30)
    _readers[(proc.pid, stream)][1].join(10)
    return "\n".join(_history[(proc.pid, stream)])


def redis_argv(port: int, *extra: str) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:`port`: nothing saved, no append-only file."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", *extra]  # fmt: skip


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
    """Until something accepts on host:port (for peers that print nothing when ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def start_backend(name: str, prefix: tuple[str, ...] = (), **ports: str) -> subprocess.Popen[str]:
    """A tests.support.backend_server process; `prefix` runs it under another command (ip netns exec)."""
    argv = [*prefix, sys.executable, "-m", "tests.support.backend_server", "--name", name]
    for kind, address in ports.items():
        argv += [f"--{kind}", address]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    _started(proc, "stdout", "ready", 1)
    return proc


def l4lb_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`l4lb ARGV...` run to its end from the checkout: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "l4lb", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_l4lb(
    config: Path,
    *extra: str,
    groups: int = 1,
    prefix: tuple[str, ...] = (),
    config_flag: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[str]:
    """`l4lb run -c CONFIG EXTRA...` (without `-c CONFIG` when not `config_flag`: flags only;
    `env`: more of the environment; `cwd`: where it runs, the checkout by default)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    source = ("-c", str(config)) if config_flag else ()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "l4lb", "run", *source, *extra],
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    STARTUP[proc.pid] = _started(proc, "stderr", "listening on", groups)
    return proc


def _started(proc: subprocess.Popen[str], stream: str, needle: str, times: int) -> list[str]:
    """Wait for `needle` `times` times; a process that does not start is ended, not leaked."""
    lines: list[str] = []
    try:
        for _ in range(times):
            lines += wait_for_line(proc, stream, needle)
    except BaseException:
        stop(proc)
        raise
    return lines


def stop(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Collects processes and ends every one of them, by PID, whatever happens."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            stop(p)
            if p.stdin is not None:
                p.stdin.close()
            for stream in ("stdout", "stderr"):
                reader = _readers.pop((p.pid, stream), None)
                _history.pop((p.pid, stream), None)
                if reader is not None:
                    reader[1].join(10)  # the pump closes the pipe at EOF
                elif getattr(p, stream) is not None:
                    getattr(p, stream).close()


def can_make_netns() -> bool:
    """Root with iproute2: a test may take a network namespace of its own."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def private_netns(tag: str) -> Iterator[tuple[str, ...]]:
    """A network namespace of the test's own with its loopback up, where every port is free
    whatever this host runs; yields the prefix that runs a command in it."""
    name = f"l4lb{tag}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        ns = ("ip", "netns", "exec", name)
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

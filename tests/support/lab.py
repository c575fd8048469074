"""The reliability suite's bench: real l4lb and backend processes on loopback, their
configuration, and what the kernel says of them (RSS, descriptors, CPU time, the log)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.helpers import free_ports
from tests.support.procs import ROOT, output, processes, start_l4lb, wait_for_line

TOKEN = "a-token-of-the-lab"


def raise_nofile(n: int = 65536) -> None:
    """The suite's own clients hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Backend:
    def __init__(self, name: str, proc: subprocess.Popen[str], ports: dict[str, int]) -> None:
        self.name = name
        self.proc = proc
        self.ports = ports  # mode -> port

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Lab:
    def __init__(self, tmp: Path, procs: list[subprocess.Popen[str]]) -> None:
        self.tmp = tmp
        self.procs = procs
        self.balancers: list[subprocess.Popen[str]] = []
        (tmp / "token").write_text(TOKEN)

    def backend(self, name: str, sink_pace: float = 0.01, udp_answers: int = 1) -> Backend:
        echo, stream, sink, udp = free_ports(4)
        argv = [sys.executable, "-m", "tests.support.lab_backend", "--name", name]
        argv += ["--echo", f"127.0.0.1:{echo}", "--stream", f"127.0.0.1:{stream}"]
        argv += ["--sink", f"127.0.0.1:{sink}", "--sink-pace", str(sink_pace)]
        argv += ["--udp", f"127.0.0.1:{udp}", "--udp-answers", str(udp_answers)]
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        wait_for_line(proc, "stdout", "ready")
        return Backend(name, proc, {"echo": echo, "stream": stream, "sink": sink, "udp": udp})

    def l4lb(
        self,
        group: str,
        *,
        top: str = "",
        prefix: tuple[str, ...] = (),
        name: str = "l4lb",
        log_level: str = "info",
    ) -> tuple[subprocess.Popen[str], int]:
        """l4lb on `group` (a YAML group body under `groups:`), with an admin API; returns the
        process and the admin port."""
        (admin,) = free_ports(1)
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(
            f"admin: {{listen: '127.0.0.1:{admin}', token_file: token}}\n"
            f"shutdown_timeout: 10s\n{top}groups:\n{group}"
        )
        lb = start_l4lb(cfg, "--log-level", log_level, prefix=prefix)
        self.procs.append(lb)
        self.balancers.append(lb)
        return lb, admin

    def config_path(self, name: str = "l4lb") -> Path:
        return self.tmp / f"{name}.yaml"

    def tracebacks(self) -> list[str]:
        """Log lines of a traceback from any balancer this lab ran (each ended first)."""
        bad = []
        for lb in self.balancers:
            if lb.poll() is None:
                lb.terminate()
            text = output(lb)
            bad += [line for line in text.splitlines() if "Traceback" in line]
        return bad


@contextlib.contextmanager
def lab(tmp: Path) -> Iterator[Lab]:
    with processes() as procs:
        yield Lab(tmp, procs)


def group_yaml(
    backends: list[Backend],
    ports: list[int] | list[int | str],
    mode: str = "echo",
    *,
    name: str = "web",
    extra: str = "",
) -> str:
    """A group listening on 127.0.0.1 at `ports`, every port mapped to each backend's `mode`."""
    lines = [
        f"  {name}:",
        "    listen: [127.0.0.1]",
        f"    ports: [{', '.join(f'{p!r}' if isinstance(p, str) else str(p) for p in ports)}]",
    ]
    lines += [f"    {x}" for x in extra.splitlines() if x.strip()]
    lines.append("    backends:")
    for b in backends:
        pm = ", ".join(
            f'"{p}": {b.ports["udp"]}' if str(p).endswith("/udp") else f"{p}: {b.ports[mode]}"
            for p in ports
        )
        lines.append(f"      - {{name: {b.name}, address: 127.0.0.1, ports: {{{pm}}}}}")
    return "\n".join(lines) + "\n"


def metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        return str(r.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        got = head[len(name) :].strip("{}")
        if head[: len(name)] == name and sorted(filter(None, got.split(","))) == want:
            return float(value)
    return 0.0


async def open_from(
    port: int, src: str, within: float = 10
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0), limit=1 << 20), within
    )


def source(i: int, base: int = 10) -> str:
    """The i-th distinct client address of 127/8 (base.x.y)."""
    return f"127.{base + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"

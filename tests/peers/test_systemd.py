"""systemd: l4lb speaks sd_notify to a real Unix datagram socket (READY once it listens,
RELOADING then READY around a reload, STOPPING on shutdown), alone and with workers; the unit
file is installed by `make install` and verified there (tests/peers/test_install.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import free_ports
from tests.support.procs import ROOT, processes, wait_for_line

UNIT = ROOT / "contrib" / "systemd" / "l4lb.service"


def messages(sock: socket.socket, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        data = sock.recv(4096).decode()
        out.append(dict(line.split("=", 1) for line in data.splitlines()))
    return out


def one_group(tmp: Path, top: str = "") -> tuple[Path, int]:
    """A configuration of one group on a free port (its backend never dialed); and the port."""
    port, b1 = free_ports(2)
    config = tmp / "l4lb.yaml"
    config.write_text(
        f"{top}groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n"
        f"    backends: [{{name: a, address: '127.0.0.1:{b1}'}}]\n"
    )
    return config, port


@contextlib.contextmanager
def notified(config: Path, path: Path) -> Iterator[tuple[socket.socket, subprocess.Popen[str]]]:
    """`l4lb run -c CONFIG` with NOTIFY_SOCKET at `path`: the socket systemd would read (30 s
    for each message at most), and the process, ended by PID when done."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, processes() as procs:
        sock.bind(str(path))
        sock.settimeout(30)
        lb = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "-c", str(config)],
            cwd=ROOT,
            env=dict(os.environ, NOTIFY_SOCKET=str(path), PYTHONUNBUFFERED="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(lb)
        yield sock, lb


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_ready_stopping_in_that_order(tmp_path: Path, workers: int) -> None:
    config, port = one_group(tmp_path, f"workers: {workers}\n")
    with notified(config, tmp_path / "notify.sock") as (sock, lb):
        (ready,) = messages(sock, 1)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(lb.pid)
        assert ready["STATUS"] == (f"{workers} workers" if workers > 1 else "serving") + (
            ": 1 group, 1 port"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # READY meant it: the port takes connections
        config.write_text(config.read_text().replace("backends:", "scheduler: rr\n    backends:"))
        lb.send_signal(signal.SIGHUP)
        reloading, again = messages(sock, 2)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert again["READY"] == "1" and again["STATUS"] == "reloaded: 1 change"
        config.write_text("groups: [")  # a refused reload is still answered with READY
        lb.send_signal(signal.SIGHUP)
        reloading, again = messages(sock, 2)
        assert "RELOADING" in reloading and again["STATUS"].startswith("reload refused (")
        lb.send_signal(signal.SIGTERM)
        (stopping,) = messages(sock, 1)
        assert stopping["STOPPING"] == "1"
        assert lb.wait(30) == 0


def test_without_notify_socket_nothing_is_sent_and_a_dead_socket_is_not_fatal(
    tmp_path: Path,
) -> None:
    config, port = one_group(tmp_path)
    with processes() as procs:
        lb = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "-c", str(config)],
            cwd=ROOT,
            env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "nobody.sock")),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(lb)
        wait_for_line(lb, "stderr", "cannot notify systemd")
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_hands_systemd_the_new_main_pid(tmp_path: Path, workers: int) -> None:
    """`systemctl reload` sends SIGUSR2: the old process says RELOADING, the new one MAINPID
    (before the old one exits, so that systemd never sees its main process gone), then READY
    with its own PID; the old one exits 0. With workers, the new supervisor speaks."""
    config, port = one_group(tmp_path, f"workers: {workers}\n")
    new = 0
    with notified(config, tmp_path / "notify.sock") as (sock, lb):
        (ready,) = messages(sock, 1)
        assert ready["MAINPID"] == str(lb.pid)
        lb.send_signal(signal.SIGUSR2)
        try:
            reloading, handed, again = messages(sock, 3)
            assert reloading["RELOADING"] == "1"
            new = int(handed["MAINPID"])
            assert new != lb.pid and again["READY"] == "1" and again["MAINPID"] == str(new)
            assert lb.wait(30) == 0
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # the new process serves
        finally:
            if new:
                os.kill(new, signal.SIGTERM)  # (a supervisor stops its workers)


def test_the_unit_file() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -USR2 $MAINPID",
        "NotifyAccess=all",
        "StateDirectory=l4lb",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "KillSignal=SIGTERM",
    ):
        assert f"\n{line}\n" in text, line
    assert "LimitNOFILE=" in text and "DynamicUser=yes" in text

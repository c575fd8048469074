"""The reference's FTP recipe (docs/reference.md), run for real: two pyftpdlib servers behind l4lb (control port and a
passive range in one group), curl fetching several files per session from a dozen source
addresses; and the same servers with persistence off, where a transfer goes to the wrong server."""

from __future__ import annotations

import contextlib
import ftplib
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.procs import ROOT, processes, start_l4lb, wait_for_line

pytestmark = pytest.mark.e2e
if shutil.which("curl") is None:
    pytest.skip("curl is not installed (.ci/run installs it)", allow_module_level=True)

LB, FTP1, FTP2 = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def free_block(n: int) -> int:
    """The first port of n consecutive ports free on all three addresses, below the ephemeral
    range (so that no outgoing connection takes one meanwhile)."""
    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 32000 - n)
        socks: list[socket.socket] = []
        try:
            for host in (LB, FTP1, FTP2):
                for p in range(base, base + n):
                    s = socket.socket()
                    socks.append(s)
                    s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


def recipe(control: int, first: int, last: int, timeout: str) -> str:
    """The FTP recipe with loopback addresses and free ports swapped in."""
    readme = (ROOT / "docs" / "reference.md").read_text()
    block = readme.split("# FTP recipe:", 1)[1].split("```", 1)[0]
    text = "# FTP recipe:" + block
    for old, new in (
        ("203.0.113.10", LB),
        ("10.0.0.21", FTP1),
        ("10.0.0.22", FTP2),
        ('"30000-30099"', f'"{first}-{last}"'),
        ("ports: [21,", f"ports: [{control},"),
        ("timeout: 15m", f"timeout: {timeout}"),
        ("scheduler: lc", "scheduler: rr"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One root per server: the same two files, and a file naming the server."""
    a, b = os.urandom(300_000), os.urandom(1_200_000)
    roots = {}
    for name in ("ftp1", "ftp2"):
        root = tmp_path / name
        root.mkdir()
        (root / "a.bin").write_bytes(a)
        (root / "b.bin").write_bytes(b)
        (root / "whoami.txt").write_text(name)
        roots[name] = root
    return roots


def start_ftp(
    procs: list[subprocess.Popen[str]], address: str, control: int, passive: str, root: Path
) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.ftp_server",
            "--listen",
            f"{address}:{control}",
            "--passive",
            passive,
            "--masquerade",
            LB,
            "--root",
            str(root),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    wait_for_line(p, "stdout", "ready")


@pytest.fixture
def site(
    tmp_path: Path, files: dict[str, Path]
) -> Iterator[tuple[int, int, list[subprocess.Popen[str]]]]:
    base = free_block(21)
    control, first = base, base + 1
    with processes() as procs:
        start_ftp(procs, FTP1, control, f"{first}-{first + 19}", files["ftp1"])
        start_ftp(procs, FTP2, control, f"{first}-{first + 19}", files["ftp2"])
        yield control, first, procs


def test_a_dozen_clients_fetch_several_files_per_session_intact(
    tmp_path: Path, files, site
) -> None:
    control, first, procs = site
    config = tmp_path / "ftp.yaml"
    config.write_text(recipe(control, first, first + 19, "15m"))
    assert (
        subprocess.run(
            [sys.executable, "-m", "l4lb", "check", "-c", str(config)],
            cwd=ROOT,
            capture_output=True,
        ).returncode
        == 0
    )
    procs.append(start_l4lb(config))
    want = {n: (files["ftp1"] / n).read_bytes() for n in ("a.bin", "b.bin")}

    def session(i: int) -> str:
        src = f"127.0.{100 + i}.1"
        out = tmp_path / f"client{i}"
        out.mkdir()
        url = f"ftp://{LB}:{control}/"
        # One curl, one control connection, three transfers (three data connections). Every
        # other client uses PASV, where the address announced is the balancer's.
        argv = ["curl", "-sS", "--interface", src, "--max-time", "30"]
        if i % 2:
            argv.append("--disable-epsv")
        for name in ("whoami.txt", "a.bin", "b.bin"):
            argv += [url + name, "-o", str(out / name)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{src}: curl failed ({r.returncode}): {r.stderr}"
        for name, data in want.items():
            assert (out / name).read_bytes() == data, f"{src}: {name} differs"
        # A second session of the same client reaches the same server.
        again = subprocess.run(
            ["curl", "-sS", "--interface", src, url + "whoami.txt"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.stdout == (out / "whoami.txt").read_text()
        return again.stdout

    with ThreadPoolExecutor(6) as pool:
        servers = list(pool.map(session, range(12)))
    assert set(servers) == {"ftp1", "ftp2"}  # both servers took clients


def test_with_persistence_off_a_transfer_reaches_the_wrong_server(tmp_path: Path, files) -> None:
    """Passive range of one port on both servers. A parked session on one server holds that
    port open; with persistence off, the next client's data connection is scheduled afresh and
    lands on the parked server, and the transfer fails. With the recipe's persistence it works."""
    base = free_block(2)
    control, port = base, base + 1
    results = {}
    for timeout in ("0", "15m"):
        with processes() as procs:
            start_ftp(procs, FTP1, control, f"{port}-{port}", files["ftp1"])
            start_ftp(procs, FTP2, control, f"{port}-{port}", files["ftp2"])
            config = tmp_path / f"ftp-{timeout}.yaml"
            config.write_text(recipe(control, port, port, timeout))
            procs.append(start_l4lb(config))
            park = ftplib.FTP(timeout=5, source_address=("127.0.110.1", 0))
            park.connect(LB, control)
            park.login()
            park.sendcmd("PASV")  # its server now listens on the one passive port, waiting
            test = ftplib.FTP(timeout=3, source_address=("127.0.111.1", 0))
            test.connect(LB, control)  # rr: the other server
            test.login()
            chunks: list[bytes] = []
            try:
                test.retrbinary("RETR a.bin", chunks.append)
                results[timeout] = b"".join(chunks) == (files["ftp1"] / "a.bin").read_bytes()
            except (ftplib.Error, OSError):
                results[timeout] = False
            for conn in (test, park):
                with contextlib.suppress(OSError):
                    conn.close()
    assert results == {"0": False, "15m": True}

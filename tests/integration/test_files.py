"""Files l4lb reads (issue 33, Q3, Q4, Q9, Q11): workers take the QUIC-LB key from their
supervisor, not from disk; a FIFO or a device where a file is expected is refused at once and
stalls nothing; a killed save's temporary files are removed; an old state file too large to
parse in bounded memory is refused with a line. Real l4lb processes, real backends, real
clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from l4lb.core.quiclb import Codec
from tests.integration.test_workers import admin_get, curl
from tests.support.helpers import free_ports
from tests.support.procs import (
    l4lb_cli,
    output,
    processes,
    start_backend,
    start_l4lb,
    stop,
    wait_for_line,
    wait_port,
)

KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")
OTHER_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
SIDS = ("0a11", "0b22")


def quic_site(
    tmp_path: Path, workers: int, extra: str = ""
) -> tuple[Path, int, int, int, list[int]]:
    """Two backend processes (HTTP and UDP) with server IDs, and a configuration of a group
    with quic_lb (encrypted); the file, its TCP and UDP ports, the admin port, the backends'."""
    http, udp, aport, *bp = free_ports(7)
    (tmp_path / "quic.key").write_text(KEY.hex() + "\n")
    backends = "\n".join(
        f"      - {{name: b{i}, address: 127.0.0.1, server_id: '{sid}',"
        f" ports: {{{http}: {bp[2 * i]}, '{udp}/udp': {bp[2 * i + 1]}}}}}"
        for i, sid in enumerate(SIDS)
    )
    cfg = tmp_path / "l4lb.yaml"
    cfg.write_text(
        f"""workers: {workers}
admin: {{listen: "127.0.0.1:{aport}"}}
{extra}
groups:
  web:
    listen: [127.0.0.1]
    ports: [{http}, "{udp}/udp"]
    scheduler: rr
    persistence: {{timeout: 5m, netmask: /24}}
    quic_lb: {{server_id_length: 2, nonce_length: 6, key_file: quic.key}}
    backends:
{backends}
"""
    )
    return cfg, http, udp, aport, bp


def start_backends(procs: list[subprocess.Popen[str]], bp: list[int]) -> None:
    for i in range(2):
        procs.append(
            start_backend(f"b{i}", http=f"127.0.0.1:{bp[2 * i]}", udp=f"127.0.0.1:{bp[2 * i + 1]}")
        )
        wait_port(bp[2 * i])


def short(codec: Codec, sid: str) -> bytes:
    return bytes([0x41]) + codec.encode(bytes.fromhex(sid), os.urandom(6)) + b"data"


def ask(port: int, src: str, packet: bytes, within: float = 3.0) -> str | None:
    """One datagram from `src`; the name of the backend that answered, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(within)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(2048).split(b" ", 1)[0].decode()
        except TimeoutError:
            return None


def kill_worker(lb: subprocess.Popen[str], aport: int, index: int) -> None:
    (w,) = [w for w in admin_get(aport, "/api/v1/workers")["workers"] if w["index"] == index]
    os.kill(w["pid"], signal.SIGKILL)
    wait_for_line(lb, "stderr", f"worker {index} ready", timeout=30)


def served_then_stopped(
    tmp_path: Path, state: Path, before_stop: Callable[[], object] = lambda: None
) -> str:
    """l4lb with `state_file: state` serves a client, then stops cleanly; what it logged."""
    cfg, http, _udp, _aport, bp = quic_site(tmp_path, 1, f"state_file: {state}")
    with processes() as procs:
        start_backends(procs, bp)
        lb = start_l4lb(cfg)
        procs.append(lb)
        assert curl(f"http://127.0.0.1:{http}/", "127.0.9.9") in ("b0", "b1")
        before_stop()
        assert stop(lb) == 0
        return output(lb)


def test_a_restarted_worker_keeps_the_supervisors_key_whatever_the_disk_says(
    tmp_path: Path,
) -> None:
    """Q3 as the probe saw it: with the key file renamed, a killed worker never came back (18 of
    40 /24s timed out over TCP); with a new key written and no reload, the two workers used
    different keys (22 of 40 networks' IDs dropped). Now a worker's key is its supervisor's."""
    cfg, http, udp, aport, bp = quic_site(tmp_path, 2)
    codec = Codec(0, 2, 6, KEY)
    with processes() as procs:
        start_backends(procs, bp)
        lb = start_l4lb(cfg)
        procs.append(lb)
        (tmp_path / "quic.key").rename(tmp_path / "quic.key.gone")
        kill_worker(lb, aport, 1)
        answered = [curl(f"http://127.0.0.1:{http}/", f"127.0.{100 + n}.5") for n in range(40)]
        assert all(a in ("b0", "b1") for a in answered), answered
        (tmp_path / "quic.key").write_text(OTHER_KEY.hex())  # rewritten, and no reload
        kill_worker(lb, aport, 0)
        for n in range(40):
            assert ask(udp, f"127.0.{150 + n}.5", short(codec, SIDS[1])) == "b1", n


def test_a_fifo_as_key_file_at_reload_is_refused_at_once_and_stalls_nothing(
    tmp_path: Path,
) -> None:
    """Q4: a FIFO named as key_file at SIGHUP froze UDP, TCP and the admin API for 10 s. Now
    the reload is refused in one line and every request meanwhile is answered."""
    cfg, http, _udp, aport, bp = quic_site(tmp_path, 1)
    with processes() as procs:
        start_backends(procs, bp)
        lb = start_l4lb(cfg)
        procs.append(lb)
        os.mkfifo(tmp_path / "fifo.key")
        cfg.write_text(cfg.read_text().replace("key_file: quic.key", "key_file: fifo.key"))
        lb.send_signal(signal.SIGHUP)
        started = time.monotonic()
        refused = wait_for_line(lb, "stderr", "reload refused", timeout=10)[-1]
        assert "fifo.key: not a regular file" in refused, refused
        assert curl(f"http://127.0.0.1:{http}/", "127.0.9.9") in ("b0", "b1")
        assert admin_get(aport, "/healthz")
        assert time.monotonic() - started < 5
        (tmp_path / "zero.key").symlink_to("/dev/zero")
        cfg.write_text(cfg.read_text().replace("key_file: fifo.key", "key_file: zero.key"))
        lb.send_signal(signal.SIGHUP)
        refused = wait_for_line(lb, "stderr", "reload refused", timeout=10)[-1]
        assert "zero.key: not a regular file" in refused, refused
        assert stop(lb) == 0
        assert "Traceback" not in output(lb)


def test_check_refuses_a_device_as_key_file_in_one_line(tmp_path: Path) -> None:
    """Q4: /dev/zero as key_file gave a MemoryError traceback."""
    cfg, *_ = quic_site(tmp_path, 1)
    cfg.write_text(cfg.read_text().replace("key_file: quic.key", "key_file: /dev/zero"))
    got = l4lb_cli("check", "-c", str(cfg))
    assert got.returncode == 1
    assert "groups.web.quic_lb.key_file: cannot read /dev/zero: not a regular file" in got.stderr
    assert "Traceback" not in got.stderr and len(got.stderr.strip().splitlines()) == 1


def test_a_fifo_as_state_file_is_refused_with_a_line_and_the_start_goes_on(tmp_path: Path) -> None:
    """Q4: a FIFO as state_file hung the start with no line and ignored SIGTERM."""
    state = tmp_path / "pins.json"
    os.mkfifo(state)
    said = served_then_stopped(tmp_path, state, before_stop=state.unlink)  # (a file at the save)
    assert "ignoring the state file: cannot read" in said
    assert "pins.json: not a regular file" in said


def test_a_killed_saves_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    """Q9: each kill -9 during a save left a hidden `.l4lb-state-*` file, never removed."""
    state = tmp_path / "pins.json"
    strays = [tmp_path / ".l4lb-state-k2j4x_9q", tmp_path / ".l4lb-state-pins.json-ab12cd34"]
    for stray in strays:
        stray.write_text("{" * 1000)
    neighbour = tmp_path / ".l4lb-state-other.json-ab12cd34"  # another file's save: kept
    neighbour.write_text("x")

    def removed() -> None:
        assert not any(s.exists() for s in strays) and neighbour.exists()

    said = served_then_stopped(tmp_path, state, before_stop=removed)
    assert "removed 2 temporary file(s) of saves killed mid-write" in said
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".l4lb-state-pins")]


def test_a_large_state_file_of_the_old_format_is_refused_with_a_line(tmp_path: Path) -> None:
    """Q11: a 68 MB state file of version 1 took 4.6 s to start and 0.97 GB of RSS. Version 1
    is one JSON document parsed whole; past 16 MiB it is refused with a line, and the start
    goes on at once."""
    state = tmp_path / "pins.json"
    rows = ",".join(f'[{2130706432 + (n << 8)},"b0",100]' for n in range(1_000_000))
    head = json.dumps({"version": 1, "saved_at": time.time()})[:-1]
    state.write_text(head + f', "groups": {{"web": {{"netmask": 24, "entries": [{rows}]}}}}}}')
    assert state.stat().st_size > 16 << 20
    said = served_then_stopped(tmp_path, state)
    assert "is a state file of version 1 over 16 MiB: not read" in said

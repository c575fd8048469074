"""Hostile and careless input: config files, admin requests, PROXY headers, descriptor
exhaustion, a backend pointing at the balancer itself. Each refusal is one clear line (or none),
counted, and the process keeps serving; no log line is ever a traceback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_ops import TOKEN, Site, metric, who
from tests.support.procs import ROOT, output, processes, wait_for_line

L4LB = [sys.executable, "-m", "l4lb"]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*L4LB, "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30
    )


GOOD = "groups:\n  web:\n    ports: [18080]\n    backends: [{name: a, address: 127.0.0.2}]\n"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (
            GOOD.replace("    backends", "    quorum: !custom 1\n    backends"),
            4,
            "unknown tag '!custom'",
        ),
        ("groups: !!python/object:os.system {}\n", 1, "unknown tag"),
        ("groups:\n  web: !!python/object/apply:os.system [true]\n", 2, "unknown tag"),
        (GOOD + "\x01\n", 5, "character #x0001 is not allowed"),
        (GOOD.replace("[18080]", "[18080, \x07]"), 3, "character #x0007"),
        ("groups: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nested too deeply"),
        (
            GOOD.replace("address: 127.0.0.2", 'address: !!binary "a"'),
            4,
            "cannot read 'a' as !!binary",
        ),
        (GOOD.replace("[18080]", '[!!timestamp "x"]'), 3, "cannot read 'x' as !!timestamp"),
        (GOOD + "  web2: {ports: [1\n", 6, "invalid YAML"),
        ('admin: {"a\\nb": 1}\n' + GOOD, 1, "admin.a\\x0ab: unknown key"),  # found by the fuzzer
    ],
)
def test_yaml_errors_are_one_line_naming_their_own_line(
    tmp_path: Path, text: str, line: int, needle: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = check(path)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{path}:{line}: ") and needle in lines[0], lines[0]


def test_a_reload_with_a_bad_tag_is_refused_counted_and_answered_400(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    site = Site(tmp_path)
    with processes() as procs:
        site.start_backends(procs)
        lb = site.start(procs)
        who(site.p1, "127.0.70.1")
        good = site.config.read_text()
        site.config.write_text(good.replace("scheduler: rr", "scheduler: !custom rr"))
        lb.send_signal(signal.SIGHUP)
        lines = wait_for_line(lb, "stderr", "reload refused")
        assert "unknown tag '!custom'" in lines[-1]
        req = urllib.request.Request(
            f"http://127.0.0.1:{site.admin}/api/v1/reload",
            method="POST",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert (
            refused.value.code == 400 and "unknown tag" in json.loads(refused.value.read())["error"]
        )
        text = urllib.request.urlopen(f"http://127.0.0.1:{site.admin}/metrics", timeout=10).read()
        assert metric(text.decode(), "l4lb_reloads_total", result="failed") == 2
        assert who(site.p1, "127.0.70.1")  # still serving, on the configuration it had
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(15) == 0
        log = output(lb)
    assert "Traceback" not in log and "never retrieved" not in log


# ------------------------------------------------------------------ the admin listener


def raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send `data` to the admin listener and read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def test_admin_abuse_is_refused_counted_and_never_a_traceback(tmp_path: Path) -> None:
    site = Site(tmp_path, extra_top="")
    site.top = site.top.replace(
        "token_file: token}",
        "token_file: token, request_timeout: 1s, max_connections: 40, max_connections_per_peer: 100}",
    )
    site.write()
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    with processes() as procs:
        site.start_backends(procs)
        lb = site.start(procs)
        port = site.admin
        post = b"POST /api/v1/backends/web/web1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"

        def body(b: bytes) -> bytes:
            return (
                post + auth + f"Content-Length: {len(b)}\r\nConnection: close\r\n\r\n".encode() + b
            )

        answers = {
            "bad_version": raw(port, b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n"),
            "header_too_long": raw(port, b"GET / HTTP/1.1\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n"),
            "too_many_headers": raw(
                port,
                b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(1000)) + b"\r\n",
            ),
            "bad_content_length": raw(port, post + b"Content-Length: -5\r\n\r\n"),
            "bad_chunking": raw(
                port, post + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
            "huge_int": raw(port, body(b'{"weight": ' + b"9" * 4301 + b"}")),
            "deep": raw(port, body(b"[" * 30_000 + b"]" * 30_000)),
        }
        for what, answer in answers.items():
            assert status_of(answer) == 400, (what, answer[:200])
        assert b"digits" in answers["huge_int"] and b"nested too deeply" in answers["deep"]

        # An announced 10 GB body: 413 at once, without a byte of it sent.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(post + b"Content-Length: 10000000000\r\n\r\n")
            assert status_of(s.recv(65536)) == 413

        # Half a header on 60 connections: 40 are held until the timeout closes them, 20
        # are told 503 at once; afterwards the listener answers as before.
        t0 = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        for s in socks:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: lo")
        busy = closed = 0
        for s in socks:
            data = s.recv(65536)
            busy += status_of(data) == 503
            closed += data == b""
            s.close()
        # (a connection of the requests above may still be closing: one 503 more)
        assert busy + closed == 60 and 20 <= busy <= 22 and time.monotonic() - t0 < 5
        metrics = raw(
            port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ).decode()
        refused = "l4lb_admin_requests_refused_total"
        assert metric(metrics, refused, reason="header_timeout") == closed
        assert metric(metrics, refused, reason="too_many_connections") == busy
        assert metric(metrics, refused, reason="too_large") == 1
        assert metric(metrics, refused, reason="bad_version") == 1
        assert metric(metrics, refused, reason="header_too_long") >= 1
        assert metric(metrics, refused, reason="bad_content_length") == 1
        assert metric(metrics, refused, reason="bad_chunking") == 1
        assert metric(metrics, refused, reason="bad_request") == 2  # the two bodies
        assert who(site.p1, "127.0.71.1")
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(15) == 0
        log = output(lb)
    assert "Traceback" not in log, log
    assert log.count("refused a malformed admin request") <= 6, log


# Descriptor exhaustion (defect 5) is the reliability suite's "descriptors" experiment, which
# make test runs (tests/integration/test_reliability.py): 400 clients at nofile=256, every refusal a reset
# and counted in l4lb_accept_errors_total{errno="EMFILE"}, no backend marked down.


# ------------------------------------------------------------------ a backend that is l4lb


@pytest.mark.parametrize(
    ("listen", "backend", "line"),
    [
        ("[127.0.0.1]", "{name: a, address: 127.0.0.1}", 6),  # the case: no port map
        (
            '["0.0.0.0"]',
            "{name: a, address: 127.0.0.9}",
            6,
        ),  # a wildcard covers every local address
        ('["::"]', "{name: a, address: 127.0.0.1}", 6),  # a dual-stack one takes IPv4 too
        (
            "[127.0.0.1]",
            "{name: a, address: 127.0.0.2, ports: {18080: 9}}\n      - {name: b, address: 127.0.0.1, ports: {18080: 18081}}",
            7,
        ),
    ],
)
def test_a_backend_that_is_a_listener_of_l4lb_is_a_config_error(
    tmp_path: Path, listen: str, backend: str, line: int
) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        f"groups:\n  web:\n    listen: {listen}\n    ports: [18080, 18081]\n    backends:\n      - {backend}\n"
    )
    r = check(path)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"{path}:{line}: groups.web.backends[") and "would loop" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_other_addresses_and_ports_are_no_loop(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [18080]\n    backends:\n"
        "      - {name: a, address: 127.0.0.2}\n      - {name: b, address: 127.0.0.1, ports: {18080: 18090}}\n"
    )
    assert check(path).returncode == 0


async def test_at_run_time_a_connection_from_our_own_dial_is_refused(backends) -> None:
    """What the file cannot show (an address that became ours, a REDIRECT back to us): the
    looped connection is refused at once, counted, and the client gets a reset."""
    import asyncio
    from dataclasses import replace

    from tests.support.helpers import config_of, free_ports, group_yaml, running

    (port,) = free_ports(1)
    (b,) = await backends(1, [port])
    cfg = config_of(group_yaml("web", [port], [b.yaml()]))
    group = cfg.groups[0]
    looping = replace(group.backends[0], ports={port: port})  # itself
    cfg = replace(cfg, groups=(replace(group, backends=(looping,), passive_failures=0),))
    async with running(cfg) as server:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.90.1", 0))
        w.write(b"hello")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        # A loop or two (when our accept ran before the dial's own callback, the inner
        # connection had begun its dial), never the hundreds until the descriptors run out.
        assert 1 <= server.plane.loops <= 3 and server.routers["web"].stats.accepted <= 4
        (looping_backend,) = server.routers["web"].backends
        assert not looping_backend.healthy  # so that no further dial repeats it
        await asyncio.wait_for(server.wait_quiet(), 5)
        assert server.plane.inbound == {} and server.plane.outgoing == {}

"""The admin listener refuses before it parses: headers that are not ASCII, one peer's flood of
slow connections, a Host that is not its own (DNS rebinding), framing; and reads that need the
token when the operator says so. Real sockets against an in-process l4lb."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config_text
from tests.support.helpers import config_of, free_ports, group_yaml, running

GROUP = group_yaml("web", [1], ["- {name: a, address: 192.0.2.1}"])


def admin_config(tmp_path: Path, extra: str = "") -> tuple[int, str, str]:
    """A config with an admin listener on a free port and a token file: (port, token, YAML)."""
    (port,) = free_ports(1)
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token)
    top = f"admin: {{listen: '127.0.0.1:{port}', token_file: '{tmp_path}/token'{extra}}}\n"
    return port, token, top


async def ask(port: int, head: bytes, src: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send one raw request head; the status code and the head of the answer."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        w.write(head)
        answer = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        return int(answer.split(b" ", 2)[1]), answer
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()


async def test_headers_that_are_not_ascii_are_refused_and_counted_never_a_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port, _token, top = admin_config(tmp_path)
    caplog.set_level(logging.INFO)
    bad = [
        b"POST /api/v1/reload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"GET /api/v1/groups HTTP/1.1\r\nHost: localhost\r\nX-Name: caf\xc3\xa9\r\n\r\n",
        b"POST /api/v1/reload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t\xc3\xa9\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: \x80\x81\r\n\r\n",
    ]
    async with running(config_of(GROUP, top=top)) as server:
        statuses = [(await ask(port, bad[i % len(bad)]))[0] for i in range(1000)]
        assert set(statuses) <= {400, 401}, sorted(set(statuses))
        assert server.admin_refused.get("bad_header", 0) == 1000
        assert (await ask(port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 200
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_one_peer_holding_slow_connections_cannot_shut_another_out(
    tmp_path: Path,
) -> None:
    port, _token, top = admin_config(tmp_path)
    async with running(config_of(GROUP, top=top)) as server:
        slow = []
        for _ in range(64):  # every one a head that never ends, from one address
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            w.write(b"GET /healthz HTTP/1.1\r\nHost: localh")
            slow.append((r, w))
        try:
            for _ in range(5):  # another peer's /healthz answers throughout
                status, _ = await ask(
                    port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.3"
                )
                assert status == 403  # (x is no Host of this API: answered, and refused)
                status, _ = await ask(
                    port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "127.0.0.3"
                )
                assert status == 200
            assert server.admin_refused["too_many_from_peer"] == 64 - 16
        finally:
            for _r, w in slow:
                w.close()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        (b"evil.example", 403),
        (b"evil.example:{port}", 403),
        (b"localhost:{port}", 200),
        (b"LOCALHOST.", 200),
        (b"127.0.0.1:{port}", 200),
        (b"[::1]:{port}", 200),
        (b"lb.example.com:{port}", 200),  # listed in admin.hosts
        (b"LB.Example.COM", 200),
        (b"other.example.com", 403),
    ],
)
async def test_a_host_that_is_not_the_apis_is_refused(
    tmp_path: Path, host: bytes, status: int
) -> None:
    port, _token, top = admin_config(tmp_path, ", hosts: [lb.example.com]")
    async with running(config_of(GROUP, top=top)) as server:
        head = b"GET /api/v1/affinity HTTP/1.1\r\nHost: " + host.replace(
            b"{port}", str(port).encode()
        )
        got, answer = await ask(port, head + b"\r\n\r\n")
        assert got == status, answer
        assert server.admin_refused.get("bad_host", 0) == (1 if status == 403 else 0)


async def test_no_answer_of_the_api_can_be_framed(tmp_path: Path) -> None:
    port, _token, top = admin_config(tmp_path)
    async with running(config_of(GROUP, top=top)):
        for head in (
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /api/v1/groups HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /no/such/page HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"POST /api/v1/reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ):
            _status, answer = await ask(port, head)
            assert b"\r\nX-Frame-Options: DENY\r\n" in answer, answer
            assert b"\r\nContent-Security-Policy: frame-ancestors 'none'\r\n" in answer


async def test_read_token_makes_reads_need_the_token_but_health(tmp_path: Path) -> None:
    port, token, top = admin_config(tmp_path, ", read_token: true")
    auth = f"Authorization: Bearer {token}\r\n".encode()
    async with running(config_of(GROUP, top=top)):
        for path in (b"/api/v1/affinity", b"/api/v1/groups", b"/metrics"):
            head = b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
            assert (await ask(port, head + b"\r\n"))[0] == 401
            assert (await ask(port, head + auth + b"\r\n"))[0] == 200
        for path in (b"/healthz", b"/readyz"):
            assert (await ask(port, b"GET " + path + b" HTTP/1.1\r\nHost: x.1\r\n\r\n"))[0] == 403
            assert (await ask(port, b"GET " + path + b" HTTP/1.0\r\n\r\n"))[0] == 200
        # Q8 (issue 33): the status page itself opens (it holds no data; its reads send the
        # token typed in its box, and it says so on a 401)
        status, answer = await ask(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 200, answer


async def test_half_closed_requests_put_no_traceback_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Q7 (issue 33): 50 half-closed `GET /api/v1/affinity` (the client shuts its side down
    after the request) put 50 tracebacks in the log; now each is counted as client_gone."""
    port, _token, top = admin_config(tmp_path)
    caplog.set_level(logging.DEBUG)
    async with running(config_of(GROUP, top=top)) as server:
        for _ in range(50):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /api/v1/affinity HTTP/1.1\r\nHost: localhost\r\n\r\n")
            w.write_eof()
            await r.read()
            w.close()
        assert (await ask(port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 200
        assert server.admin_refused.get("client_gone", 0) >= 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    assert "Traceback" not in caplog.text


async def test_healthz_answers_while_slow_peers_hold_every_admin_slot(tmp_path: Path) -> None:
    """Q10 (issue 33): four loopback peers of 16 slow connections each (the listener's 64)
    kept /healthz at 503; a liveness probe is answered over the limits, anything else 503."""
    port, _token, top = admin_config(tmp_path)
    async with running(config_of(GROUP, top=top)) as server:
        slow = []
        for i in range(64):
            src = f"127.0.0.{2 + i // 16}"
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
            w.write(b"GET /healthz HTTP/1.1\r\nHost: localh")
            slow.append((r, w))
        try:
            for src in ("127.0.0.1", "127.0.0.2"):  # a new peer, and one of the slow ones
                probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                assert (await ask(port, probe, src))[0] == 200, src
                other = b"GET /api/v1/groups HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                assert (await ask(port, other, src))[0] == 503, src
            assert server.admin_refused["too_many_connections"] >= 2
        finally:
            for _r, w in slow:
                w.close()


def test_an_admin_api_open_to_the_network_is_warned_of(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(24))
    wide = load_config_text(
        f"admin: {{listen: '0.0.0.0:9999', token_file: '{token}'}}\n" + "groups:\n" + GROUP,
        "f.yaml",
    )
    assert any(
        "admin.listen: warning: the admin API listens on 0.0.0.0, beyond loopback" in w
        and "read_token: true" in w
        for w in wide.warnings
    ), wide.warnings
    for quiet in (
        f"admin: {{listen: '0.0.0.0:9999', token_file: '{token}', read_token: true}}\n",
        "admin: {listen: '127.0.0.1:9999'}\n",
        "admin: {listen: '[::1]:9999'}\n",
    ):
        assert load_config_text(quiet + "groups:\n" + GROUP, "f.yaml").warnings == ()
    with pytest.raises(ConfigError) as exc:
        load_config_text("admin: {read_token: true}\ngroups:\n" + GROUP, "f.yaml")
    assert exc.value.lines == ["f.yaml:1: admin.read_token: needs a token_file"]


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("replace-me-with-a-long-random-token", "the example's placeholder"),
        ("short-token", "holds 11 bytes: a token is at least 16"),
        ("t", "holds 1 bytes"),
    ],
)
def test_tokens_that_cannot_be_secrets_are_refused(tmp_path: Path, token: str, says: str) -> None:
    (tmp_path / "token").write_text(token + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config_text(f"admin: {{token_file: '{tmp_path}/token'}}\ngroups:\n" + GROUP, "f.yaml")
    (line,) = exc.value.lines
    assert line.startswith("f.yaml:1: admin.token_file: ") and says in line
    assert "secrets.token_urlsafe" in line  # and the one command that makes a good one

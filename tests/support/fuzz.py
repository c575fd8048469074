"""Hypothesis fuzzing of the two inputs an outsider or a careless operator controls: the config
loader and the admin API. Each fuzzer returns None, or the first failure it found, shrunk."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.config import ConfigError, load_config_text

BASE = """\
admin: {listen: '127.0.0.1:9090'}
state_interval: 30s
groups:
  web:
    mark: 1
    listen: [127.0.0.1]
    ports: [8080, 8443, "30000-30010"]
    scheduler: wlc
    persistence: {timeout: 5m, netmask: /24, ipv6_prefix: 64, max_entries: 1000}
    client_limits: {max_conns: 10, rate: 5/s}
    slow_start: 10s
    health_check: {type: http, path: /, interval: 1s, status: [200, "300-399"]}
    sorry_server: {address: 192.0.2.9}
    backends:
      - {name: a, address: 192.0.2.1, weight: 2, ports: {8080: 9000}}
      - name: b
        address: "2001:db8::1"
        health_check: {type: tcp, send: "PING\\r\\n", expect: "^\\\\+PONG"}
"""

LINE = re.compile(r"^fuzz\.yaml:\d+: \S")
KEYS = [
    "groups",
    "web",
    "ports",
    "backends",
    "name",
    "address",
    "weight",
    "persistence",
    "timeout",
    "netmask",
    "health_check",
    "type",
    "client_limits",
    "rate",
    "burst",
    "max_conns",
    "slow_start",
    "listen",
    "mark",
    "scheduler",
    "sorry_server",
    "admin",
    "workers",
    "affinity_store",
    "accept_proxy",
    "trusted",
    "kernel_mark",
    "state_file",
]
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["5m", "/24", "255.255.0.255", "10/s", "::", "-1"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
JUNK = [
    "!custom ",
    "!!python/object:os.system ",
    "&a ",
    "*a",
    "\x00",
    "\x07",
    "\t",
    "{",
    "[",
    "- ",
    ": ",
    "'",
    '"',
    "\n",
    "#",
    "%YAML 1.1\n",
    "---\n",
    "!!binary ",
    "? ",
    "|\n",
]


@st.composite
def configs(draw: st.DrawFn) -> str:
    """The valid base, mutated: a value replaced, junk spliced in, lines dropped or doubled."""
    lines = BASE.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.integers(0, 4))
        if how == 0 and ":" in lines[i]:
            key, _, _ = lines[i].partition(":")
            value = yaml.safe_dump(draw(yaml_values), default_flow_style=True).strip()
            lines[i] = f"{key}: {value.removesuffix('...').strip()}"
        elif how == 1:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(JUNK)) + lines[i][at:]
        elif how == 2 and len(lines) > 1:
            del lines[i]
        elif how == 3:
            lines.insert(i, lines[i])
        else:
            lines[i] = draw(st.text(max_size=40))
    return "\n".join(lines) + "\n"


def fuzz_config_loader(n: int) -> str | None:
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(text=configs() | st.text(max_size=300))
    def check(text: str) -> None:
        try:
            load_config_text(text, "fuzz.yaml")
        except ConfigError as exc:
            assert exc.lines, "an error without a line"
            for line in exc.lines:
                assert LINE.match(line) and "\n" not in line, f"not one FILE:LINE line: {line!r}"

    try:
        check()
    except Exception as exc:  # what hypothesis found, shrunk
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    return None


# ------------------------------------------------------------------ the admin API

PATHS = [
    "/",
    "/metrics",
    "/healthz",
    "/readyz",
    "/api/v1/groups",
    "/api/v1/backends",
    "/api/v1/backends/web/b0",
    "/api/v1/backends/web/b1",
    "/api/v1/backends/web/zz",
    "/api/v1/backends/nope/b0",
    "/api/v1/affinity",
    "/api/v1/events",
    "/api/v1/history",
    "/api/v1/reload",
    "/api/v1/../../etc/passwd",
    "/%00",
    "/api/v1/backends/web/b0/x",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["up", "drain", "disabled", "down"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["state", "weight", "x"]) | st.text(max_size=5), inner, max_size=3
        )
    ),
    max_leaves=8,
)
bodies = st.one_of(
    st.none(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"{",
            b'{"weight": 1e999}',
            b'{"weight": ' + b"9" * 5000 + b"}",
            b"[" * 3000 + b"]" * 3000,
            b'{"state": "drain", "weight": 0}',
        ]
    ),
)
queries = st.dictionaries(
    st.sampled_from(["group", "client", "backend", "limit", "format", "x"]),
    st.sampled_from(
        [
            "web",
            "nope",
            "127.0.0.1",
            "127.0.0.0/8",
            "::1",
            "bad",
            "-1",
            "99999999999999999999",
            "",
            "0.0.0.0/0",
            "1" * 5000,
        ]
    ),
    max_size=3,
)


def fuzz_admin_api(admin: int, port: int, n: int) -> str | None:
    from urllib.parse import urlencode

    from tests.support.lab import TOKEN

    def ask(
        method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=15)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def state() -> Any:
        backends = json.loads(ask("GET", "/api/v1/backends")[1])["backends"]
        pins = json.loads(ask("GET", "/api/v1/affinity")[1])["total"]
        return [(b["name"], b["admin_state"], b["weight"]) for b in backends], pins

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]),
        path=st.sampled_from(PATHS),
        query=queries,
        body=bodies,
        token=st.sampled_from([None, TOKEN, "wrong", TOKEN + "x", ""]),
    )
    def check(
        method: str, path: str, query: dict[str, str], body: bytes | None, token: str | None
    ) -> None:
        before = state()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = path + ("?" + urlencode(query) if query else "")
        status, _ = ask(method, url, body, headers)
        assert status < 500, f"{method} {url} {body!r:.80} -> {status}"
        if status >= 400:
            assert state() == before, f"{method} {url} {body!r:.80} -> {status} changed state"

    try:
        check()
    except Exception as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    return None

"""The state file is input like any other: whatever it holds, l4lb starts, serves, restores
what is sound and reports the rest, and the API answers. Each corrupt file the issue found,
then hypothesis writing arbitrary JSON and arbitrary bytes."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb import Server
from l4lb.config import load_config_text
from tests.support.helpers import free_ports, group_yaml, hello, running, saved_pins
from tests.support.hostile import CORRUPT_STATE

V6_TAG = 1 << 128


def config_text(tmp: Path, port: int, admin: int, backend_port: int) -> str:
    return (
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"state_file: '{tmp}/pins.json'\n"
        "groups:\n"
        + group_yaml(
            "web",
            [port],
            [f"- {{name: a, address: 127.0.0.1, ports: {{{port}: {backend_port}}}}}"],
            netmask="/24",
        )
    )


@pytest.mark.parametrize("content", list(CORRUPT_STATE.values()), ids=list(CORRUPT_STATE))
async def test_l4lb_starts_and_serves_whatever_the_state_file_holds(
    backends, tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    port, admin = free_ports(2)
    (b,) = await backends(1, [port])
    (tmp_path / "pins.json").write_text(content, encoding="utf-8", errors="surrogateescape")
    text = config_text(tmp_path, port, admin, b.ports[port])
    caplog.set_level(logging.INFO)
    async with running(load_config_text(text, str(tmp_path / "l4lb.yaml"))) as server:
        assert await hello(port, "127.0.3.1") == b.name
        table = server.routers["web"].table
        assert table is not None
        for key, _backend, left in table.snapshot():
            assert 0 <= key < 1 << 32 or V6_TAG <= key < 2 * V6_TAG
            assert 0 < left <= 360
        loop = asyncio.get_running_loop()
        url = f"http://127.0.0.1:{admin}/api/v1/affinity"
        status, body = await loop.run_in_executor(None, fetch, url)
        assert status == 200 and "entries" in json.loads(body)
    assert "Traceback" not in caplog.text
    assert any("state file" in r.getMessage() for r in caplog.records)
    again = saved_pins(tmp_path / "pins.json")  # what shutdown saved is sound
    assert again["web"]
    for key in again["web"]:
        assert 0 <= key < 1 << 32


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
ENTRY = st.lists(JSON, min_size=0, max_size=4) | st.tuples(
    st.integers(-(2**130), 2**130) | JSON, st.sampled_from(["a", "b", ""]) | JSON, JSON
).map(list)
STATE = st.fixed_dictionaries(
    {"version": st.just(1) | JSON, "saved_at": st.floats() | st.integers() | JSON},
    optional={
        "groups": st.dictionaries(
            st.sampled_from(["web", "other"]) | st.text(max_size=4),
            st.fixed_dictionaries(
                {"entries": st.lists(ENTRY, max_size=6) | JSON},
                optional={"netmask": st.just(0xFFFFFF00) | JSON, "ipv6_prefix": st.just(128)},
            )
            | JSON,
            max_size=3,
        )
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=STATE.map(lambda d: json.dumps(d).encode())
    | JSON.map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=200)
)
def test_fuzzed_state_files_never_stop_a_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "pins.json").write_bytes(content)
    port, admin, backend = free_ports(3)
    config = load_config_text(config_text(tmp_path, port, admin, backend), "fuzz.yaml")

    async def start_and_serve() -> None:
        server = Server(config)
        await server.start()
        try:
            for _key, b, left in server.routers["web"].table.snapshot():  # type: ignore[union-attr]
                assert b.name == "a" and 0 < left <= 360
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(
                None, fetch, f"http://127.0.0.1:{admin}/api/v1/affinity"
            )
            assert status == 200
            json.loads(body)  # (no NaN nor Infinity in it: JSON.parse would refuse them)
        finally:
            await server.shutdown(grace=0.1)

    asyncio.run(start_and_serve())

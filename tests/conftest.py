from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import uvloop

from l4lb import native
from tests.support.helpers import NamedBackend


def pytest_report_header() -> str:
    """Which build the suite runs: compiled (mypyc) or pure Python, and why (l4lb/native.py)."""
    return f"l4lb build: {native.describe()}"


@pytest_asyncio.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[list[NamedBackend]]]]:
    """`await backends(n, service_ports)`: n named echo backends, stopped after the test
    whether it passed or not (a server left open would hang the loop's close)."""
    started: list[NamedBackend] = []

    async def make(
        n: int, service_ports: list[int], prefix: str = "b", **kw: object
    ) -> list[NamedBackend]:
        new = [
            await NamedBackend(f"{prefix}{len(started) + i}", **kw).start(service_ports)
            for i in range(n)
        ]  # type: ignore[arg-type]
        started.extend(new)
        return new

    yield make
    for b in started:
        await b.stop()


@pytest_asyncio.fixture
async def cleanup() -> AsyncIterator[Callable[[Any], Any]]:
    """`cleanup(x)` closes x (a socket, a server, a NamedBackend) after the test, pass or fail."""
    things: list[Any] = []

    def register(x: Any) -> Any:
        things.append(x)
        return x

    yield register
    for x in reversed(things):
        if isinstance(x, NamedBackend):
            await x.stop()
        elif isinstance(x, asyncio.AbstractServer):
            x.close()
            await x.wait_closed()
        else:
            x.close()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every async test runs on uvloop (production) and on the standard loop (the fallback)."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """A closing line naming what was skipped and why, and the one command that installs
    what those tests need."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    parts = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1]))
    n = len(skipped)
    tools = any(w in why for why in reasons for w in ("need", "install", "make deps"))
    hint = (
        " `make deps` (as root) installs the tools they need; `.ci/run` uses it too."
        if tools
        else ""
    )
    terminalreporter.write_line(f"skipped {n} test{'' if n == 1 else 's'}: {parts}.{hint}")

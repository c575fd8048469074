"""The status page as an operator sees it: opened fresh after traffic, in a real headless
Chromium driven over the DevTools protocol, read from the rendered DOM, and its buttons clicked."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.reliability import Load
from tests.support.cdp import CHROMIUM, browser
from tests.support.helpers import free_ports
from tests.support.lab import TOKEN, Backend, group_yaml, lab

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"
)
ROWS = "[...document.querySelectorAll('#backends tbody tr')]"


def api(admin: int, path: str, body: bytes | None = None) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        data=body,
        method="POST" if body is not None else "GET",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return bytes(r.read())


def test_a_fresh_status_page_shows_the_history_and_every_backend_fact(tmp_path: Path) -> None:
    ports = free_ports(2)
    with lab(tmp_path) as lb_:
        bs = [lb_.backend(f"b{i}") for i in range(3)]
        group = group_yaml(
            bs,
            ports,
            extra="persistence: {timeout: 10m, netmask: /24}\n"
            "health_check: {type: tcp, interval: 300ms}",
        ).replace("name: b0, address", "name: b0, max_conns: 50, address")
        _lb, admin = lb_.l4lb(group)
        sources = [f"127.0.{n}.1" for n in range(40, 60)]
        with Load(ports[0], sources, threads=2) as load, Load(ports[1], sources, threads=1):
            time.sleep(12)  # the traffic is the point: the page must show its history
        assert load.done > 0 and not load.failures  # traffic flowed (how much is the bench's)
        api(admin, "/api/v1/backends/web/b2", b'{"weight": 3}')
        asyncio.run(look_and_click(tmp_path, admin, bs, ports))
        csv = api(admin, "/api/v1/backends?format=csv").decode().splitlines()
        assert csv[0].startswith("group,name,addresses,state") and len(csv) == 4
        assert lb_.tracebacks() == []


async def look_and_click(tmp_path: Path, admin: int, bs: list[Backend], ports: list[int]) -> None:
    async with browser(tmp_path, f"http://127.0.0.1:{admin}/") as page:
        await page.until(f"{ROWS}.length === 3")
        # The history came from the server: a fresh page draws it at once, on a time axis.
        points = await page.js(
            "[...document.querySelectorAll('.chart polyline')]"
            ".map(p => p.getAttribute('points').split(' ').length)"
        )
        assert len(points) == 3 and min(points) >= 2, points
        assert await page.js("document.querySelectorAll('#chart-conns text.tick').length") == 5
        # The bytes axis in units (a rate is fractional: "565.1047717922443 B" was a bug)
        top = await page.js("document.querySelectorAll('#chart-bytes text')[1].textContent")
        assert re.fullmatch(r"\d+ B|\d+\.\d KiB|\d+\.\d MiB|\d+\.\d GiB", top), top
        assert await page.js("bytes(565.1047717922443)") == "565 B"
        rate = await page.js("document.querySelector('#groups tbody tr').children[7].textContent")
        assert float(rate) > 0, rate
        rows = await page.js(f"{ROWS}.map(r => [...r.children].map(c => c.textContent))")
        by_name = {r[1]: r for r in rows}
        for b in bs:
            r = by_name[b.name]
            for sp in ports:  # the address:port of each service port
                assert f"127.0.0.1:{b.ports['echo']} ({sp})" in r[2]
            assert r[3].startswith("up for ")  # the state, and the time since it changed
            assert r[5] == "0s"  # downtime
            assert int(r[8]) >= 1  # peak connections
            assert r[10] == "0"  # queue
            assert r[13].endswith("B") and r[14].endswith("B")  # bytes in and out
            assert "refused 0, timeout 0, error 0" in r[15]
            assert r[16] == "connected"
        assert by_name["b0"][9] == "50" and by_name["b1"][9] == "\u2013"  # the limit, or none
        assert by_name["b2"][6] == "3"  # the new weight
        # The check history is the server's too: a fresh page shows many results.
        assert await page.js("document.querySelectorAll('#backends .hist span.ok').length") >= 30
        events = await page.js("document.querySelector('#events tbody').textContent")
        assert "weight 1 \u2192 weight 3" in events
        await page.screenshot(tmp_path / "status.png")
        assert (tmp_path / "status.png").stat().st_size > 20_000

        # The drain button, with the token typed in the box, drains b1 through the API...
        b1 = f"{ROWS}.find(r => r.children[1].textContent === 'b1')"
        await page.js(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
        await page.js(f"{b1}.querySelectorAll('button')[0].click()")
        await page.until("document.getElementById('message').textContent.includes('web/b1: drain')")
        answer = await asyncio.to_thread(api, admin, "/api/v1/backends")
        state = {b["name"]: b["admin_state"] for b in json.loads(answer)["backends"]}
        assert state == {"b0": "up", "b1": "drain", "b2": "up"}
        await page.until(
            "document.querySelector('#backends tbody').textContent.includes('drain for')"
        )
        # ...and with a wrong token the API refuses, and the page says so.
        await page.js("document.getElementById('token').value = 'wrong'")
        await page.js(f"{b1}.querySelectorAll('button')[1].click()")
        await page.until(
            "document.getElementById('message').textContent.startsWith('refused (401)')"
        )

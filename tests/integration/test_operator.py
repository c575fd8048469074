"""The operator's answers: lookups by a single address (IPv4, IPv6, a non-contiguous netmask),
reload reports that name each changed field, and `l4lb ctl` at the end of a pipe."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp

from l4lb import Server
from l4lb.config import load_config
from tests.integration.test_ops import TOKEN
from tests.support.helpers import free_ports, hello
from tests.support.procs import ROOT


async def ctl(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "l4lb",
        "ctl",
        "-c",
        str(config),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_a_single_address_finds_its_networks_entry_in_every_group(backends, tmp_path) -> None:
    p4, p6, pn, admin = free_ports(4)
    p6 = free_ports(1, "::1")[0]
    (b,) = await backends(1, [p4, pn])
    (b6,) = await backends(1, [p6], host="::1")
    (tmp_path / "token").write_text(TOKEN)
    cfg = write(
        tmp_path / "l4lb.yaml",
        f"""
admin: {{listen: '127.0.0.1:{admin}', token_file: token}}
groups:
  v4:
    listen: [127.0.0.1]
    ports: [{p4}]
    persistence: {{timeout: 10m, netmask: /24}}
    backends: [{{name: a, address: 127.0.0.1, ports: {{{p4}: {b.ports[p4]}}}}}]
  v6:
    listen: ["::1"]
    ports: [{p6}]
    persistence: {{timeout: 10m, ipv6_prefix: 64}}
    backends: [{{name: a6, address: "::1", ports: {{{p6}: {b6.ports[p6]}}}}}]
  odd:
    listen: [127.0.0.1]
    ports: [{pn}]
    persistence: {{timeout: 10m, netmask: 255.0.255.0}}
    backends: [{{name: n, address: 127.0.0.1, ports: {{{pn}: {b.ports[pn]}}}}}]
""",
    )
    server = Server(load_config(cfg))
    await server.start()
    try:
        await hello(p4, "127.102.0.5")
        await hello(p6, "::1", host="::1")
        await hello(pn, "127.1.2.3")
        url = f"http://127.0.0.1:{admin}/api/v1/affinity"
        async with aiohttp.ClientSession() as http:

            async def lookup(client: str) -> list[tuple[str, str]]:
                r = await (await http.get(url, params={"client": client})).json()
                return [(e["group"], e["client"]) for e in r["entries"]]

            assert await lookup("127.102.0.77") == [("v4", "127.102.0.0/24")]  # the miss
            assert await lookup("::1") == [("v6", "::/64")]
            assert await lookup("127.9.2.200") == [("odd", "127.0.2.0/255.0.255.0")]
            assert await lookup("127.1.3.3") == []  # another network under that mask
            assert await lookup("127.102.0.0/16") == [("v4", "127.102.0.0/24")]  # a prefix: inside
            code, out, err = await ctl(cfg, "affinity", "show", "127.102.0.9")
            assert code == 0 and err == ""
            assert (
                out.startswith("v4: 127.102.0.0/24 -> a, idle, expires in ")
                and "pinned 0s ago" in out
            )
            code, out, _ = await ctl(cfg, "affinity", "list", "--client", "127.102.0.9")
            assert code == 0 and "127.102.0.0/24" in out
            code, out, _ = await ctl(cfg, "affinity", "flush", "--client", "127.102.1.5")
            assert (code, out.strip()) == (0, "flushed 0 entries")  # another /24
            code, out, _ = await ctl(cfg, "affinity", "flush", "--client", "127.102.0.5")
            assert (code, out.strip()) == (0, "flushed 1 entry")
            assert await lookup("127.102.0.5") == []
            code, out, err = await ctl(cfg, "affinity", "show", "127.102.0.5")
            assert (code, out) == (1, "")  # unknown: exit 1, for a script to tell
            assert err.strip() == "l4lb ctl: 127.102.0.5: no affinity entry in any group"
            # `affinity list | head -1` over more than a pipe holds: quiet, not a traceback.
            for i in range(2000):
                await hello(p4, f"127.{110 + i // 256}.{i % 256}.1")
            proc = await asyncio.create_subprocess_shell(
                f"{sys.executable} -m l4lb ctl -c {cfg} affinity list --limit 5000 | head -1",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            out_b, err_b = await proc.communicate()
            assert out_b.decode().split() == [
                "GROUP",
                "CLIENT",
                "BACKEND",
                "CONNS",
                "FLOWS",
                "EXPIRES",
                "IN",
            ]
            assert err_b == b"", err_b
    finally:
        await server.shutdown(grace=1)


BASE = """
groups:
  web:
    listen: [127.0.0.1]
    ports: [{port}]
    scheduler: wlc
    persistence: {{timeout: 5m, netmask: /24}}
    health_check: {{type: tcp, interval: 2s}}
    backends:
      - {{name: b0, address: 127.0.0.1, ports: {{{port}: {b0}}}}}
      - {{name: b1, address: 127.0.0.1, ports: {{{port}: {b1}}}}}
"""


async def test_a_reload_reports_every_field_it_changed(backends, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    bs = await backends(2, [port])
    text = BASE.format(port=port, b0=bs[0].ports[port], b1=bs[1].ports[port])
    cfg = write(tmp_path / "l4lb.yaml", text)
    server = Server(load_config(cfg))
    await server.start()
    try:
        write(cfg, "# a comment changes nothing\n" + text)
        assert await server.reload_from_file() == []  # "no changes": the meaning is the same
        edited = (
            text.replace("scheduler: wlc", "scheduler: rr")
            .replace("timeout: 5m", "timeout: 10m")
            .replace("interval: 2s", "interval: 1s")
            .replace("name: b1, address", "name: b1, weight: 3, address")
        )
        write(cfg, "shutdown_timeout: 3s\n" + edited)
        got = await server.reload_from_file()
        assert got == [
            "group web: scheduler wlc -> rr",
            "group web: persistence.timeout 300 -> 600",
            "group web: health_check.interval 2 -> 1",
            "group web: backend b1 changed: weight 1 -> 3",
            "shutdown_timeout 10 -> 3",
        ], got
    finally:
        await server.shutdown(grace=1)


def test_ctl_at_the_end_of_a_closed_pipe_and_the_version(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "l4lb", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and r.stdout.startswith("l4lb ")
    # Nothing listening: one line saying so.
    cfg = write(
        tmp_path / "c.yaml",
        f"admin: {{listen: '127.0.0.1:{free_ports(1)[0]}'}}\ngroups:\n  web: {{ports: [1], backends: [{{name: a, address: 192.0.2.1}}]}}\n",
    )
    r = subprocess.run(
        f"{sys.executable} -m l4lb ctl -c {cfg} affinity list",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1 and r.stderr.startswith("l4lb ctl: cannot reach the admin API")
    assert len(r.stderr.splitlines()) == 1

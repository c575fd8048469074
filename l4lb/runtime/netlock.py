"""The network lock of an HA hand-over (runtime/pair.py): nftables rules that drop every packet
of the connections being moved, both ways, while their sockets are frozen, closed or not made
yet, as CRIU's network lock does. A packet that met a host without its socket would be answered
with a reset; dropped, it is sent again by its sender's timers once the socket runs.

The rules live in one table of this network namespace, `inet l4lb_ha`: the set `conns4` /
`conns6` holds each moving connection as (peer address, peer port, local address, local port);
the giving host also drops new connections' SYNs to the listening ports meanwhile (they are sent
again a second later and reach the host that then holds the address). `unlock` deletes the
table; a table left by a process that died mid-hand-over is deleted when l4lb starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Iterable

log = logging.getLogger("l4lb.ha")
TABLE = "l4lb_ha"
NFT_TIMEOUT = 10.0


class LockError(Exception):
    """nft refused or is missing: the message says why."""


Tuple = tuple[str, int, str, int]  # peer address, peer port, local address, local port


def ruleset(conns: Iterable[Tuple], syn_ports: Iterable[int] = ()) -> str:
    """The nft script that (re)makes the table for `conns` and, if any, drops SYNs to
    `syn_ports`. Pure: tested on its own."""
    v4: list[str] = []
    v6: list[str] = []
    for peer, pport, local, lport in conns:
        is6 = ipaddress.ip_address(peer).version == 6
        (v6 if is6 else v4).append(f"{peer} . {int(pport)} . {local} . {int(lport)}")
    ports = sorted({int(p) for p in syn_ports})
    lines = [
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  set conns4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }",
        "  set conns6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }",
        "  chain input {",
        "    type filter hook input priority -300; policy accept;",
        "    ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop",
        "    ip6 saddr . tcp sport . ip6 daddr . tcp dport @conns6 drop",
    ]
    if ports:
        joined = ", ".join(str(p) for p in ports)
        lines.append(f"    tcp flags & (syn | ack) == syn tcp dport {{ {joined} }} drop")
    lines += [
        "  }",
        "  chain output {",
        "    type filter hook output priority -300; policy accept;",
        "    ip daddr . tcp dport . ip saddr . tcp sport @conns4 drop",
        "    ip6 daddr . tcp dport . ip6 saddr . tcp sport @conns6 drop",
        "  }",
        "}",
    ]
    for name, elements in (("conns4", v4), ("conns6", v6)):
        for i in range(0, len(elements), 1000):
            chunk = ", ".join(elements[i : i + 1000])
            lines.append(f"add element inet {TABLE} {name} {{ {chunk} }}")
    return "\n".join(lines) + "\n"


async def _nft(script: str) -> None:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        raise LockError("nft is not installed (the hand-over's network lock needs nftables)")
    proc = await asyncio.create_subprocess_exec(
        nft,
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), NFT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LockError(f"nft took over {NFT_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        first = err.decode(errors="replace").strip().splitlines()[:1]
        raise LockError(f"nft: {first[0] if first else f'exit {proc.returncode}'}")


async def lock(conns: Iterable[Tuple], syn_ports: Iterable[int] = ()) -> None:
    """Drop the packets of `conns` (and SYNs to `syn_ports`) from now on, until `unlock`."""
    await _nft(ruleset(conns, syn_ports))


async def unlock() -> None:
    """Delete the table (and so every rule of the lock); none there is fine."""
    try:
        await _nft(f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
    except LockError as exc:
        log.warning("ha: the network lock could not be removed: %s", exc)

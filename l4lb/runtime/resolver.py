"""Looking up the backends' DNS names: the system resolver (so /etc/hosts, nsswitch and
resolv.conf as every other program on the host), off the event loop (the loop's getaddrinfo
runs in a thread), all names at once, each within a deadline."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable

from ..config.names import Answer

LOOKUP_TIMEOUT = 5.0  # seconds one name may take; then it counts as not resolving


async def lookup(names: Iterable[str]) -> dict[str, Answer]:
    """Each name's addresses (IPv4 and IPv6, in the resolver's order, each once), or the
    resolver's message when it has none (or none within LOOKUP_TIMEOUT)."""
    wanted = list(names)
    answers = await asyncio.gather(*(_one(n) for n in wanted))
    return dict(zip(wanted, answers, strict=True))


async def _one(name: str) -> Answer:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {name}: {exc.strerror or exc}"
    except TimeoutError:
        return f"cannot resolve {name}: no answer within {LOOKUP_TIMEOUT:g}s"
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {name}: {exc}"
    addresses: list[str] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses) or f"cannot resolve {name}: no IPv4 or IPv6 address"


def lookup_now(names: Iterable[str]) -> dict[str, Answer]:
    """The same, blocking: for `l4lb check`, which has no loop to keep serving."""
    return asyncio.run(lookup(names))

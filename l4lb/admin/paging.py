"""The affinity listing's keys and cursors: a client network as the key its entries sort by, and
a page's `next` (the API's and the supervisor's merged listings share them)."""

from __future__ import annotations

import ipaddress

from ..core.keys import V6_TAG


def key_span(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """The keys of the entries inside a prefix, as [lo, hi) (see core/keys.py)."""
    lo = int(net.network_address) | (V6_TAG if net.version == 6 else 0)
    return lo, lo + net.num_addresses


def client_key(client: str) -> int:
    """An entry's `client` ("203.0.113.0/24") as its key, to sort by."""
    return key_span(ipaddress.ip_network(client, strict=False))[0]


def cursor_of(group: str, key: int) -> str:
    """A page's `next`: the last entry it held (its key in hex, then its group)."""
    return f"{key:x}@{group}"

"""Backends given by DNS name: the configuration as written, expanded with what the names
resolve to.

Theory of operation
-------------------
A backend's `address` may be a name (`app`, `app:8080`). The configuration keeps it as written;
what routes connections is its expansion, made here from the resolver's answers (looked up off
the event loop by `resolver.py`, at start and every `resolve_interval`):

- a name that resolves to one address, or with `resolve: first`, is one backend of the same
  name at that address: its pins follow the name, so a changed address keeps its clients;
- a name that resolves to several is one backend per address, named `NAME-ADDRESS`, in address
  order (so that every instance and worker orders them alike): addresses that appear or vanish
  are backends added or removed, and a removed one's pins move on the next connection (from
  one address to several or back, `Router.reconfigure` renames the backend at the address that
  stays instead, so that its pins stay with it);
- a name that does not resolve is one backend at the name itself, down, with the resolver's
  message (`unresolved`): never dialed or checked, and up again once it resolves.

The expansion is applied like a reload (`Router.reconfigure` matches backends by name), so
nothing else needs to know that a backend came from a name. This module is pure: answers in,
configuration out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace

from ..core.spec import BackendSpec, Config, GroupSpec

# What the resolver said of a name: its addresses in the resolver's order, or why it has none.
Answer = tuple[str, ...] | str

NOT_YET = "not resolved yet"


def names_in(config: Config) -> list[str]:
    """The DNS names the configuration's backends are given by, each once, sorted."""
    return sorted({b.address for g in config.groups for b in g.backends if b.is_name})


def expand(config: Config, answers: Mapping[str, Answer]) -> Config:
    """`config` with every backend given by name replaced by what the name resolves to."""
    if not any(b.is_name for g in config.groups for b in g.backends):
        return config
    return replace(config, groups=tuple(expand_group(g, answers) for g in config.groups))


def expand_group(group: GroupSpec, answers: Mapping[str, Answer]) -> GroupSpec:
    out: list[BackendSpec] = []
    for b in group.backends:
        if not b.is_name:
            out.append(b)
            continue
        answer = answers.get(b.address, NOT_YET)
        if isinstance(answer, str) or not answer:
            why = answer if isinstance(answer, str) else "the name has no address"
            out.append(replace(b, hostname=b.address, unresolved=why))
        elif b.resolve == "first" or len(answer) == 1:
            out.append(replace(b, address=answer[0], hostname=b.address))
        else:
            for address in sorted(answer, key=_order):
                out.append(
                    replace(b, name=f"{b.name}-{address}", address=address, hostname=b.address)
                )
    return replace(group, backends=tuple(out))


def _order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)

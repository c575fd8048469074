"""Dialing a backend for one client: the pinned or scheduled backend first, the next on refusal
or timeout, until one accepts or the router has none left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from .backends import Backend
from .routing import Route, Router

log = logging.getLogger("l4lb.dialer")
P = TypeVar("P", bound=asyncio.BaseProtocol)


async def dial(
    router: Router,
    route: Route,
    service_port: int,
    factory: Callable[[], P],
    connect_timeout: float,
) -> tuple[Backend, asyncio.Transport, P] | None:
    """Connect to a backend for `route`; None when every backend the router offers failed."""
    loop = asyncio.get_running_loop()
    while (backend := router.next_backend(route)) is not None:
        port = backend.port_for(service_port)
        try:
            async with asyncio.timeout(connect_timeout):
                transport, protocol = await loop.create_connection(factory, backend.address, port)
        except (OSError, TimeoutError) as exc:
            router.failed(route, backend)
            log.debug(
                "group %s: backend %s (%s:%d) failed: %s",
                router.name,
                backend.name,
                backend.address,
                port,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__,
            )
            continue
        router.connected(route, backend)
        return backend, transport, protocol
    return None

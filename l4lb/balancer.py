"""`Server`: the runtime (`runtime.server.Runtime`) with its admin plane, as `l4lb run`, a
worker and `from l4lb import Server` get it. The runtime does not import the admin API (it sits
above the runtime and reads it through a Protocol); this is where the two are put together."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core.spec import AdminSpec
from .runtime import server as runtime

if TYPE_CHECKING:
    from .admin.api import AdminServer


def admin_api(server: runtime.Runtime, spec: AdminSpec, unix_path: str | None) -> AdminServer:
    from .admin.api import AdminServer  # aiohttp loads only when the admin API is configured

    return AdminServer(server, spec, unix_path)


def load_admin() -> None:
    from .admin import api  # noqa: F401  (imported now: see Runtime.admin_preload)


class Server(runtime.Runtime):
    admin_factory = admin_api
    admin_preload = load_admin


__all__ = ["Server"]

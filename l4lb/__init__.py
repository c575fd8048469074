"""l4lb: a userspace L4 (TCP and UDP) load balancer with LVS-style persistence and mark groups.

`from l4lb import Server, Config, ConfigError, load_config` is the public API; the names load
lazily (PEP 562), so that `import l4lb.core.affinity` does not bring in the event loop.
"""

from typing import TYPE_CHECKING, Any

from . import native
from .version import __version__

native.select()  # before any compiled module loads: the build, or pure Python

if TYPE_CHECKING:
    from .balancer import Server
    from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "Server", "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    if name == "Server":
        from .balancer import Server

        return Server
    if name in ("Config", "ConfigError", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'l4lb' has no attribute {name!r}")

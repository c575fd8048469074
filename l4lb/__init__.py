"""l4lb: a userspace L4 (TCP and UDP) load balancer with LVS-style persistence and mark groups."""

from .config import Config, ConfigError, load_config
from .runtime.server import Server

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Server", "__version__", "load_config"]

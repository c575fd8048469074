"""`Server`: the balancer as `l4lb run`, a worker and `from l4lb import Server` get it."""

from .runtime.server import Server

__all__ = ["Server"]

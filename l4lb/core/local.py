"""Whether an address is this host's: the one question of the core that asks the kernel (a probe
socket is bound, never connected), asked when a configuration is loaded or applied, never per
connection. The configuration's loop checks and the data plane's loop guard share it."""

from __future__ import annotations

import ipaddress
import socket


def is_local_address(address: str) -> bool:
    """Whether `address` is one of this host's (loopback, or bindable here)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True

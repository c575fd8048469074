"""Configuration: YAML in, frozen dataclasses (`l4lb.core.spec`) out; each error is one line:
file, line, field path.

The loader composes the YAML into nodes (which carry line numbers) and validates the node tree
directly, so an error can always name the line it comes from. Unknown keys, duplicate keys and
wrong types are errors; all errors of a file are reported, not only the first.

The rooms, in the order a file goes through them: `compose` (YAML to nodes), `document` (the
top-level keys), `groups` and `backends` (a group's sections), `ports` and `values` (the
scalars), `validator` (the error collector), `crosscheck` (across groups); `load` is the
entry. Beside them: `names` (backends given by DNS name), `quick` (the flags of `l4lb run`),
`keepalived` (the importer) and `describe` (a group's start-up line).
"""

from ..core.diff import changes
from ..core.local import is_local_address
from ..core.spec import (
    MAX_WEIGHT,
    SCHEDULERS,
    AcceptProxySpec,
    AccessLogSpec,
    AdminSpec,
    BackendSpec,
    ClientLimitsSpec,
    Config,
    GroupSpec,
    HealthCheckSpec,
    KernelMarksSpec,
    PersistenceSpec,
    StoreSpec,
)
from .load import load_admin_section, load_config, load_config_text
from .ports import GroupPorts, compact_ports
from .validator import ConfigError
from .values import parse_duration, parse_netmask

__all__ = [
    "MAX_WEIGHT",
    "SCHEDULERS",
    "AcceptProxySpec",
    "AccessLogSpec",
    "AdminSpec",
    "BackendSpec",
    "ClientLimitsSpec",
    "Config",
    "ConfigError",
    "GroupPorts",
    "GroupSpec",
    "HealthCheckSpec",
    "KernelMarksSpec",
    "PersistenceSpec",
    "StoreSpec",
    "changes",
    "compact_ports",
    "is_local_address",
    "load_admin_section",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_netmask",
]

"""The configuration as the core reads it: frozen dataclasses, built by `l4lb.config` from YAML
(or by anything else: a test, the flags of `l4lb run`). Types only, no parsing: they sit at the
bottom so that the pure core can take its group's spec without knowing where it came from."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "mh", "p2c", "fo")
DEFAULT_PERSISTENCE_TIMEOUT = 360.0  # keepalived's and ipvsadm's default
DEFAULT_MAX_ENTRIES = 1_000_000
MAX_WEIGHT = 65535  # ipvsadm's documented range


SORRY_SERVER = "sorry_server"


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    type: str  # tcp | http | tls | exec | udp
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2  # consecutive passes that bring a down backend up
    fall: int = 3  # consecutive failures that take an up backend down
    port: int | None = None  # a service port of the group, mapped; default: the first
    path: str | None = None  # http (default "/"); tls: then GET this path
    status: tuple[int, ...] = (200,)
    body: str | None = None  # a substring the answer's body must contain
    host: str | None = None  # the Host header (default: the backend's address)
    send: str | None = None  # tcp: bytes to send once connected; udp: the datagram to send
    expect: str | None = None  # tcp, udp: a regex the first reply must match
    command: tuple[str, ...] = ()  # exec: argv
    verify: bool = False  # tls: verify the server certificate
    server_name: str | None = None  # tls: SNI (and the name verified)


@dataclass(frozen=True, slots=True)
class AcceptProxySpec:
    trusted: tuple[tuple[int, int, int], ...]  # (IP version, network as int, prefix length)
    timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    address: str  # a normalised IP literal, or a DNS name (see l4lb/config/names.py)
    weight: int = 1
    ports: Mapping[int, int] = field(default_factory=dict)  # service port -> backend port
    max_conns: int = 0  # 0: unlimited (a UDP flow counts as a connection)
    inhibit_on_failure: bool = False
    health_check: HealthCheckSpec | None = None  # replaces the group's check for this backend
    state: str = "up"  # the operator's state at start: up | drain | disabled
    send_proxy: str | None = None  # v1 | v2 | none: overrides the group's
    slow_start: float | None = None  # overrides the group's
    resolve: str = "all"  # a name: all | first (of the addresses it resolves to)
    hostname: str = ""  # the name this backend was resolved from ("" for an IP literal)
    unresolved: str = ""  # why its name did not resolve (then `address` is the name, down)
    udp_ports: Mapping[int, int] = field(default_factory=dict)  # UDP service port -> backend's
    backup: bool = False  # new clients only while no other backend of the group can take one
    server_id: str = ""  # QUIC-LB: the server ID its QUIC server writes in its connection IDs (hex)

    @property
    def is_name(self) -> bool:
        """An address still to resolve (the configuration as written, before config/names.py)."""
        return not self.hostname and not is_ip(self.address)

    def port_for(self, service_port: int) -> int:
        return self.ports.get(service_port, service_port)

    def udp_port_for(self, service_port: int) -> int:
        return self.udp_ports.get(service_port, service_port)


@dataclass(frozen=True, slots=True)
class PersistenceSpec:
    timeout: float = DEFAULT_PERSISTENCE_TIMEOUT  # seconds; 0 turns persistence off
    netmask: int = 0xFFFFFFFF  # IPv4 mask as an integer (need not be contiguous, as in LVS)
    ipv6_prefix: int = 128
    max_entries: int = DEFAULT_MAX_ENTRIES

    @property
    def enabled(self) -> bool:
        return self.timeout > 0


@dataclass(frozen=True, slots=True)
class AccessLogSpec:
    """The connection log: a line per connection when it ends (and when it is established)."""

    path: str = "stdout"  # stdout | stderr | a file
    format: str = "json"  # json | text
    log_on_connect: bool = False


@dataclass(frozen=True, slots=True)
class ClientLimitsSpec:
    """Per client network (the group's persistence netmask): open connections and a rate."""

    max_conns: int = 0  # open connections at once; 0: no limit
    rate: float = 0.0  # new connections per second, refilling a bucket of `burst`; 0: no limit
    burst: float = 1.0  # new connections at once before the rate applies


@dataclass(frozen=True, slots=True)
class QuicLbSpec:
    """QUIC-LB (draft-ietf-quic-load-balancers): how the group's QUIC servers write their server
    ID into the connection IDs they issue, so that any packet of a connection, from any address,
    can be routed to the server that owns it (l4lb/core/quiclb.py)."""

    server_id_length: int  # octets (section 4.2: at least 1)
    nonce_length: int  # octets (at least 4; the two sum to 19 at most)
    config_id: int = 0  # the config rotation codepoint (section 2.1), 0-6
    key_file: str = ""  # where the AES-128 key came from ("": plaintext)
    key: bytes | None = field(default=None, repr=False)  # read from key_file at load


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    mark: int
    ports: tuple[int, ...]
    backends: tuple[BackendSpec, ...]
    listen: tuple[str, ...] = ("0.0.0.0",)
    scheduler: str = "wlc"
    persistence: PersistenceSpec = field(default_factory=PersistenceSpec)
    connect_timeout: float = 2.0
    idle_timeout: float = 900.0
    health_check: HealthCheckSpec | None = None
    passive_failures: int = 3  # consecutive connect failures that mark a backend down; 0: off
    sorry_server: BackendSpec | None = None
    quorum: int = 1  # fewer backends up than this (with hysteresis): the sorry server serves
    hysteresis: int = 0
    on_down: str = "keep"  # keep | close the open connections of a backend that goes down
    on_up: str = "stay"  # stay | return: re-pinned clients move back when a backend returns
    queue_timeout: float = 0.0  # how long a pinned client waits for a full backend
    notify: tuple[str, ...] = ()  # argv run on every state change
    relay: str = "copy"  # copy | auto (splice once a flow streams) | splice (Linux zero-copy)
    send_proxy: str | None = None  # v1 | v2: a PROXY header to the backends
    kernel_mark: int | None = None  # chosen by this firewall mark on the kernel_marks listener
    accept_proxy: AcceptProxySpec | None = None  # a PROXY header required from trusted peers
    client_limits: ClientLimitsSpec | None = None
    slow_start: float = 0.0  # seconds over which a backend that comes up ramps to its weight
    access_log: AccessLogSpec | None = None  # the group's own, else the top level's; None: off
    udp_ports: tuple[int, ...] = ()  # "443/udp" in `ports`: datagrams (l4lb/dataplane/udp.py)
    udp_idle_timeout: float = 60.0  # a flow ends after this long without a datagram either way
    udp_max_flows: int = 0  # flows at once (0: half the descriptors); beyond, the oldest idle goes
    # Client networks (version, network, prefix length) let in / refused; deny wins; an empty
    # allow lets everyone in.
    allow: tuple[tuple[int, int, int], ...] = ()
    deny: tuple[tuple[int, int, int], ...] = ()
    # Where dials to the backends come from: None (the kernel's choice), "client" (the
    # client's own address: transparent, IP_TRANSPARENT), or an IP literal to bind.
    source: str | None = None
    quic_lb: QuicLbSpec | None = None  # route QUIC by the server ID in its connection IDs

    @property
    def first_port(self) -> int:
        """The service port a check or an inline backend port refers to by default."""
        return self.ports[0] if self.ports else self.udp_ports[0]


@dataclass(frozen=True, slots=True)
class AdminSpec:
    host: str = "127.0.0.1"
    port: int = 9090
    token_file: str | None = None  # a bearer token for mutating calls; without one they are refused
    request_timeout: float = 10.0  # for a request's head, and again for its body
    max_connections: int = 64  # open at once; more are answered 503
    max_connections_per_peer: int = 16  # from one address at once, so one cannot shut others out
    read_token: bool = False  # reads need the token too (but /healthz and /readyz)
    hosts: tuple[str, ...] = ()  # names the API answers to in Host, beside localhost and addresses

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if self.host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KernelMarksSpec:
    """One listener fed by iptables/nft REDIRECT; each connection's mark picks its group."""

    host: str = "0.0.0.0"
    port: int = 9999


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A shared affinity table in Redis (or Valkey): pins that every instance finds."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "l4lb:"
    budget: float = 0.01  # seconds a lookup may take before the consistent hash decides
    retry_interval: float = 1.0  # how often a store that failed is probed
    cluster: bool = False  # a Redis Cluster (url names one of its nodes)


@dataclass(frozen=True, slots=True)
class HaSpec:
    """An HA pair (runtime/pair.py): keepalived moves the addresses, l4lb the connections."""

    peer_host: str  # the peer's admin API, which takes this host's admin token
    peer_port: int
    track_file: str  # this host's VRRP instance's track_file (negative weight): 0 hold, 1 give
    addresses: tuple[str, ...]  # the virtual addresses: held here means this host is active
    timeout: float = 10.0  # how long a hand-over waits for keepalived to move the addresses
    idle_sync: bool = False  # stream the idle connections' state to the peer (crash: restored)
    idle_after: float = 1.0  # seconds without a byte either way before a connection is synced


MAX_WORKERS = 64


@dataclass(frozen=True, slots=True)
class Config:
    groups: tuple[GroupSpec, ...]
    workers: int = 1
    affinity_store: StoreSpec | None = None  # None: each process keeps its own table
    shutdown_timeout: float = 10.0
    admin: AdminSpec | None = None
    kernel_marks: KernelMarksSpec | None = None
    state_file: str | None = None
    state_interval: float = 30.0
    access_log: AccessLogSpec | None = None  # the default of every group
    resolve_interval: float = 10.0  # how often backends given by DNS name are looked up again
    ha: HaSpec | None = None  # an HA pair with a peer (off: a single host)
    source: str = "<memory>"
    warnings: tuple[str, ...] = ()
    # The files the configuration named and the loader read (keys, the admin token), as read:
    # a worker is given these bytes by its supervisor, never the disk's (only a reload reads
    # the disk again).
    files: Mapping[str, bytes] = field(default_factory=dict, compare=False, repr=False)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True

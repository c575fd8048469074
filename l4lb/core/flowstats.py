"""A group's UDP counters: plain ints the data plane bumps and the metrics read at scrape time."""

from __future__ import annotations

# Why a datagram was dropped; `l4lb_udp_dropped_total{reason}`. A datagram that would open a
# flow and is refused (denied, client_limit, an unusable address, no descriptor, its source) is
# a refused flow, counted once, with TCP's refusals (`l4lb_connections_failed_total{reason}`).
DROP_REASONS = (
    "no_backend",  # no backend accepted the flow
    "pending_full",  # its backend was not settled yet, and a few were waiting already
    "backend_busy",  # the backend socket's send buffer was full
    "backend_error",  # the backend socket reported an error (ICMP) on this datagram
    "client_send",  # the answer could not be sent to the client
    "unvalidated",  # an answer past the few a client gets before its second datagram
    "looped",  # from one of l4lb's own flow sockets: a backend that leads back to l4lb
    "quic_unroutable",  # quic_lb: a short header no backend owns, from a network with no pin
    "quic_malformed",  # quic_lb: too short to carry the connection ID it announces
    "quic_full",  # quic_lb: its connection ID's server is at its max_conns (the client retries)
)
# quic_lb: how datagrams that opened a flow were routed; `l4lb_quic_packets_total{route}`
# (unroutable ones, and those whose server was full, are dropped, and counted among the drops
# too).
QUIC_ROUTES = ("cid", "pin", "fallback", "unroutable", "full")


class UdpStats:
    """One group's UDP counters (flows, datagrams, bytes, drops), read at scrape time."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "datagrams_in",
        "datagrams_out",
        "drops",
        "evicted",
        "flows",
        "migrations",
        "opened",
        "quic",
        "unreachable",
    )

    def __init__(self) -> None:
        self.flows = 0  # open now
        self.opened = 0
        self.evicted = 0  # flows ended early by the udp_max_flows bound
        self.unreachable = 0  # ICMP errors on backend sockets
        self.datagrams_in = 0  # client -> backend
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.quic = dict.fromkeys(QUIC_ROUTES, 0)
        self.migrations = 0  # quic_lb: flows a connection ID brought from a new address

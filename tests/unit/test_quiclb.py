"""QUIC-LB (issue 27): the connection ID codec against the draft's own test vectors (Appendix B
of draft-ietf-quic-load-balancers, editor's copy of 28 February 2025) and its worked four-pass
example (section 4.3.2.4), both ways; the router's rule for each kind of packet; the
configuration's errors, one line each; a reload's report."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.config import ConfigError, load_config_text
from l4lb.core.backends import Backend, State
from l4lb.core.quiclb import Codec
from l4lb.core.reconfigure import reconfigure
from l4lb.core.routing import Router
from tests.support.helpers import FakeClock

KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")

PLAINTEXT = [  # config rotation, server ID, nonce, connection ID (B.1)
    (0, "c4605e", "4504cc4f", "07c4605e4504cc4f"),
    (1, "350d28b420", "03487d970b", "2a350d28b42003487d970b"),
]
ENCRYPTED = [  # (B.2): four passes odd, four with the ID longer than the nonce, one, four even
    (0, "ed793a", "ee080dbf", "0720b1d07b359d3c"),
    (1, "ed793a51d49b8f5fab65", "ee080dbf48", "2fcc381bc74cb4fbad2823a3d1f8fed2"),
    (2, "ed793a51d49b8f5f", "ee080dbf48c0d1e5", "504dd2d05a7b0de9b2b9907afb5ecf8cc3"),
    (3, "ed793a51d49b8f5fab", "ee080dbf48c0d1e55d", "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),
]


@pytest.mark.parametrize(("cr", "sid", "nonce", "cid"), PLAINTEXT)
def test_plaintext_vectors(cr: int, sid: str, nonce: str, cid: str) -> None:
    codec = Codec(cr, len(sid) // 2, len(nonce) // 2)
    assert codec.encode(bytes.fromhex(sid), bytes.fromhex(nonce)).hex() == cid
    assert codec.server_id(bytes.fromhex(cid)) == bytes.fromhex(sid)


@pytest.mark.parametrize(("cr", "sid", "nonce", "cid"), ENCRYPTED)
def test_encrypted_vectors(cr: int, sid: str, nonce: str, cid: str) -> None:
    # The last row says config rotation 3 but its first octet is 0x12 (config 0, length 18):
    # the draft's slip; its encrypted octets are what the row's inputs give.
    cr = bytes.fromhex(cid)[0] >> 5
    codec = Codec(cr, len(sid) // 2, len(nonce) // 2, KEY)
    assert codec.encode(bytes.fromhex(sid), bytes.fromhex(nonce)).hex() == cid
    assert codec.server_id(bytes.fromhex(cid)) == bytes.fromhex(sid)


def test_the_worked_four_pass_example() -> None:
    """Section 4.3.2.4 (its step 10 prints one AES octet wrongly; its result is right)."""
    codec = Codec(0, 3, 4, bytes.fromhex("fdf726a9893ec05c0632d3956680baf0"))
    cid = codec.encode(bytes.fromhex("31441a"), bytes.fromhex("9c69c275"))
    assert cid.hex() == "0767947d29be054a"
    assert codec.server_id(cid) == bytes.fromhex("31441a")


@pytest.mark.parametrize("lengths", [(1, 4), (2, 5), (5, 5), (6, 9), (7, 12), (15, 4), (4, 15)])
def test_every_shape_round_trips(lengths: tuple[int, int]) -> None:
    sid_len, nonce_len = lengths
    for key in (None, os.urandom(16)):
        codec = Codec(2, sid_len, nonce_len, key)
        for _ in range(20):
            sid = os.urandom(sid_len)
            assert codec.server_id(codec.encode(sid, os.urandom(nonce_len))) == sid


def test_unroutable_ids_name_no_server() -> None:
    codec = Codec(1, 2, 6)
    cid = codec.encode(b"\x01\x02", bytes(6))
    assert codec.server_id(cid[:-1]) is None  # too short for this configuration
    assert codec.server_id(bytes([0b111 << 5]) + cid[1:]) is None  # the unroutable codepoint
    assert codec.server_id(bytes([0 << 5]) + cid[1:]) is None  # another configuration's
    assert codec.server_id(b"") is None


def test_bad_configurations_are_refused() -> None:
    for args in [(7, 2, 6), (0, 0, 6), (0, 2, 3), (0, 10, 10)]:
        with pytest.raises(ValueError):
            Codec(*args)
    with pytest.raises(ValueError):
        Codec(0, 2, 6, bytes(15))


def test_the_destination_cid_of_short_and_long_headers() -> None:
    from l4lb.core.quiclb import CHOSEN, LONG, OTHER, SHORT, destination_cid

    cid = bytes.fromhex("07c4605e4504cc4f")
    assert destination_cid(bytes([0x40]) + cid + b"payload", 8) == (cid, SHORT)  # short
    assert destination_cid(bytes([0x40]) + cid[:5], 8) is None  # too short for its DCID
    v1 = (1).to_bytes(4, "big")
    handshake = bytes([0xE0]) + v1 + bytes([8]) + cid + b"\x00rest"
    assert destination_cid(handshake, 8) == (cid, LONG)  # the server's CID: routable
    initial = bytes([0xC0]) + v1 + bytes([8]) + b"clientid" + b"\x00rest"
    assert destination_cid(initial, 8) == (b"clientid", CHOSEN)  # the client's own choice
    zero_rtt = bytes([0xD0]) + v1 + bytes([8]) + cid
    assert destination_cid(zero_rtt, 8) == (cid, CHOSEN)
    other = bytes([0xE0]) + (0x6B3343CF).to_bytes(4, "big") + bytes([8]) + cid
    assert destination_cid(other, 8) == (cid, OTHER)  # another version: not read further
    assert destination_cid(bytes([0xC0]) + v1 + bytes([20]) + bytes(5), 8) is None
    assert destination_cid(b"", 8) is None and destination_cid(b"\xc0\x00", 8) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=5, max_value=20))
def test_any_bytes_read_without_an_exception(datagram: bytes, short_length: int) -> None:
    """Whatever a peer sends: a CID or None, never an exception (issue 27, point 2)."""
    from l4lb.core.quiclb import destination_cid

    found = destination_cid(datagram, short_length)
    for codec in (Codec(0, 3, 4), Codec(0, 3, 4, KEY), Codec(0, 8, 8, KEY)):
        codec.server_id(datagram)
        if found is not None:
            codec.server_id(found[0])


# ---------------------------------------------------------------------- the router's rules

QUIC_CONFIG = """
groups:
  web:
    ports: [443, "443/udp"]
    scheduler: rr
    persistence: {timeout: 60s, netmask: /24}
    quic_lb: {server_id_length: 1, nonce_length: 4}
    backends:
      - {name: a, address: 10.0.0.1, server_id: "0a"}
      - {name: b, address: 10.0.0.2, server_id: "0b"}
"""


def qroute(r: Router, datagram: bytes, key: int) -> tuple[str, Backend | None, bytes]:
    """How `r` routes a QUIC datagram that opens a flow (`QuicRouting.route`)."""
    assert r.quic is not None
    return r.quic.route(datagram, key, r.table)


def quic_router() -> Router:
    return Router(load_config_text(QUIC_CONFIG).groups[0], FakeClock(), random.Random(0))


PLAIN = Codec(0, 1, 4)
V1 = (1).to_bytes(4, "big")


def short_to(sid: str, codec: Codec = PLAIN) -> bytes:
    return bytes([0x40]) + codec.encode(bytes.fromhex(sid), b"\x01\x02\x03\x04") + b"x" * 20


def long_to(kind: int, cid: bytes, version: bytes = V1) -> bytes:
    return bytes([0xC0 | kind << 4]) + version + bytes([len(cid)]) + cid + b"\x00" * 20


def test_each_kind_of_packet_is_routed_as_the_draft_says() -> None:
    """Section 3.1: a routable ID goes to its server; a client's own (Initial, 0-RTT) by the
    pin; a long header's unroutable ID by the fallback; a short header's unroutable ID (or
    one too short for its ID) only to its network's pin, else dropped; a long header too
    short to say its ID: malformed."""
    r = quic_router()
    a, b = r.by_name["a"], r.by_name["b"]
    fresh, pinned = 1, 2
    route = r.begin(pinned)
    r.quic.steer(route, a, r.backends)  # the network's first flow came by a's ID: pinned there
    assert r.connected(route, a) == "cid"
    r.finish(route)
    sid_b = PLAIN.encode(b"\x0b", b"\x05\x06\x07\x08")
    assert qroute(r, short_to("0b"), fresh)[:2] == ("cid", b)
    assert qroute(r, long_to(2, sid_b), fresh)[:2] == ("cid", b)  # a Handshake
    assert qroute(r, long_to(0, sid_b), fresh)[:2] == ("pin", None)  # an Initial: the client's
    assert qroute(r, long_to(1, b"anything"), fresh)[:2] == ("pin", None)  # 0-RTT
    other = (0x6B3343CF).to_bytes(4, "big")
    assert qroute(r, long_to(2, sid_b, other), fresh)[:2] == ("cid", b)  # unknown version: DCID
    assert qroute(r, long_to(2, b"\xe0" * 5, other), fresh)[:2] == ("pin", None)
    unknown = short_to("0c")
    assert qroute(r, unknown, fresh)[:2] == ("unroutable", None)
    assert qroute(r, unknown, pinned)[:2] == ("fallback", None)
    codepoint_7 = bytes([0x40, 0xE5]) + b"\x0b" * 4 + b"payload"  # the 0b111 codepoint
    assert qroute(r, codepoint_7, fresh)[:2] == ("unroutable", None)
    assert qroute(r, codepoint_7, pinned)[:2] == ("fallback", None)
    rotated = bytes([0x40]) + Codec(3, 1, 4).encode(b"\x0b", b"abcd") + b"payload"
    assert qroute(r, rotated, fresh)[:2] == ("unroutable", None)  # another config's ID
    assert qroute(r, long_to(2, b"\x00\x0c1234"), fresh)[:2] == ("fallback", None)
    assert qroute(r, bytes([0x40, 0x0B]), fresh)[:2] == ("unroutable", None)  # too short
    assert qroute(r, bytes([0x40, 0x0B]), pinned)[:2] == ("fallback", None)
    assert qroute(r, b"", fresh)[:2] == ("malformed", None)
    assert qroute(r, bytes([0xC0]) + V1, fresh)[:2] == ("malformed", None)


def test_a_down_or_disabled_owner_is_routed_by_the_fallback_and_a_drained_one_keeps_its_own() -> (
    None
):
    r = quic_router()
    a, b = r.by_name["a"], r.by_name["b"]
    pinned = 2
    route = r.begin(pinned)
    r.quic.steer(route, a, r.backends)
    r.connected(route, a)
    r.finish(route)
    r.set_admin(b, State.DRAIN)
    assert qroute(r, short_to("0b"), 1)[:2] == ("cid", b)  # drained: its connections stay
    for state in (State.DISABLED, State.UP):
        r.set_admin(b, state)
        if state is State.UP:
            r.set_health(b, False, "test")
        assert qroute(r, short_to("0b"), 1)[:2] == ("unroutable", None)  # short, fresh: dropped
        assert qroute(r, short_to("0b"), pinned)[:2] == ("fallback", None)  # to its pin, a
        assert qroute(r, long_to(2, PLAIN.encode(b"\x0b", b"abcd")), 1)[:2] == ("fallback", None)


def test_a_steered_flow_pins_only_a_network_without_a_pin() -> None:
    r = quic_router()
    a, b = r.by_name["a"], r.by_name["b"]
    route = r.begin(5)
    if r.next_backend(route) is b:  # (rr starts anywhere): the names follow the pick
        a, b = b, a
    r.connected(route, a)
    # the same network, a QUIC connection of b's arriving: b carries it, the pin stays a
    moved = r.begin(5)
    r.quic.steer(moved, b, r.backends)
    assert r.connected(moved, b) == "cid" and moved.backend is b
    r.finish(moved)
    r.finish(route)
    assert r.table is not None
    entry = r.table.get(5)
    assert entry is not None and entry.backend is a and r.stats.repins == 0
    # a network with no pin: pinned to the connection's server
    fresh = r.begin(6)
    r.quic.steer(fresh, b, r.backends)
    assert r.connected(fresh, b) == "cid"
    r.finish(fresh)
    entry = r.table.get(6)
    assert entry is not None and entry.backend is b


def test_a_full_owner_gets_no_steered_flow_and_its_datagram_is_dropped() -> None:
    """Issue 33, Q1: a steered flow counts against its backend's max_conns like any other; at
    the bound the connection ID still names its server (no other can answer it), so the
    datagram is dropped as `full` and the client's retransmission gets through later."""
    text = QUIC_CONFIG.replace('server_id: "0b"}', 'server_id: "0b", max_conns: 2}')
    r = Router(load_config_text(text).groups[0], FakeClock(), random.Random(0))
    b = r.by_name["b"]
    routes = []
    for key in (1, 2):
        how, owner, cid = qroute(r, short_to("0b"), key)
        assert (how, owner) == ("cid", b) and len(cid) == 6
        route = r.begin(key)
        r.quic.steer(route, b, r.backends)
        routes.append(route)
    assert b.active == 2 and b.full
    assert qroute(r, short_to("0b"), 3)[:2] == ("full", b)
    r.finish(routes.pop())
    assert qroute(r, short_to("0b"), 3)[:2] == ("cid", b)


@pytest.mark.parametrize("how", ["drain", "backup"])
def test_a_steered_flow_never_pins_a_network_where_new_clients_may_not_go(how: str) -> None:
    """Issue 33, Q2: a connection ID naming a draining backend, or a backup while a primary can
    take clients, carries its flow there (its connections live there) but pins no network."""
    text = QUIC_CONFIG
    if how == "backup":
        text = text.replace('server_id: "0b"}', 'server_id: "0b", backup: true}')
    r = Router(load_config_text(text).groups[0], FakeClock(), random.Random(0))
    b = r.by_name["b"]
    if how == "drain":
        r.set_admin(b, State.DRAIN)
    assert qroute(r, short_to("0b"), 7)[:2] == ("cid", b)
    route = r.begin(7)
    r.quic.steer(route, b, r.backends)
    assert r.connected(route, b) == "cid" and route.backend is b
    r.finish(route)
    assert r.table is not None
    entry = r.table.get(7)
    assert entry is None or entry.backend is None
    # once no primary can take clients, a backup's ID does pin a fresh network
    if how == "backup":
        r.set_admin(r.by_name["a"], State.DISABLED)
        route = r.begin(8)
        r.quic.steer(route, b, r.backends)
        r.connected(route, b)
        r.finish(route)
        entry = r.table.get(8)
        assert entry is not None and entry.backend is b


@pytest.mark.parametrize(("written", "sid"), [("0b", "0b"), ("11", "11"), ("0x1b", "1b")])
def test_an_unquoted_server_id_is_read_as_written(written: str, sid: str) -> None:
    """Issue 33: an unquoted `server_id: 0b11` reported `got 3`, YAML's reading (a binary
    number), not what the user wrote; server IDs are hex, so the text is what counts."""
    text = QUIC_CONFIG.replace('server_id: "0b"', f"server_id: {written}")
    spec = load_config_text(text, "t.yaml").groups[0]
    assert spec.backends[1].server_id == sid
    two = QUIC_CONFIG.replace("server_id_length: 1", "server_id_length: 2")
    two = two.replace('server_id: "0a"', 'server_id: "0a0a"')
    assert (
        load_config_text(two.replace('server_id: "0b"', "server_id: 0b11"))
        .groups[0]
        .backends[1]
        .server_id
        == "0b11"
    )


def test_a_reload_that_changes_server_ids_applies_at_once_and_is_reported() -> None:
    r = quic_router()
    old_b = short_to("0b")
    text = QUIC_CONFIG.replace('server_id: "0b"', 'server_id: "1b"').replace(
        "nonce_length: 4}", "nonce_length: 4, config_id: 2}"
    )
    changes = reconfigure(r, load_config_text(text).groups[0], FakeClock(), None)
    assert "quic_lb.config_id 0 -> 2" in changes
    assert "backend b changed: server_id 0b -> 1b" in changes
    assert qroute(r, old_b, 1)[:2] == ("unroutable", None)
    new_b = short_to("1b", Codec(2, 1, 4))
    assert qroute(r, new_b, 1)[:2] == ("cid", r.by_name["b"])


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            ("quic_lb: {server_id_length: 1, nonce_length: 4}", "quic_lb: {nonce_length: 4}"),
            "t.yaml:7: groups.web.quic_lb: missing required key 'server_id_length'",
        ),
        (
            ("nonce_length: 4}", "nonce_length: 3}"),
            "t.yaml:7: groups.web.quic_lb.nonce_length: must be from 4 to 18, got 3",
        ),
        (
            ("server_id_length: 1, nonce_length: 4", "server_id_length: 10, nonce_length: 10"),
            "t.yaml:7: groups.web.quic_lb: server_id_length and nonce_length sum to at most 19",
        ),
        (
            ("nonce_length: 4}", "nonce_length: 4, config_id: 7}"),
            "t.yaml:7: groups.web.quic_lb.config_id: must be from 0 to 6, got 7",
        ),
        (
            ("nonce_length: 4}", "nonce_length: 4, key_file: /nonexistent/quic.key}"),
            "t.yaml:7: groups.web.quic_lb.key_file: cannot read /nonexistent/quic.key:",
        ),
        (
            ('server_id: "0b"', 'server_id: "0b0b"'),
            "t.yaml:10: groups.web.backends[1].server_id: 0b0b is 2 octets;"
            " quic_lb.server_id_length is 1",
        ),
        (
            ('server_id: "0b"', 'server_id: "0A"'),
            "t.yaml:10: groups.web.backends[1].server_id: 0a is also backend a's",
        ),
        (
            (', server_id: "0b"', ""),
            "t.yaml:10: groups.web.backends[1]: needs a server_id (1 octets in hex)",
        ),
        (
            ('server_id: "0b"', "server_id: 1_1"),
            "t.yaml:10: groups.web.backends[1].server_id: expected whole octets of hex digits, such as 0a1b, got '1_1'",
        ),
        (
            ('server_id: "0b"', 'server_id: "0x1"'),
            "t.yaml:10: groups.web.backends[1].server_id: expected whole octets of hex digits",
        ),
        (
            ("address: 10.0.0.2", "address: app.internal"),
            "t.yaml:10: groups.web.backends[1].resolve: app.internal may resolve to several"
            " servers, and a server ID names one: give resolve: first, or an address",
        ),
        (
            ('ports: [443, "443/udp"]', "ports: [443]"),
            'groups.web.quic_lb: routes QUIC: the group needs a UDP port ("443/udp")',
        ),
        (
            ("    quic_lb: {server_id_length: 1, nonce_length: 4}\n", ""),
            "t.yaml:8: groups.web.backends[0].server_id: has no use without the group's quic_lb",
        ),
    ],
)
def test_quic_lb_config_errors_are_one_line_each(change: tuple[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(QUIC_CONFIG.replace(*change), "t.yaml")
    (line,) = err.value.lines
    assert error in line, line


def test_a_key_file_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "quic.key"
    key.write_text("00112233")
    text = QUIC_CONFIG.replace("nonce_length: 4}", f"nonce_length: 4, key_file: {key}}}")
    with pytest.raises(ConfigError) as err:
        load_config_text(text, "t.yaml")
    assert err.value.lines == [
        f"t.yaml:7: groups.web.quic_lb.key_file: {key} must hold a 16-octet AES-128 key as"
        " 32 hex digits"
    ]
    key.write_text(KEY.hex().upper() + "\n")
    spec = load_config_text(text, "t.yaml").groups[0].quic_lb
    assert spec is not None and spec.key == KEY and KEY.hex() not in repr(spec)


QUIC_ROUTER = quic_router()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=48), st.integers(min_value=0, max_value=3))
def test_the_router_reads_any_datagram_without_an_exception(datagram: bytes, key: int) -> None:
    """Whatever a peer sends as a flow's first datagram: one of the routes, never an exception
    (a traceback in the log, or a flow lost to it)."""
    how, owner, _cid = qroute(QUIC_ROUTER, datagram, key)
    assert how in ("cid", "pin", "fallback", "unroutable", "malformed")
    assert (owner is not None) == (how == "cid")

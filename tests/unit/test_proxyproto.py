"""The PROXY protocol parser and encoder, on their own: round trips and hostile input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.core.proxyproto import MAX_HEADER, V2_SIGNATURE, ProxyError, encode, parse

ports = st.integers(0, 65535)


@settings(deadline=None)
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), ports, ports, st.sampled_from(["v1", "v2"]))
def test_round_trip_ipv4(src, dst, sport: int, dport: int, version: str) -> None:
    header = encode(version, (str(src), sport), (str(dst), dport))
    parsed = parse(header + b"client data")
    assert parsed is not None and parsed.length == len(header)
    assert parsed.source == (str(src), sport) and parsed.dest == (str(dst), dport)
    for cut in range(len(header)):
        assert parse(header[:cut]) is None  # any prefix: read more


@settings(deadline=None)
@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports, st.sampled_from(["v1", "v2"]))
def test_round_trip_ipv6(src, dst, sport: int, dport: int, version: str) -> None:
    header = encode(version, (str(src), sport), (str(dst), dport))
    parsed = parse(header)
    assert parsed is not None and parsed.source is not None and parsed.dest is not None
    assert ipaddress.ip_address(parsed.source[0]) == src and parsed.source[1] == sport
    assert ipaddress.ip_address(parsed.dest[0]) == dst and parsed.dest[1] == dport


@settings(deadline=None)
@given(st.binary(max_size=600))
def test_garbage_is_refused_or_incomplete_never_a_crash(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyError:
        return
    assert header is None or header.length <= len(data)


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_v2_signature_with_garbage_after(data: bytes) -> None:
    try:
        header = parse(V2_SIGNATURE + data)
    except ProxyError:
        return
    assert header is None or header.length <= len(V2_SIGNATURE) + len(data)


def test_spec_cases() -> None:
    assert parse(b"PROXY UNKNOWN\r\nGET /").source is None  # type: ignore[union-attr]
    local = V2_SIGNATURE + bytes((0x20, 0x00)) + struct.pack("!H", 0)
    assert parse(local).source is None  # type: ignore[union-attr]
    # TLVs after the addresses are skipped, whatever they say.
    v2 = encode("v2", ("10.1.2.3", 4000), ("10.9.9.9", 443))
    with_tlv = v2[:14] + struct.pack("!H", 12 + 7) + v2[16:] + b"\x04\x00\x04abcd"
    got = parse(with_tlv + b"rest")
    assert got is not None and got.source == ("10.1.2.3", 4000) and got.length == len(with_tlv)
    for bad in (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",  # port out of range
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",  # address
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",  # protocol
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # fields
        b"PROXY " + b"x" * 120,  # too long without CRLF
        b"GET / HTTP/1.1\r\n",  # not a header at all
        V2_SIGNATURE + bytes((0x11, 0x11)) + struct.pack("!H", 12),  # version 1 in a v2 header
        V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", 4) + b"1234",  # too short for IPv4
        V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", MAX_HEADER),  # oversized
    ):
        with pytest.raises(ProxyError):
            parse(bad)


def _v2_with(tlvs: bytes) -> bytes:
    """A v2 PROXY header for 10.0.0.1:1111 -> 10.0.0.2:80 carrying `tlvs` after its addresses."""
    addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1111, 80)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def test_v2_tlvs_are_walked_and_each_length_checked() -> None:
    # well-formed: an ALPN TLV (0x01) and a NOOP (0x04) of length 0
    good = _v2_with(b"\x01" + struct.pack("!H", 2) + b"h2" + b"\x04\x00\x00")
    parsed = parse(good + b"data")
    assert parsed is not None and parsed.source == ("10.0.0.1", 1111)
    assert parsed.length == len(good)
    # a TLV announcing 65,535 bytes with 3 present; a TLV cut inside its own type and length
    for bad in (b"\x01" + struct.pack("!H", 65535) + b"abc", b"\x01\x00", b"\x01"):
        with pytest.raises(ProxyError, match="TLV"):
            parse(_v2_with(bad) + b"data")

"""QUIC-LB connection IDs (issue 27, the first step): the draft's own test vectors (Appendix B of
draft-ietf-quic-load-balancers, editor's copy of 28 February 2025) and its worked four-pass
example (section 4.3.2.4), both ways."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.core.quiclb import Codec

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

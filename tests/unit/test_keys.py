import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from l4lb.core.keys import V6_TAG, format_key, make_keyer, mask_prefix_len, v6_mask


def test_ipv4_masking() -> None:
    k32 = make_keyer(0xFFFFFFFF, 128)
    k24 = make_keyer(0xFFFFFF00, 128)
    assert k32("10.1.2.3") != k32("10.1.2.4")
    assert k24("10.1.2.3") == k24("10.1.2.200") == int(ipaddress.ip_address("10.1.2.0"))
    assert k24("10.1.3.3") != k24("10.1.2.3")


def test_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    k = make_keyer(0xFFFFFF00, 64)
    assert k("::ffff:10.1.2.3") == k("10.1.2.9")


def test_ipv6_prefix_and_tag() -> None:
    k = make_keyer(0xFFFFFFFF, 64)
    assert k("2001:db8:0:1::1") == k("2001:db8:0:1:ffff::2")
    assert k("2001:db8:0:2::1") != k("2001:db8:0:1::1")
    assert k("::1") & V6_TAG
    # An IPv6 address whose low bits look like an IPv4 address never collides with it.
    assert make_keyer(0xFFFFFFFF, 128)("::10.1.2.3") != make_keyer(0xFFFFFFFF, 128)("10.1.2.3")
    assert k("fe80::1%eth0") == k("fe80::2")


def test_non_contiguous_mask_as_lvs_allows() -> None:
    k = make_keyer(0xFF00FF00, 128)
    assert k("10.1.2.3") == k("10.9.2.8")
    assert mask_prefix_len(0xFF00FF00) is None
    assert format_key(k("10.1.2.3"), 0xFF00FF00) == "10.0.2.0/255.0.255.0"


def test_format_key() -> None:
    assert format_key(make_keyer(0xFFFFFF00, 128)("203.0.113.7"), 0xFFFFFF00) == "203.0.113.0/24"
    assert format_key(make_keyer(0, 48)("2001:db8:1:2::5"), 0, 48) == "2001:db8:1::/48"


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_ipv4_matches_ipaddress(addr: ipaddress.IPv4Address, plen: int) -> None:
    mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    assert make_keyer(mask, 128)(str(addr)) == int(net.network_address)


@given(st.ip_addresses(v=6), st.integers(0, 128))
def test_ipv6_matches_ipaddress(addr: ipaddress.IPv6Address, plen: int) -> None:
    if addr.ipv4_mapped is not None:
        return
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    key = make_keyer(0xFFFFFFFF, plen)(str(addr))
    assert key == int(net.network_address) | V6_TAG
    assert key & ~V6_TAG & ~v6_mask(plen) == 0

"""The HA pair's pure parts: its configuration section, the network lock's rules, and a peer's
socket states checked before anything is made of them (runtime/pair.py, dataplane/repair.py)."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config_text
from l4lb.dataplane.repair import RepairError, TcpState
from l4lb.runtime.netlock import ruleset

TOKEN = "t" * 40


def pair_config(tmp_path: Path, ha: str, *, extra: str = "") -> str:
    (tmp_path / "token").write_text(TOKEN)
    return textwrap.dedent(f"""\
        admin: {{listen: "10.2.0.1:9100", token_file: {tmp_path / "token"}, read_token: true}}
        {extra}
        ha: {ha}
        groups:
          web:
            listen: [10.1.0.100]
            ports: [80]
            source: 10.2.0.100
            backends: [{{name: a, address: 10.2.0.11}}]
        """)


def test_ha_section_names_the_peer_and_derives_the_addresses(tmp_path: Path) -> None:
    text = pair_config(tmp_path, '{peer: "10.2.0.2:9100", track_file: l4lb.track}')
    config = load_config_text(text, str(tmp_path / "l4lb.yaml"))
    ha = config.ha
    assert ha is not None
    assert (ha.peer_host, ha.peer_port) == ("10.2.0.2", 9100)
    assert ha.track_file == str(tmp_path / "l4lb.track")  # (beside the configuration)
    assert ha.addresses == ("10.1.0.100", "10.2.0.100")
    assert load_config_text(pair_config(tmp_path, "{}").replace("ha: {}", "")).ha is None


@pytest.mark.parametrize(
    ("ha", "extra", "says"),
    [
        ("{track_file: x}", "", "ha: missing required key 'peer'"),
        ('{peer: "10.2.0.2:9100", track_file: x, addresses: [nope]}', "", "ha.addresses[0]"),
        ('{peer: "10.2.0.2:9100", track_file: x}', "workers: 2", "workers: 1"),
        ('{peer: "10.2.0.2:9100", track_file: x, timeout: -1}', "", "ha.timeout"),
    ],
)
def test_ha_section_errors_are_one_line(tmp_path: Path, ha: str, extra: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config_text(pair_config(tmp_path, ha, extra=extra), "f.yaml")
    assert any(says in line and line.startswith("f.yaml:") for line in exc.value.lines), (
        exc.value.lines
    )


def test_ha_needs_an_admin_api_the_peer_reaches(tmp_path: Path) -> None:
    text = pair_config(tmp_path, '{peer: "10.2.0.2:9100", track_file: x}')
    with pytest.raises(ConfigError) as exc:
        load_config_text(text.replace("10.2.0.1:9100", "127.0.0.1:9100"), "f.yaml")
    assert any("the peer cannot reach this host's admin API" in line for line in exc.value.lines)


def test_ha_needs_the_admin_token(tmp_path: Path) -> None:
    text = pair_config(tmp_path, '{peer: "10.2.0.2:9100", track_file: x}')
    text = text.replace(f", token_file: {tmp_path / 'token'}, read_token: true", "")
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "f.yaml")
    assert any("needs admin.token_file" in line for line in exc.value.lines)


def test_the_lock_drops_each_connection_both_ways_and_new_syns() -> None:
    rules = ruleset([("10.100.0.1", 40000, "10.1.0.100", 80), ("::1", 5, "::2", 6)], [80, 80])
    assert "add element inet l4lb_ha conns4 { 10.100.0.1 . 40000 . 10.1.0.100 . 80 }" in rules
    assert "add element inet l4lb_ha conns6 { ::1 . 5 . ::2 . 6 }" in rules
    assert "ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop" in rules  # (in)
    assert "ip daddr . tcp dport . ip saddr . tcp sport @conns4 drop" in rules  # (out)
    assert "tcp dport { 80 } drop" in rules
    assert "tcp dport" not in ruleset([("10.0.0.1", 1, "10.0.0.2", 2)]).split("@conns6")[-1]
    assert rules.startswith("table inet l4lb_ha {}\ndelete table inet l4lb_ha\n")  # (remade)


GOOD_STATE = {
    "local": ["10.1.0.100", 80],
    "remote": ["10.100.0.1", 40000],
    "send_seq": 1,
    "recv_seq": 2**32 - 1,
    "send_queue": "aGVsbG8=",
    "recv_queue": "",
    "mss": 1460,
    "wscale": [7, 7],
    "sack": True,
    "timestamp": 12345,
    "window": [1, 2, 3, 4, 5],
}


def test_a_peer_state_round_trips() -> None:
    state = TcpState.from_json(GOOD_STATE)
    assert state.send_queue == b"hello"
    assert TcpState.from_json(state.to_json()) == state


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("local", ["nope", 80], "not an IP address"),
        ("remote", ["10.0.0.1", 0], "remote"),
        ("send_seq", 2**32, "send_seq"),
        ("send_queue", "***", "not base64"),
        ("mss", True, "mss"),
        ("wscale", [15, 0], "wscale"),
        ("window", [1, 2], "window"),
        ("sack", 1, "sack"),
        ("timestamp", -2, "timestamp"),
    ],
)
def test_a_bad_peer_state_is_refused(key: str, value: object, says: str) -> None:
    with pytest.raises(RepairError, match=says):
        TcpState.from_json({**GOOD_STATE, key: value})
    with pytest.raises(RepairError):
        TcpState.from_json([1, 2])


def test_holds_knows_this_hosts_addresses() -> None:
    from l4lb.runtime.pair import holds

    assert holds("127.0.0.1")
    assert not holds("192.0.2.77")  # (TEST-NET-1: nobody's)
    with socket.socket() as s:  # (and says nothing of ports: a bound one is still held)
        s.bind(("127.0.0.1", 0))
        assert holds("127.0.0.1")

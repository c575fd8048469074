"""`l4lb import-keepalived` on files in the style of keepalived's own samples: the output passes
`l4lb check`, carries every option it can, comments every one it cannot, and behaves the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config, load_config_text
from l4lb.config.keepalived import KeepalivedError, convert
from tests.support.helpers import free_ports, hello, running
from tests.support.procs import ROOT
from tests.support.procs import l4lb_cli as l4lb

FWMARK = """\
! Sample configuration for use Linux FWMARK, in keepalived's style
global_defs {
  router_id edge
}
virtual_server fwmark 1 {
  delay_loop 6
  lb_algo rr
  lb_kind NAT
  persistence_timeout 900
  protocol TCP
  real_server 192.168.201.100 {
    weight 1
    TCP_CHECK {
      connect_timeout 3
    }
  }
  real_server 192.168.201.101 {
    weight 2
    TCP_CHECK {
      connect_timeout 3
      retry 2
    }
  }
}
"""

SHOP = """\
# a shop: HTTP with a sorry server, HTTPS checked over TLS, an include for the API
virtual_server 10.10.10.2 80 {
    delay_loop 10
    lb_algo wlc
    persistence_granularity 255.255.255.0
    protocol TCP
    alpha
    quorum 2
    hysteresis 1
    sorry_server 10.10.10.99 8080
    real_server 10.10.10.11 8080 {
        weight 1
        inhibit_on_failure
        HTTP_GET {
            url {
              path /healthz
              status_code 200
              digest 640205b7b0fc66c1ea91c463fac6334d
            }
            connect_timeout 2
            retry 3
            delay_before_retry 3
        }
    }
    real_server 10.10.10.12 8080 {
        weight 1
        SSL_GET {
            url {
              path /
            }
        }
    }
}
virtual_server 10.10.10.2 53 {
    protocol UDP
    real_server 10.10.10.20 53 {
    }
}
include conf.d/*.conf
"""

API = """\
virtual_server 10.10.10.3 9000 {
    lb_algo twos
    real_server 10.10.10.31 9000 {
        MISC_CHECK {
            misc_path "/usr/local/bin/check-api --fast"
            misc_timeout 4
        }
    }
}
"""


def write(tmp: Path, text: str, name: str = "keepalived.conf") -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_fwmark_service_with_its_ports(tmp_path: Path) -> None:
    text, notes = convert(write(tmp_path, FWMARK), {1: [80, 443]})
    (g,) = load_config_text(text, "out.yaml").groups
    assert (g.name, g.mark, g.ports, g.scheduler) == ("fwmark1", 1, (80, 443), "rr")
    assert g.persistence.timeout == 900 and g.persistence.netmask == 0xFFFFFFFF
    a, b = g.backends
    assert (a.address, a.weight, b.weight) == ("192.168.201.100", 1, 2)
    assert a.port_for(443) == 443  # no port on the real server: the client's port, as IPVS does
    assert a.health_check is not None and (
        a.health_check.type,
        a.health_check.interval,
        a.health_check.timeout,
    ) == ("tcp", 6, 3)
    assert (a.health_check.fall, b.health_check.fall, a.health_check.rise) == (2, 3, 1)  # retry + 1
    assert notes == 1 and "lb_kind NAT: l4lb dials the real servers from each client's" in text
    assert g.source == "client"  # NAT kept the client's address: so does l4lb


def test_fwmark_without_ports_says_so_and_check_refuses_it(tmp_path: Path) -> None:
    """Issue 33's paper cut: without --fwmark-ports the group got `ports: [1]`, which `l4lb
    check` passed: a group listening on port 1. Now it has no port, and check says so."""
    text, notes = convert(write(tmp_path, FWMARK))
    assert "--fwmark-ports" in text and notes == 2  # (and lb_kind NAT)
    with pytest.raises(ConfigError) as refused:
        load_config_text(text, "out.yaml")
    assert refused.value.lines == [
        "out.yaml:8: groups.fwmark1.ports: must list at least one port"
    ], refused.value.lines


def test_a_shop_every_option_carried_or_commented(tmp_path: Path) -> None:
    write(tmp_path, API, "conf.d/api.conf")
    text, notes = convert(write(tmp_path, SHOP))
    groups = {g.name: g for g in load_config_text(text, "out.yaml").groups}
    web = groups["vs_10_10_10_2_80"]
    assert web.listen == ("10.10.10.2",) and web.ports == (80,) and web.scheduler == "wlc"
    assert (
        web.persistence.timeout == 360 and web.persistence.netmask == 0xFFFFFF00
    )  # granularity implies 360 s
    assert (web.quorum, web.hysteresis) == (2, 1)
    assert web.sorry_server is not None and web.sorry_server.port_for(80) == 8080
    one, two = web.backends
    assert one.port_for(80) == 8080 and one.inhibit_on_failure
    assert (
        one.health_check is not None
        and one.health_check.type == "http"
        and one.health_check.path == "/healthz"
    )
    assert (
        one.health_check.status == (200,)
        and one.health_check.fall == 4
        and one.health_check.interval == 10
    )
    assert (
        two.health_check is not None
        and two.health_check.type == "tls"
        and two.health_check.status == tuple(range(200, 300))
    )
    api = groups["vs_10_10_10_3_9000"]  # from the include
    assert (
        api.scheduler == "p2c" and api.persistence.timeout == 0
    )  # keepalived: no persistence unless asked
    check = api.backends[0].health_check
    assert (
        check is not None
        and check.command == ("/usr/local/bin/check-api", "--fast")
        and check.timeout == 4
    )
    dns = groups["vs_10_10_10_2_53_udp"]  # a UDP virtual server is a group of UDP ports
    assert (dns.ports, dns.udp_ports, dns.backends[0].address) == ((), (53,), "10.10.10.20")
    for dropped in ("alpha", "digest", "delay_before_retry"):
        assert dropped in text, dropped
    assert notes == 3


def test_command_line_and_errors(tmp_path: Path) -> None:
    conf = write(tmp_path, FWMARK)
    out = tmp_path / "l4lb.yaml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "l4lb",
            "import-keepalived",
            str(conf),
            "--fwmark-ports",
            "1=80,443",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert (
        subprocess.run(
            [sys.executable, "-m", "l4lb", "check", "-c", str(out)], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    bad = write(tmp_path, "virtual_server 10.0.0.1 80 {\n  real_server 10.0.0.2 80 {\n", "bad.conf")
    with pytest.raises(KeepalivedError, match="ends inside a block"):
        convert(bad)
    with pytest.raises(KeepalivedError, match="no virtual_server to convert"):
        convert(write(tmp_path, "global_defs {\n router_id x\n}\n", "empty.conf"))


SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "reference" / "keepalived-samples"


@pytest.mark.skipif(
    not SAMPLES.is_dir(), reason="keepalived's samples are in ../shared, beside the clone"
)
def test_keepalived_own_samples_all_convert_to_valid_configs(tmp_path: Path) -> None:
    for sample in sorted(SAMPLES.glob("keepalived.conf.*")):
        text, _ = convert(sample, {1: [80, 443], 2: [8443]})
        out = tmp_path / (sample.name + ".yaml")
        out.write_text(text)
        load_config(out)


async def test_the_imported_config_behaves_the_same(backends, tmp_path: Path) -> None:
    """Persistence and scheduling carried over: each client stays on one real server."""
    vs_port, *_ = free_ports(1)
    bs = await backends(2, [vs_port])
    servers = "".join(
        f"  real_server 127.0.0.1 {b.ports[vs_port]} {{\n    weight 1\n  }}\n" for b in bs
    )
    conf = write(
        tmp_path,
        f"virtual_server 127.0.0.1 {vs_port} {{\n  lb_algo rr\n  persistence_timeout 600\n{servers}}}\n",
    )
    text, _ = convert(conf)
    async with running(load_config_text(text, "imported.yaml")):
        seen = {
            f"127.0.80.{i}": {await hello(vs_port, f"127.0.80.{i}") for _ in range(3)}
            for i in range(1, 9)
        }
    assert all(len(s) == 1 for s in seen.values())
    assert {next(iter(s)) for s in seen.values()} == {b.name for b in bs}


FAITHFUL = """\
virtual_server 10.0.0.1 80 {
  delay_loop 10
  lb_algo wrr
  protocol TCP
  quorum 4
  virtualhost shop.example
  real_server 10.0.1.1 8080 {
    weight 3
    HTTP_GET {
      url {
        path /health
        status_code 200-299 400-499 503 505
        digest 640205b7b0fc66c1ea91c463fac6334d
      }
      url {
        path /ready
      }
      connect_timeout 2
      retry 2
    }
    PING_CHECK {
    }
  }
  real_server 10.0.1.2 8080 {
    weight 1
    MISC_CHECK {
      misc_path "/usr/local/bin/check --port 8080"
      misc_dynamic
    }
  }
  real_server 10.0.1.3 8080 {
    weight 1
    SMTP_CHECK {
      helo_name lb.example
    }
  }
  real_server 10.0.1.4 8080 {
    weight 2
    SSL_GET {
      url {
        path /
        virtualhost api.example
      }
    }
  }
}
virtual_server 10.0.0.1 53 {
  protocol UDP
  real_server 10.0.1.5 53 {
    UDP_CHECK {
    }
  }
}
"""


def test_every_keepalived_point_carried_or_commented_with_file_and_line(tmp_path: Path) -> None:
    conf = write(tmp_path, FAITHFUL, "faithful.conf")
    text, notes = convert(conf)
    out = tmp_path / "out.yaml"
    out.write_text(text)
    group, dns = load_config(out).groups
    comments = [line.strip() for line in text.splitlines() if "# not carried over" in line]
    assert notes == len(comments) + text.count("# changed")
    assert all(f"({conf}:" in c for c in comments), comments

    def commented(line: int, words: str) -> bool:
        return any(f"({conf}:{line}): {words}" in c for c in comments)

    b1, b2, b3, b4 = group.backends
    # status_code ranges and lists, the first url checked, the second a comment, virtualhost
    assert b1.health_check is not None and b1.health_check.type == "http"
    assert b1.health_check.path == "/health"
    assert set(b1.health_check.status) == {*range(200, 300), *range(400, 500), 503, 505}
    assert b1.health_check.host == "shop.example"  # the virtual server's virtualhost
    assert (b1.health_check.timeout, b1.health_check.fall) == (2, 3)
    assert commented(15, "url") and "another url (/ready)" in text
    assert commented(13, "digest")
    assert commented(21, "PING_CHECK")
    # MISC_CHECK: keepalived's defaults are retry 0 (fall 1) and misc_timeout = delay_loop
    assert b2.health_check is not None and b2.health_check.type == "exec"
    assert b2.health_check.command == ("/usr/local/bin/check", "--port", "8080")
    assert (b2.health_check.fall, b2.health_check.timeout) == (1, 10)
    assert commented(28, "misc_dynamic")
    # SMTP_CHECK: a tcp check that expects the server's 220 greeting
    assert b3.health_check is not None and b3.health_check.type == "tcp"
    assert b3.health_check.expect == "^220"
    assert (b3.health_check.fall, b3.health_check.timeout) == (2, 5)
    assert commented(34, "helo_name")
    assert b4.health_check is not None and b4.health_check.type == "tls"
    assert b4.health_check.host == "api.example"  # the url's own virtualhost wins
    # quorum 4 of weights 3, 1, 1, 2: any 3 backends carry at least 4 (1 + 1 + 2)
    assert group.quorum == 3 and ": quorum 4: keepalived counts weights" in text
    # UDP_CHECK without payload or require_reply: an empty datagram, up unless an ICMP error
    (b,) = dns.backends
    assert dns.udp_ports == (53,) and b.health_check is not None
    assert (b.health_check.type, b.health_check.send, b.health_check.expect) == ("udp", None, None)


def test_quorum_of_equal_weights_is_a_count(tmp_path: Path) -> None:
    conf = (
        "virtual_server 10.0.0.1 80 {\n  quorum 2\n"
        + "".join(f"  real_server 10.0.1.{i} 80 {{\n    weight 1\n  }}\n" for i in range(1, 4))
        + "}\n"
    )
    text, notes = convert(write(tmp_path, conf, "q.conf"))
    assert load_config_text(text).groups[0].quorum == 2 and notes == 0


def test_udp_services_and_their_udp_checks_are_carried(tmp_path: Path) -> None:
    conf = write(
        tmp_path,
        "virtual_server 10.0.0.1 53 {\n  protocol UDP\n  persistence_timeout 60\n"
        "  real_server 10.0.0.11 5353 {\n    UDP_CHECK {\n      connect_timeout 2\n"
        "      payload 00 01 ff\n      require_reply 2a\n    }\n  }\n}\n"
        "virtual_server 10.0.0.1 53 {\n  protocol TCP\n  persistence_timeout 60\n"
        "  real_server 10.0.0.11 5353 {\n  }\n}\n"
        "virtual_server 10.0.0.1 9 {\n  protocol SCTP\n}\n",
        "udp.conf",
    )
    text, notes = convert(conf)
    udp, tcp = load_config_text(text).groups
    assert (udp.name, udp.ports, udp.udp_ports) == ("vs_10_0_0_1_53_udp", (), (53,))
    (b,) = udp.backends
    assert dict(b.udp_ports) == {53: 5353} and not b.ports
    check = b.health_check
    assert check is not None and check.type == "udp" and check.timeout == 2
    assert check.send == "\x00\x01\xff" and check.expect == "^\\x2a"  # bytes; their regex
    assert (tcp.ports, tcp.udp_ports) == ((53,), ())
    assert notes == 1 and f"({conf}:18): virtual_server 10.0.0.1 9: protocol SCTP" in text


@pytest.mark.parametrize(
    ("vs", "granularity", "netmask", "prefix", "changed"),
    [
        ("10.0.0.1 80", "255.255.255.0", 0xFFFFFF00, 128, False),
        ("10.0.0.1 80", "24", 0x00000018, 128, True),  # inet_aton: the address 0.0.0.24
        ("10.0.0.1 80", "/24", 0xFFFFFFFF, 128, True),  # refused by keepalived: /32
        ("fwmark 7", "64", 0xFFFFFFFF, 64, False),  # family unknown, no dot: IPv6
        ("fwmark 7", "255.255.0.0", 0xFFFF0000, 128, False),
        ("2001:db8::1 80", "/64", 0xFFFFFFFF, 128, True),  # refused: /128
    ],
)
def test_granularity_as_keepalived_reads_it(
    tmp_path: Path, vs: str, granularity: str, netmask: int, prefix: int, changed: bool
) -> None:
    """Issue 25: `persistence_granularity 24` on an IPv4 service became `ipv6_prefix: 24` and
    `/24` a value l4lb check refused; keepalived (check_parser.c) reads an IPv4 service's value
    with inet_aton (24 is 0.0.0.24), an IPv6 one's as a prefix length, and guesses the family of
    a fwmark service from a dot; what it refuses it ignores. A comment says each surprise, and
    the count agrees with the comments."""
    conf = write(
        tmp_path,
        f"virtual_server {vs} {{\n  persistence_timeout 60\n"
        f"  persistence_granularity {granularity}\n  lb_algo rr\n"
        "  real_server 10.0.0.11 80 {\n  }\n}\n"
        if ":" not in vs
        else f"virtual_server {vs} {{\n  persistence_timeout 60\n"
        f"  persistence_granularity {granularity}\n  real_server 2001:db8::11 80 {{\n  }}\n}}\n",
    )
    text, notes = convert(conf, {7: [80]})
    (g,) = load_config_text(text, "out.yaml").groups  # l4lb check accepts it
    assert (g.persistence.netmask, g.persistence.ipv6_prefix) == (netmask, prefix)
    assert g.persistence.timeout == 60
    assert (f"persistence_granularity {granularity}:" in text) is changed
    assert notes == text.count("# changed") + text.count("# not carried over")
    cli = l4lb("import-keepalived", str(conf), "--fwmark-ports", "7=80")
    said = cli.stderr.strip()
    assert said == (
        f"{notes} carried over but changed: see the comments that say so" if notes else ""
    )


@pytest.mark.parametrize(("kind", "source"), [("NAT", "client"), ("DR", "client"), ("TUN", None)])
def test_lb_kind_says_what_lvs_did_with_the_clients_address(
    tmp_path: Path, kind: str, source: str | None
) -> None:
    """Issue 25: `lb_kind NAT` imported as "l4lb is a full proxy (like NAT)", though NAT keeps
    the client's address and l4lb did not; NAT and DR now import as `source: client` with the
    route the host needs, TUN with a comment; `l4lb check` accepts each."""
    conf = write(
        tmp_path,
        f"virtual_server 10.0.0.1 80 {{\n  lb_kind {kind}\n  real_server 10.0.0.11 80 {{\n  }}\n}}\n",
    )
    text, notes = convert(conf)
    (g,) = load_config_text(text, "out.yaml").groups
    assert g.source == source and notes == 1
    assert (f"lb_kind {kind}:" in text) and (("ip rule add iif" in text) is (source == "client"))
    check = l4lb("check", "-c", str(write(tmp_path, text, "out.yaml")))
    assert check.returncode == 0 and "ok (1 group, 1 backend)" in check.stdout

"""Backends given by DNS name: the address forms, the expansion, and real lookups through the
system resolver (localhost, a name in /etc/hosts, a name that does not resolve, and a hosts file
the test controls, bind-mounted over /etc/hosts in a mount namespace of l4lb's own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config_text
from l4lb.config.names import expand, names_in
from tests.support.helpers import free_ports
from tests.support.procs import l4lb_cli, processes, start_backend, start_l4lb

GROUP = "groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{ports}]\n    backends:\n"


def cfg(backend: str, ports: str = "8080") -> str:
    return GROUP.format(ports=ports) + f"      - {backend}\n"


@pytest.mark.parametrize(
    ("address", "host", "ports"),
    [
        ("10.0.0.5", "10.0.0.5", {}),
        ("10.0.0.5:9001", "10.0.0.5", {8080: 9001, 8443: 9364}),
        ("'[::1]:9001'", "::1", {8080: 9001, 8443: 9364}),
        ("'::1'", "::1", {}),
        ("app", "app", {}),
        ("App.Example.:9001", "app.example", {8080: 9001, 8443: 9364}),
    ],
)
def test_an_address_is_an_ip_or_a_name_with_an_optional_port(
    address: str, host: str, ports: dict[int, int]
) -> None:
    c = load_config_text(cfg(f"{{name: a, address: {address}}}", "8080, 8443"))
    b = c.groups[0].backends[0]
    assert (b.address, dict(b.ports)) == (host, ports)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("{name: a, address: 'app:0'}", "must be a number from 1 to 65535"),
        ("{name: a, address: 'a b'}", "expected an IP address or a DNS name"),
        ("{name: a, address: '[app]:80'}", "is not an IPv6 address"),
        ("{name: a, address: 'app:80', ports: {8080: 81}}", "not both"),
        ("{name: a, address: '10.0.0.1', resolve: first}", "applies to a DNS name"),
        ("{name: a, address: app, resolve: some}", "resolve"),
        ("{name: a, address: 'app:65500'}", "outside 1-65535"),
    ],
)
def test_a_bad_address_is_one_line_naming_the_field(backend: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(cfg(backend, "8080, 8443"), "t.yaml")
    assert len(err.value.lines) == 1 and message in err.value.lines[0]
    assert err.value.lines[0].startswith("t.yaml:6: groups.web.backends[0]")


def test_the_expansion_of_each_kind_of_answer() -> None:
    c = load_config_text(
        cfg("{name: one, address: 'one:9001'}")
        + "      - {name: many, address: many}\n"
        + "      - {name: first, address: many, resolve: first}\n"
        + "      - {name: gone, address: gone.invalid}\n"
        + "      - {name: lit, address: 10.0.0.9}\n"
    )
    assert names_in(c) == ["gone.invalid", "many", "one"]
    answers = {
        "one": ("10.0.0.1",),
        "many": ("10.0.0.3", "::2", "10.0.0.2"),
        "gone.invalid": "cannot resolve gone.invalid: Name or service not known",
    }
    got = {
        (b.name, b.address, b.hostname, b.unresolved) for b in expand(c, answers).groups[0].backends
    }
    assert got == {
        ("one", "10.0.0.1", "one", ""),
        ("many-10.0.0.2", "10.0.0.2", "many", ""),
        ("many-10.0.0.3", "10.0.0.3", "many", ""),
        ("many-::2", "::2", "many", ""),
        ("first", "10.0.0.3", "many", ""),  # the resolver's first, not the smallest
        ("gone", "gone.invalid", "gone.invalid", answers["gone.invalid"]),
        ("lit", "10.0.0.9", "", ""),
    }
    before = expand(c, {}).groups[0].backends
    assert all(b.unresolved == "not resolved yet" for b in before if b.hostname)


def served(tmp: Path, admin: int, port: int, options: str, *backends: str, top: str = "") -> Path:
    """A configuration file: the admin API, one group on `port` with `options`, `backends`."""
    path = tmp / "l4lb.yaml"
    path.write_text(
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n{top}"
        + GROUP.format(ports=port).replace("    backends:\n", f"    {options}\n    backends:\n")
        + "".join(f"      - {b}\n" for b in backends)
    )
    return path


NEEDS_UNSHARE = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("curl") is None,
    reason="needs root and unshare (a mount namespace of its own for /etc/hosts), and curl",
)


def private_hosts(hosts: Path) -> tuple[str, ...]:
    """A command prefix: run in a mount namespace of its own where /etc/hosts is `hosts`
    (bind-mounted, so that rewriting `hosts` in place is what the resolver reads next)."""
    return ("unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh")


def repins(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("l4lb_affinity_repins_total{")
        )
    )


def hosts_name() -> str | None:
    """A name /etc/hosts gives a loopback address, other than localhost."""
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0].startswith("127."):
            for name in fields[1:]:
                if name != "localhost" and "." not in name[:1]:
                    return name
    return None


def api(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def get(port: int, source: str = "127.0.0.1") -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", "--interface", source, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_names_from_localhost_and_etc_hosts_serve_and_one_that_does_not_resolve_is_down(
    tmp_path: Path,
) -> None:
    named = hosts_name()
    if named is None:
        pytest.skip("/etc/hosts names no loopback host but localhost")
    port, admin, b1, b2 = free_ports(4)
    config = served(
        tmp_path,
        admin,
        port,
        "persistence: {timeout: 0}\n    scheduler: rr",
        f"{{name: b1, address: 'localhost:{b1}'}}",
        f"{{name: b2, address: '{named}:{b2}'}}",
        "{name: b3, address: nowhere.invalid}",
    )
    check = l4lb_cli("check", "-c", str(config))
    assert check.returncode == 0 and "warning: cannot resolve nowhere.invalid" in check.stderr
    with processes() as procs:
        procs.append(start_backend("b1", http=f"127.0.0.1:{b1}"))
        procs.append(start_backend("b2", http=f"127.0.0.1:{b2}"))
        lb = start_l4lb(config)
        procs.append(lb)
        seen = {get(port) for _ in range(6)}
        assert seen == {"b1", "b2"}
        backends = {b["name"]: b for b in api(admin, "/api/v1/backends")["backends"]}  # type: ignore[index]
        assert (
            backends["b1"]["address"] == "127.0.0.1" and backends["b1"]["hostname"] == "localhost"
        )
        assert backends["b2"]["hostname"] == named
        assert backends["b3"]["state"] == "down"
        assert "cannot resolve nowhere.invalid" in backends["b3"]["resolve_error"]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert (
            'l4lb_backend_info{address="127.0.0.1",backend="b1",backup="false",group="web",'
            'hostname="localhost"} 1.0' in metrics
        )
        assert 'address="nowhere.invalid",backend="b3"' in metrics


@NEEDS_UNSHARE
def test_a_changed_address_is_picked_up_and_keeps_the_names_clients(tmp_path: Path) -> None:
    """/etc/hosts, for l4lb alone, is a file the test rewrites: app.test moves from one
    backend's address to another's within resolve_interval, and its pins stay with it."""
    port, admin, bport = free_ports(3)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.21 app.test\n")
    config = served(
        tmp_path,
        admin,
        port,
        "persistence: {timeout: 5m}",
        f"{{name: app, address: 'app.test:{bport}'}}",
        f"{{name: other, address: 'other.test:{bport}'}}",
        top="resolve_interval: 0.5s\n",
    )
    prefix = private_hosts(hosts)
    with processes() as procs:
        procs.append(start_backend("first", http=f"127.0.0.21:{bport}"))
        procs.append(start_backend("second", http=f"127.0.0.22:{bport}"))
        procs.append(start_l4lb(config, prefix=prefix))
        assert {get(port, f"127.0.{i}.9") for i in range(5)} == {"first"}
        pins = api(admin, "/api/v1/affinity")
        assert {e["backend"] for e in pins["entries"]} == {"app"}  # type: ignore[index]
        hosts.write_text("127.0.0.1 localhost\n127.0.0.22 app.test\n127.0.0.21 other.test\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            b = {x["name"]: x for x in api(admin, "/api/v1/backends")["backends"]}  # type: ignore[index]
            if b["app"]["address"] == "127.0.0.22" and b["other"]["state"] == "up":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the new address was not picked up: {b}")
        # The same clients, still pinned to `app`: now at its new address.
        assert {get(port, f"127.0.{i}.9") for i in range(5)} == {"second"}
        pins = api(admin, "/api/v1/affinity")
        assert {e["backend"] for e in pins["entries"]} == {"app"}  # type: ignore[index]


@NEEDS_UNSHARE
def test_a_name_of_several_addresses_is_a_backend_per_address_that_come_and_go(
    tmp_path: Path,
) -> None:
    port, admin, bport = free_ports(3)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.31 pool.test\n127.0.0.32 pool.test\n")
    config = served(
        tmp_path,
        admin,
        port,
        "persistence: {timeout: 5m, netmask: /24}\n    scheduler: rr",
        f"{{name: pool, address: 'pool.test:{bport}'}}",
        top="resolve_interval: 0.5s\n",
    )
    prefix = private_hosts(hosts)

    def names() -> set[str]:
        return {b["name"] for b in api(admin, "/api/v1/backends")["backends"]}  # type: ignore[index]

    with processes() as procs:
        procs.append(start_backend("one", http=f"127.0.0.31:{bport}"))
        procs.append(start_backend("two", http=f"127.0.0.32:{bport}"))
        procs.append(start_l4lb(config, prefix=prefix))
        assert names() == {"pool-127.0.0.31", "pool-127.0.0.32"}
        by_net = {i: get(port, f"127.0.{i}.9") for i in range(1, 7)}
        assert set(by_net.values()) == {"one", "two"}  # rr over the two addresses
        hosts.write_text("127.0.0.1 localhost\n127.0.0.32 pool.test\n")  # .31 vanishes
        deadline = time.monotonic() + 5
        while names() != {"pool"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert names() == {"pool"}  # one address: the name's own (the same backend, renamed)
        # the vanished backend's clients move on their next connection; the others stay pinned
        assert {i: get(port, f"127.0.{i}.9") for i in range(1, 7)} == dict.fromkeys(by_net, "two")
        moved = sum(1 for who in by_net.values() if who == "one")
        assert repins(admin) == moved
        hosts.write_text("127.0.0.1 localhost\n127.0.0.32 pool.test\n127.0.0.31 pool.test\n")
        deadline = time.monotonic() + 5
        while len(names()) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert names() == {"pool-127.0.0.31", "pool-127.0.0.32"}  # scaled out again
        assert {i: get(port, f"127.0.{i}.9") for i in range(1, 7)} == dict.fromkeys(by_net, "two")
        assert repins(admin) == moved  # nobody moved: every client keeps its backend

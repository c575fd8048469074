"""Kernel firewall marks, in a network namespace this test creates: mangle rules written as for an
LVS fwmark service (80+443 -> mark 1, 25 -> mark 2), nat REDIRECT to l4lb's kernel_marks
listener, and l4lb's groups chosen by the marks. Needs root, ip and iptables (CI runs as root and
installs iptables); skipped with the reason elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import ROOT, processes, start_backend, start_l4lb

pytestmark = pytest.mark.e2e


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    for tool in ("ip", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (.ci/run installs it)"
    return None


if (reason := _why_not()) is not None:
    pytest.skip(reason, allow_module_level=True)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[tuple[str, ...]]:
    """A namespace of our own, with the firewall rules an LVS fwmark setup would have."""
    name = f"l4lbtest{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        ns = ("ip", "netns", "exec", name)
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1")
        mangle = (*ns, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1")
        sh(*mangle, "-m", "multiport", "--dports", "80,443", "-j", "MARK", "--set-mark", "1")
        sh(*mangle, "--dport", "25", "-j", "MARK", "--set-mark", "2")
        for mark in ("1", "2"):
            sh(
                *ns,
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                mark,
                "-j",
                "REDIRECT",
                "--to-ports",
                "9999",
            )
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


KEEPALIVED = """\
! An LVS fwmark setup: the mangle rules above set mark 1 on 80 and 443, mark 2 on 25.
virtual_server fwmark 1 {
  delay_loop 2
  lb_algo rr
  lb_kind NAT
  persistence_timeout 600
  protocol TCP
  real_server 127.0.0.2 {
    weight 1
  }
  real_server 127.0.0.3 {
    weight 1
  }
}
virtual_server fwmark 2 {
  lb_algo rr
  protocol TCP
  real_server 127.0.0.4 25 {
    weight 1
  }
}
"""


def test_marks_group_two_ports_into_one_sticky_group(
    tmp_path: Path, netns: tuple[str, ...]
) -> None:
    """The firewall rules and the keepalived.conf of an LVS fwmark service, imported unchanged:
    each client's HTTP (80) and HTTPS (443) reach one backend, mark 2 reaches the other group."""
    conf = tmp_path / "keepalived.conf"
    conf.write_text(KEEPALIVED)
    config = tmp_path / "l4lb.yaml"
    imported = subprocess.run(
        [
            sys.executable,
            "-m",
            "l4lb",
            "import-keepalived",
            str(conf),
            "--kernel-marks",
            "127.0.0.1:9999",
            "--fwmark-ports",
            "1=80,443",
            "--fwmark-ports",
            "2=25",
            "-o",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert imported.returncode == 0, imported.stderr

    def curl(src: str, port: int, scheme: str = "http") -> str:
        url = f"{scheme}://127.0.0.1:{port}/"
        argv = [*netns, "curl", "-sSk", "--max-time", "5", "--interface", src, url]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    with processes() as procs:
        for name, address in (("web1", "127.0.0.2"), ("web2", "127.0.0.3")):
            procs.append(
                start_backend(name, prefix=netns, http=f"{address}:80", https=f"{address}:443")
            )
        procs.append(start_backend("mail1", prefix=netns, http="127.0.0.4:25"))
        procs.append(start_l4lb(config, prefix=netns))
        seen = {}
        for i in range(1, 9):
            src = f"127.0.0.{20 + i}"
            names = {curl(src, 80), curl(src, 443, "https"), curl(src, 80), curl(src, 443, "https")}
            assert len(names) == 1, (src, names)
            seen[src] = names.pop()
        assert set(seen.values()) == {
            "web1",
            "web2",
        }  # rr spread the clients: marks chose the group
        assert curl("127.0.0.21", 25) == "mail1"  # mark 2: the other group


def test_without_the_sysctl_it_refuses_to_start_and_says_why(
    tmp_path: Path, netns: tuple[str, ...]
) -> None:
    sh(*netns, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=0")
    config = tmp_path / "l4lb.yaml"
    config.write_text(
        "kernel_marks: {listen: '127.0.0.1:9999'}\n"
        "groups:\n  web:\n    kernel_mark: 1\n    ports: [80]\n    backends: [{name: a, address: 127.0.0.2}]\n"
    )
    r = subprocess.run(
        [*netns, sys.executable, "-m", "l4lb", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert (
        "kernel_marks needs net.ipv4.tcp_fwmark_accept=1" in r.stderr
        and "Traceback" not in r.stderr
    )

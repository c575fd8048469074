"""The local-development mode: `l4lb run -l ... -b ...` serves a sticky group over two ports
with no file, `--print-config` round-trips through `l4lb check` and the loader, and a bad flag is
one line naming it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from l4lb.config import load_config, load_config_text
from tests.support.helpers import free_ports
from tests.support.procs import STARTUP, processes, start_backend, start_l4lb
from tests.support.procs import l4lb_cli as l4lb


def test_print_config_round_trips(tmp_path: Path) -> None:
    flags = ["run", "-l", "8080", "-l", "8443", "-b", "127.0.0.1:9001,9441", "-b", "localhost:9002"]
    out = l4lb(*flags, "--persistence", "5m/24", "--scheduler", "rr", "--print-config")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(out.stdout)
    check = l4lb("check", "-c", str(path))
    assert check.returncode == 0 and "ok (1 group, 2 backends)" in check.stdout
    (group,) = load_config(path).groups
    assert group == load_config_text(out.stdout).groups[0]
    assert (group.name, group.ports, group.listen, group.scheduler) == (
        "local",
        (8080, 8443),
        ("127.0.0.1",),
        "rr",
    )
    assert group.persistence.timeout == 300 and group.persistence.netmask == 0xFFFFFF00
    b1, b2 = group.backends
    assert (b1.name, b1.address) == ("b1", "127.0.0.1")
    assert dict(b1.ports) == {8080: 9001, 8443: 9441}
    # one port: the same offset for every -l port
    assert (b2.name, b2.address) == ("b2", "localhost")
    assert dict(b2.ports) == {8080: 9002, 8443: 9365}


def test_a_udp_port_is_a_flag_too() -> None:
    flags = ["run", "-l", "8443", "-l", "8443/udp", "-b", "127.0.0.1:9443", "--print-config"]
    out = l4lb(*flags)
    assert out.returncode == 0, out.stderr
    (group,) = load_config_text(out.stdout).groups
    assert (group.ports, group.udp_ports) == ((8443,), (8443,))
    (b,) = group.backends
    assert (dict(b.ports), dict(b.udp_ports)) == ({8443: 9443}, {8443: 9443})


BAD_FLAGS = [
    (["-l", "8080", "-b", "127.0.0.1"], "-b 127.0.0.1: expected HOST:PORT"),
    (["-l", "8080", "-l", "8443", "-b", "h:1,2,3"], "-b h:1,2,3: 3 ports for 2 -l ports"),
    (["-l", "99999", "-b", "h:1"], "-l 99999: the port must be from 1 to 65535"),
    (["-b", "h:1"], "needs at least one -l"),
    (["-l", "80", "-b", "h:1", "--persistence", "5x"], "--persistence 5x: expected"),
    (["-l", "80", "-b", "no_such!:1"], "-b no_such!:1: expected an IP address or a DNS name"),
    (["-l", "80", "-l", "80", "-b", "h:1"], "-l 80: port 80 is given twice"),
    (["-l", "53/udp", "-l", "53/UDP", "-b", "h:1"], "-l 53/UDP: port 53/udp is given twice"),
    (["-c", "x.yaml", "-l", "80", "-b", "h:1"], "-c FILE or the -l/-b flags, not both"),
    ([], "give -c FILE, or -l PORT and -b HOST:PORT"),
]


@pytest.mark.parametrize(("flags", "says"), BAD_FLAGS)
def test_a_bad_flag_is_one_line_saying_which(flags: list[str], says: str) -> None:
    out = l4lb("run", *flags)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize(("flags", "says"), BAD_FLAGS[:-1])
def test_print_config_of_a_bad_flag_exits_2_with_nothing_on_stdout(
    flags: list[str], says: str
) -> None:
    """docs/deployment.md: a bad flag is exit 2, also with --print-config (which exited 0
    with an empty YAML on stdout)."""
    out = l4lb("run", *flags, "--print-config")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_serves_a_sticky_group_over_two_ports_with_no_file() -> None:
    http, https, b1h, b1s, b2h, b2s = free_ports(6)
    with processes() as procs:
        procs.append(start_backend("one", http=f"127.0.0.1:{b1h}", https=f"127.0.0.1:{b1s}"))
        procs.append(start_backend("two", http=f"127.0.0.1:{b2h}", https=f"127.0.0.1:{b2s}"))
        lb = start_l4lb(
            Path("-"),
            *("-l", str(http), "-l", str(https)),
            *("-b", f"127.0.0.1:{b1h},{b1s}", "-b", f"127.0.0.1:{b2h},{b2s}"),
            *("--persistence", "5m/24", "--scheduler", "rr"),
            config_flag=False,
        )
        procs.append(lb)
        seen: dict[int, set[str]] = {}
        for net in range(8):
            for host in (1, 2):
                for url in (f"http://127.0.0.1:{http}/", f"https://127.0.0.1:{https}/"):
                    answer = subprocess.run(
                        [
                            "curl",
                            "-sk",
                            "--max-time",
                            "5",
                            "--interface",
                            f"127.0.{net}.{host}",
                            url,
                        ],
                        capture_output=True,
                        text=True,
                        timeout=10,
                    ).stdout.strip()
                    seen.setdefault(net, set()).add(answer)
        assert all(len(names) == 1 and names <= {"one", "two"} for names in seen.values()), seen
        assert set().union(*seen.values()) == {"one", "two"}  # rr spread the networks


def test_local_dev_changes_with_the_token_of_admin_token_file(tmp_path: Path) -> None:
    """Issue 25: `--admin PORT --admin-token-file FILE` (a FILE that does not exist is made with
    a new token, said once); `l4lb ctl --admin PORT` (or HOST:PORT) drains a backend with that
    token, and without it is refused."""
    port, admin, b1 = free_ports(3)
    token = tmp_path / "token"
    with processes() as procs:
        procs.append(start_backend("one", http=f"127.0.0.1:{b1}"))
        lb = start_l4lb(
            Path("-"),
            *("-l", str(port), "-b", f"127.0.0.1:{b1}"),
            *("--admin", str(admin), "--admin-token-file", str(token)),
            config_flag=False,
        )
        procs.append(lb)
        assert any("wrote a new admin token" in line for line in STARTUP[lb.pid])
        assert token.stat().st_mode & 0o077 == 0  # the owner's only
        refused = l4lb("ctl", "--admin", str(admin), "backend", "drain", "local", "b1")
        assert refused.returncode == 1 and "401" in refused.stderr
        drained = l4lb(
            "ctl",
            "--admin",
            str(admin),
            "--token-file",
            str(token),
            "backend",
            "drain",
            "local",
            "b1",
        )
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.strip() == "local/b1: state drain, weight 1"
        status = l4lb("ctl", "--admin", f"127.0.0.1:{admin}", "status")
        assert status.returncode == 0 and "drain" in status.stdout
        bad = l4lb("ctl", "--admin", "127.0.0.1", "status")
        assert bad.returncode == 2 and "expected a URL, HOST:PORT or PORT" in bad.stderr


def test_without_a_token_ctl_names_the_flag_that_gives_one() -> None:
    """Issue 33's paper cut: `l4lb ctl ... drain` against `run --admin` without a token said
    "set admin.token_file in the configuration", where there is none: the flag is
    --admin-token-file. And --print-config's header names every flag given."""
    port, admin, b1 = free_ports(3)
    flags = ("-l", str(port), "-b", f"127.0.0.1:{b1}", "--persistence", "5m/24")
    printed = l4lb("run", *flags, "--admin", str(admin), "--print-config")
    assert printed.stdout.splitlines()[0] == (
        f"# l4lb run -l {port} -b 127.0.0.1:{b1} --persistence 5m/24 --admin {admin}"
    )
    with processes() as procs:
        procs.append(start_backend("one", http=f"127.0.0.1:{b1}"))
        lb = start_l4lb(Path("-"), *flags, "--admin", str(admin), config_flag=False)
        procs.append(lb)
        refused = l4lb("ctl", "--admin", str(admin), "backend", "drain", "local", "b1")
        assert refused.returncode == 1 and "403" in refused.stderr
        assert "--admin-token-file" in refused.stderr, refused.stderr

"""`l4lb check` and `l4lb run` as a user runs them: the exit codes and the one-line errors."""

import subprocess
from pathlib import Path

from tests.support.procs import l4lb_cli
from tests.unit.test_config import ISSUE_EXAMPLE


def l4lb(*args: str) -> subprocess.CompletedProcess[str]:
    return l4lb_cli(*args, timeout=30)


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_EXAMPLE)
    r = l4lb("check", "-c", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("weight: 2", "weight: heavy"))
    for cmd in ("check", "run"):
        r = l4lb(cmd, "-c", str(bad))
        assert r.returncode == 1
        assert (
            r.stderr.strip()
            == f"{bad}:20: groups.web.backends[1].weight: expected an integer from 0 to 65535, got 'heavy'"
        )
        assert "Traceback" not in r.stderr


def test_run_refuses_a_port_it_cannot_bind(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"groups:\n  web:\n    listen: [127.0.0.1]\n    ports: [{port}]\n    backends: [{{name: a, address: 127.0.0.1, ports: {{{port}: 1}}}}]\n"
        )
        r = l4lb("run", "-c", str(cfg))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for group 'web': Address already in use" in r.stderr
    assert "Traceback" not in r.stderr

"""`make install` (issue 25): l4lb in a venv of its own, a link in BINDIR, the systemd unit and a
sample configuration, all under a scratch root here; `systemd-analyze verify` passes on the
installed unit (it failed on the shipped one: no install put an executable at its path), and
the installed l4lb checks the sample. A second install keeps an edited configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import ROOT

ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (make deps: systemd)")
def test_make_install_into_a_scratch_root_gives_a_unit_that_verifies(tmp_path: Path) -> None:
    paths = {
        "PREFIX": tmp_path / "opt/l4lb",
        "BINDIR": tmp_path / "usr/local/bin",
        "UNITDIR": tmp_path / "etc/systemd/system",
        "CONFDIR": tmp_path / "etc/l4lb",
    }
    argv = ["make", "-C", str(ROOT), "install", *(f"{k}={v}" for k, v in paths.items())]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    l4lb = paths["BINDIR"] / "l4lb"
    assert l4lb.is_symlink() and os.access(l4lb, os.X_OK)
    assert os.readlink(l4lb) == str(paths["PREFIX"] / "bin/l4lb")
    unit = paths["UNITDIR"] / "l4lb.service"
    text = unit.read_text()
    assert f"ExecStart={l4lb} run -c {paths['CONFDIR']}/l4lb.yaml" in text
    assert "LogsDirectory=l4lb" in text and "StateDirectory=l4lb" in text
    assert ANALYZE is not None
    verify = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    config = paths["CONFDIR"] / "l4lb.yaml"
    check = subprocess.run([str(l4lb), "check", "-c", str(config)], capture_output=True, text=True)
    assert check.returncode == 0 and "ok (1 group, 2 backends)" in check.stdout, check.stderr
    config.write_text(config.read_text().replace("30m", "10m"))
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "10m" in config.read_text()  # the operator's edit kept

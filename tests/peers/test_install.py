"""`make install` (issue 25): l4lb in a venv of its own, a link in BINDIR, the systemd unit and a
sample configuration, all under a scratch root here; `systemd-analyze verify` passes on the
installed unit (it failed on the shipped one: no install put an executable at its path), and
the installed l4lb checks the sample. A second install keeps an edited configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


HOST_PATHS = ("/opt/l4lb", "/usr/local/bin/l4lb", "/etc/systemd/system/l4lb.service", "/etc/l4lb")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: what a host's `make install` runs


def _stat_or_none(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming a dynamic uid (setpriv) needs root")
@pytest.mark.skipif(
    not os.path.exists(SYSTEM_PYTHON) or shutil.which("setpriv") is None,
    reason="needs Debian's python3 with venv and util-linux's setpriv (make deps)",
)
def test_make_install_honours_destdir_and_the_units_user_can_read_what_it_installs() -> None:
    """Issue 33: `make install DESTDIR=...` wrote into the live system; and the installed
    configuration was 0640 root:root, which the unit's DynamicUser cannot read, so its
    ExecStartPre (`l4lb check`) failed. Now a staged install writes nothing outside DESTDIR,
    and `l4lb check` of the installed configuration passes as a dynamic uid with no groups
    would run it, the token in a file that only that uid reads (as LoadCredential= gives it)."""
    before = {p: _stat_or_none(p) for p in HOST_PATHS}
    root = Path(tempfile.mkdtemp(prefix="l4lb-destdir-", dir="/tmp"))
    try:
        root.chmod(0o755)  # (as / is: the dynamic uid walks it)
        argv = ["make", "-C", str(ROOT), "install", f"DESTDIR={root}", f"PYTHON={SYSTEM_PYTHON}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert {p: _stat_or_none(p) for p in HOST_PATHS} == before  # nothing outside DESTDIR
        link = root / "usr/local/bin/l4lb"
        assert os.readlink(link) == "/opt/l4lb/bin/l4lb"  # where the package puts it
        script = (root / "opt/l4lb/bin/l4lb").read_text()
        assert script.startswith("#!/opt/l4lb/bin/python") and str(root) not in script
        unit = (root / "etc/systemd/system/l4lb.service").read_text()
        assert "ExecStartPre=/usr/local/bin/l4lb check -c /etc/l4lb/l4lb.yaml" in unit
        config = root / "etc/l4lb/l4lb.yaml"
        assert config.stat().st_mode & 0o777 == 0o644
        uid = 61234  # a uid no account has, as systemd's DynamicUser picks
        creds = root / "run/credentials/l4lb.service"
        creds.mkdir(parents=True)
        token = creds / "admin.token"
        token.write_text("dynamic-user-test-token-0123456789")
        os.chown(token, uid, uid)
        token.chmod(0o400)
        text = config.read_text().replace(
            "# token_file: /run/credentials/l4lb.service/admin.token", f"token_file: {token}"
        )
        assert f"token_file: {token}" in text
        config.write_text(text)
        as_unit = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        python = str(root / "opt/l4lb/bin/python")
        check = subprocess.run(
            [*as_unit, python, "-m", "l4lb", "check", "-c", str(config)],
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert check.returncode == 0 and "ok (1 group, 2 backends)" in check.stdout, (
            check.stdout + check.stderr
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for path, was in before.items():  # (what an install that ignored DESTDIR wrote)
            if was is None and os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)


def test_a_build_prints_no_setuptools_deprecation(tmp_path: Path) -> None:
    """Issue 33: setuptools warned that `license = { text = ... }` is deprecated and refused
    after 2027-02-18. A wheel of the source, built as pip builds it, says nothing of the kind."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "l4lb", src / "l4lb", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    said = built.stdout + built.stderr
    assert "deprecat" not in said.lower(), [x for x in said.splitlines() if "eprecat" in x]
    assert list((tmp_path / "dist").glob("l4lb-*.whl"))

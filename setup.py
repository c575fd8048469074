"""The compiled build (l4lb/native.py says what and why); everything else is in pyproject.toml.

    python setup.py -q native           # in place, for `make run` and `make test`: one line
    L4LB_COMPILE=1 pip wheel --no-build-isolation . -w dist    # a wheel with the .so files

Without L4LB_COMPILE=1 (a plain `pip install .`) nothing is compiled: pure Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, ClassVar

from setuptools import Command, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from l4lb import native  # noqa: E402  (the module list and the stamp, from the source tree)

LOG = ROOT / "build" / "native.log"


def extensions() -> list[Any]:
    from mypyc.build import mypycify

    paths = [str(native.source_of(m).relative_to(ROOT)) for m in native.COMPILED]
    return mypycify(paths, opt_level="3", group_name=native.GROUP, target_dir="build/mypyc")


class BuildExt(build_ext):
    """Writes the stamp once the extension modules are built, and only then."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        stamp = native.fingerprint()
        if self.inplace:
            native.STAMP.write_text(stamp)
        else:
            Path(self.build_lib, "l4lb", native.STAMP.name).write_text(stamp)


class Native(Command):
    """Build in place when the sources changed; one line says which build `make` runs."""

    description = "compile the hot path in place (mypyc), or say why it runs as pure Python"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        n = len(native.COMPILED)
        if os.environ.get("L4LB_PURE", "") not in ("", "0"):
            print("l4lb: pure Python (L4LB_PURE is set)")
            return
        if native.STAMP.exists() and native.STAMP.read_text() == native.fingerprint():
            print(f"l4lb: compiled hot path (mypyc, {n} modules), up to date")
            return
        missing = self.missing()
        if missing:
            print(f"l4lb: pure Python ({missing})")
            return
        native.STAMP.unlink(missing_ok=True)
        LOG.parent.mkdir(exist_ok=True)
        start = time.monotonic()
        with LOG.open("w") as log:
            env = {**os.environ, "L4LB_COMPILE": "1"}
            argv = [sys.executable, "setup.py", "build_ext", "--inplace"]
            done = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not native.STAMP.exists():
            for so in native.PACKAGE.rglob("*.so"):
                so.unlink()
            print(f"l4lb: pure Python (the compile failed: {LOG.relative_to(ROOT)})")
            return
        self.drop_strays()
        took = time.monotonic() - start
        print(f"l4lb: compiled hot path (mypyc, {n} modules) in {took:.0f} s")

    @staticmethod
    def drop_strays() -> None:
        """An extension module of a module no longer in COMPILED would still be imported (the
        stamp guards only the listed ones): gone."""
        keep = {native.source_of(m).with_suffix("") for m in native.COMPILED}
        for so in native.PACKAGE.rglob("*.so"):
            stem = so.with_name(so.name.split(".", 1)[0])
            if stem not in keep and not so.name.startswith("native__mypyc"):
                so.unlink()

    @staticmethod
    def missing() -> str:
        """What the compile needs and this machine lacks, or ''."""
        cc = sysconfig.get_config_var("CC") or "cc"
        if shutil.which(cc.split()[0]) is None:
            return f"no C compiler: {cc.split()[0]}"
        include = Path(sysconfig.get_paths()["include"], "Python.h")
        if not include.exists():
            return f"no Python headers: {include}"
        try:
            import mypyc  # noqa: F401
        except ImportError:
            return "no mypyc: pip install mypy"
        return ""


if __name__ == "__main__":  # (as setuptools' build backend runs it too)
    compile_ = os.environ.get("L4LB_COMPILE") == "1"
    setup(
        ext_modules=extensions() if compile_ else [],
        cmdclass={"build_ext": BuildExt, "native": Native},
    )

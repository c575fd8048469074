"""Which build runs: the compiled hot path (mypyc) or pure Python, from one source.

Theory of operation. `python -m l4lb.native build` (run by `make run` and `make test`) compiles
the modules in COMPILED with mypyc (setup.py, L4LB_COMPILE=1) into extension modules beside
their sources, and writes STAMP: the sha256 of each source. Python prefers an extension module
to the .py of the same name, so a build older than its sources would run old code. At import of
`l4lb` (select(), once), the stamp is checked against the sources; when it does not match (an
edited source, a half build) or when L4LB_PURE=1 is set, a finder is put first on sys.meta_path
that loads each compiled module from its source. All or none: compiled modules call each
other's native classes directly, so a mix would hold two classes of one name.

A machine without a C compiler or Python's headers runs the same code as pure Python, and the
build says so in one line; `l4lb --version` says which runs.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The hot path: every connection's and every datagram's code (docs/performance.md). The admin,
# config and runtime layers run once a reload or a request, and stay bytecode.
COMPILED = (
    "l4lb.core.keys",
    "l4lb.core.affinity",
    "l4lb.core.backends",
    "l4lb.core.schedulers",
    "l4lb.core.routing",
    "l4lb.core.limits",
    "l4lb.core.histogram",
    "l4lb.core.connection",
    "l4lb.core.route",
    "l4lb.core.accounting",
    "l4lb.core.states",
    "l4lb.core.quicroute",
    "l4lb.core.spec",
    "l4lb.core.health",
    "l4lb.core.throttle",
    "l4lb.core.flowstats",
    "l4lb.core.proxyproto",
    "l4lb.core.quiclb",
    "l4lb.dataplane.context",
    "l4lb.dataplane.dialer",
    "l4lb.dataplane.path",
    "l4lb.dataplane.relay",
    "l4lb.dataplane.udp",
    "l4lb.dataplane.accesslog",
)
PACKAGE = Path(__file__).resolve().parent
STAMP = PACKAGE / "native.stamp"
GROUP = "l4lb.native"  # the shared library: l4lb/native__mypyc.*.so

_state: dict[str, str] = {}


def source_of(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")


def fingerprint() -> str:
    """One line per compiled module: its name and its source's sha256."""
    lines = []
    for module in COMPILED:
        digest = hashlib.sha256(source_of(module).read_bytes()).hexdigest()
        lines.append(f"{module} {digest}\n")
    return "".join(lines)


class _SourceFinder:
    """Loads the compiled modules from their .py sources (the pure build). A meta path finder
    needs only `find_spec`; subclassing importlib.abc's would load importlib.resources, tempfile,
    bz2 and lzma: about 1 MiB of RSS, for nothing."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def _built() -> str | None:
    """None when the build matches the sources, else why it is not used."""
    try:
        stamp = STAMP.read_text()
    except OSError:
        return "not built"
    try:
        current = fingerprint()
    except OSError as exc:
        return f"sources unreadable: {exc}"
    if stamp != current:
        changed = sorted(set(current.splitlines()) - set(stamp.splitlines()))
        name = changed[0].split()[0] if changed else "the module list"
        return f"build is stale: {name} changed since"
    return None


def select() -> None:
    """Choose the build, once, before any compiled module is imported."""
    if _state:
        return
    if os.environ.get("L4LB_PURE", "") not in ("", "0"):
        why: str | None = "L4LB_PURE is set"
    else:
        why = _built()
    if why is None:
        _state["build"] = "compiled"
    else:
        _state["build"] = "pure"
        _state["why"] = why
        if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceFinder())


def describe() -> str:
    """One line: which build runs and, for pure Python, why."""
    select()
    if _state["build"] == "compiled":
        import l4lb.core.affinity as probe

        if Path(probe.__file__ or "").suffix == ".so":
            return f"compiled (mypyc, {len(COMPILED)} modules)"
        return "pure Python (the stamp matches but no extension module loads)"
    return f"pure Python ({_state['why']})"


def is_compiled() -> bool:
    return describe().startswith("compiled")

"""contrib/'s example programs, imported by the tests that run them (they are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quic_lb_server = _load("quic_lb_server", CONTRIB / "quic-lb" / "server.py")

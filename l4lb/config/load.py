"""Configuration: YAML in, frozen dataclasses out; each error is one line: file, line, field path.

The loader composes the YAML into nodes (which carry line numbers) and validates the node tree
directly, so an error can always name the line it comes from. Unknown keys, duplicate keys and
wrong types are errors; all errors of a file are reported, not only the first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..core.spec import AdminSpec, Config
from .compose import _compose
from .document import _admin, _document
from .files import read_text
from .validator import ConfigError, _Validator


def load_config_text(
    text: str, source: str = "<memory>", files: Mapping[str, bytes] | None = None
) -> Config:
    """`files`: the bytes of the files the text names, as a supervisor read them (a worker's
    load reads none of them from disk); None: read from disk."""
    v = _Validator(source, files)
    root = _compose(text, source)
    if root is None:
        raise ConfigError([f"{source}:1: the file is empty; it needs a 'groups' mapping"])
    config = _document(v, root)
    if config is None:
        raise ConfigError(v.errors or [f"{source}:1: invalid configuration"])
    return config


def load_admin_section(path: str | Path) -> AdminSpec | None:
    """Only the `admin` section of a file, validated as `load_config` would."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the file: {_why(exc)}"]) from None
    root = _compose(text, str(path))
    v = _Validator(str(path))
    m = v.mapping(root, "", ()) if root is not None else None
    admin = _admin(v, m["admin"][1], "admin") if m and "admin" in m else None
    if v.errors:
        raise ConfigError(v.errors)
    return admin


def load_config(path: str | Path) -> Config:
    """Blocking (the file, and the files it names): on an event loop, run it in a thread."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the file: {_why(exc)}"]) from None
    return load_config_text(text, str(path))


def _why(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return exc.strerror or str(exc)

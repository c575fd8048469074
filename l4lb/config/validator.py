"""The validator's machinery: errors collected as one line each (file, line, field path), and the
helpers that check a mapping's keys and read its scalars."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from .files import read_file

NAMED_LIMIT = 4096  # bytes of a file the configuration names (a token, a QUIC-LB key)


class ConfigError(Exception):
    """A configuration that cannot be used; `lines` are ready to print, one per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


T = TypeVar("T")


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def _one_line(text: str) -> str:
    """A key or value may hold a newline or another control character: escaped, so that an
    error stays one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Invalid(Exception):
    """Raised inside a field check; turned into one error line by `_Validator.field`."""


class _Validator:
    def __init__(self, source: str, given: Mapping[str, bytes] | None = None) -> None:
        self.source = source
        # Files named by the configuration: as given (a worker's, from its supervisor), else
        # read from disk; either way remembered in `files`, the bytes the configuration used.
        self.given = given
        self.files: dict[str, bytes] = {}
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.nodes: dict[str, yaml.Node] = {}  # backends' nodes by path, for later checks

    def read(self, file: str) -> bytes:
        """The bytes of a file the configuration names, a secret of a few octets (a token, a
        key: NAMED_LIMIT at most); OSError as `files.read_file` raises it."""
        data = self.given.get(file) if self.given is not None else None
        if data is None:
            data = read_file(file, NAMED_LIMIT)
        self.files[file] = data
        return data

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        self.errors.append(_one_line(f"{self.source}:{line}: {where}{message}"))

    def warn(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.warnings.append(_one_line(f"{self.source}:{line}: {path}: warning: {message}"))

    def mapping(
        self, node: yaml.Node, path: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Key -> (key node, value node); reports non-mappings, unknown and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, "expected a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.error(knode, path, "keys must be plain strings")
            elif key in out:
                self.error(knode, sub, "duplicate key")
            elif allowed and key not in allowed:
                self.error(knode, sub, f"unknown key (expected one of: {', '.join(allowed)})")
            else:
                out[key] = (knode, vnode)
        return out

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, "expected a list")
            return None
        return list(node.value)

    def field(
        self,
        node: yaml.Node,
        path: str,
        check: Callable[[Any], T],
    ) -> T | None:
        """Run `check` on the scalar value of `node`; a ValueError becomes an error line."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, "expected a single value")
            return None
        try:
            value = _scalar(node)
        except Exception:  # a malformed !!binary or !!timestamp, say
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.error(node, path, f"cannot read {node.value!r} as {tag}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            # YAML's .nan and .inf: no key takes them (a NaN timeout turns persistence off
            # silently, and the API could not say it as JSON)
            self.error(node, path, f"{node.value} is not a finite number")
            return None
        try:
            return check(value)
        except (ValueError, _Invalid) as exc:
            self.error(node, path, str(exc))
            return None


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode) -> Any:
    return _constructor.construct_object(node)


def _scalars(
    v: _Validator,
    m: dict[str, tuple[yaml.Node, yaml.Node]],
    path: str,
    checks: dict[str, Callable[[Any], Any]],
    kw: dict[str, Any],
) -> bool:
    """Check each present key of `checks` into `kw`; False if any was invalid."""
    ok = True
    for key, check in checks.items():
        if key in m:
            value = v.field(m[key][1], f"{path}.{key}" if path else key, check)
            if value is None:
                ok = False
            else:
                kw[key] = value
    return ok


def _list_of(
    v: _Validator, node: yaml.Node, path: str, check: Callable[[Any], T]
) -> list[T] | None:
    """A list (or a single value, taken as a list of one) checked item by item."""
    if isinstance(node, yaml.ScalarNode):
        one = v.field(node, path, check)
        return None if one is None else [one]
    items = v.sequence(node, path)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        value = v.field(item, f"{path}[{i}]", check)
        if value is None:
            return None
        out.append(value)
    if not out:
        v.error(node, path, "must not be empty")
        return None
    return out

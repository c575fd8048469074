"""What changed between two configurations, field by field: a reload's report, and a router's
(`Router.reconfigure`) account of its group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bytes):  # a key: said to have changed, never shown
        return f"({len(value)} octets)"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def changes(old: object, new: object, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between two configuration dataclasses, field by field ("scheduler wlc ->
    rr", "persistence.timeout 300 -> 600"), nested ones by their own fields."""
    out: list[str] = []
    for f in fields(old):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if is_dataclass(a) and is_dataclass(b) and type(a) is type(b):
            out += changes(a, b, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name} {_shown(a)} -> {_shown(b)}")
    return out

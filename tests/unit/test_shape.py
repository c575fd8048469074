"""The shape issue 34 asks of the code, read from its syntax tree where import-linter cannot
say it (make lint checks the imports): no call passes a run of bare True/False/None by
position (`router.end(route, None, n, 0, None, True, ...)` was one: a reader cannot tell what
each stands for)."""

from __future__ import annotations

import ast
from pathlib import Path

import l4lb

SOURCE = Path(l4lb.__file__).resolve().parent


def _flag(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool))


def test_no_call_passes_a_run_of_bare_flags_by_position() -> None:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            run = 0
            for arg in node.args:
                run = run + 1 if _flag(arg) else 0
                if run >= 2:
                    found.append(f"{path.relative_to(SOURCE.parent)}:{node.lineno}")
                    break
    assert found == [], found


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    out = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((f"{path.relative_to(SOURCE.parent)}:{node.lineno}", node))
    return out


def test_no_function_is_over_80_lines_or_takes_over_six_positional_parameters() -> None:
    """Issue 34's size rules (dial was 95 lines of 9 parameters; Router.end took 11)."""
    long = [
        f"{where} {f.name}: {f.end_lineno - f.lineno + 1} lines"
        for where, f in _functions()
        if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > 80
    ]
    many = [
        f"{where} {f.name}: {n} positional"
        for where, f in _functions()
        if (n := len([a for a in f.args.posonlyargs + f.args.args if a.arg not in ("self", "cls")]))
        > 6
    ]
    assert long == [] and many == [], long + many

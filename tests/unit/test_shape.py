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


ROUTER_MODULES = {"core/routing.py", "core/route.py", "core/quicroute.py"}
# A route's fields; `backend`, `entry` and `key` are common names, so those count only when
# written through something called `route` (`route.backend = ...`, `flow.route.key = ...`).
ROUTE_ONLY = {"fresh", "pinned", "queued", "reason", "shared", "steered", "wait_for", "tried"}
ROUTE_COMMON = {"backend", "entry", "key"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(SOURCE)), ast.parse(path.read_text(), str(path)))
        for path in sorted(SOURCE.rglob("*.py"))
    ]


def _through_route(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "route") or (
        isinstance(node, ast.Attribute) and node.attr == "route"
    )


def test_a_route_is_written_only_by_the_router() -> None:
    """Issue 34: `Route`'s fields change only through `Router` methods (the router's modules),
    so that its invariants (the entry, the pin, the backends' slots) are kept in one place."""
    found = []
    for name, tree in _modules():
        if name in ROUTER_MODULES:
            continue
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if not isinstance(sub, ast.Attribute):
                        continue
                    own = isinstance(sub.value, ast.Name) and sub.value.id == "self"
                    if (sub.attr in ROUTE_ONLY and not own) or (
                        sub.attr in ROUTE_COMMON | ROUTE_ONLY and _through_route(sub.value)
                    ):
                        found.append(f"{name}:{node.lineno} .{sub.attr}")
    assert found == [], found


def test_the_router_entry_points_are_called_from_one_data_plane_module() -> None:
    """TCP and UDP admit and choose through dataplane/path.py: no other module of the data
    plane calls `begin`, `next_backend`, `connected` or `failed`."""
    entry_points = {"begin", "next_backend", "connected", "failed"}
    found = [
        f"{name}:{node.lineno} {node.func.attr}"
        for name, tree in _modules()
        if name.startswith("dataplane/") and name != "dataplane/path.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in entry_points
    ]
    assert found == [], found


def _tuple_size(node: ast.expr | None, aliases: dict[str, int]) -> int:
    """The number of elements of a `tuple[...]` annotation (or an alias of one); 0 if none."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, 0)
    if isinstance(node, ast.BinOp):  # X | None
        return max(_tuple_size(node.left, aliases), _tuple_size(node.right, aliases))
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "tuple"
    ):
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if any(isinstance(e, ast.Constant) and e.value is Ellipsis for e in elts):
            return 0
        return len(elts)
    return 0


def test_no_function_returns_a_tuple_of_five_or_more() -> None:
    """A result of five or more parts is a named outcome (a class), not a tuple whose places a
    reader must count (`dial` returned five, `Routed` was nine)."""
    found = []
    for name, tree in _modules():
        aliases = {
            t.id: size
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name) and (size := _tuple_size(node.value, {}))
        }
        found += [
            f"{name}:{node.lineno} {node.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and _tuple_size(node.returns, aliases) >= 5
        ]
    assert found == [], found


def test_the_router_is_split_no_class_of_it_over_400_lines_and_router_under_300() -> None:
    """Issue 34: the router by concern, a module each (the decision and pins, states and
    events, accounting, QUIC-LB, reconfigure, the route)."""
    router = {
        "core/routing.py",
        "core/route.py",
        "core/states.py",
        "core/accounting.py",
        "core/quicroute.py",
        "core/reconfigure.py",
    }
    sizes = {
        f"{name}:{node.name}": node.end_lineno - node.lineno + 1
        for name, tree in _modules()
        if name in router
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None
    }
    assert {k: n for k, n in sizes.items() if n > 400} == {}
    assert sizes["core/routing.py:Router"] < 300

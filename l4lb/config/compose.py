"""YAML to a node tree that keeps line numbers, refusing tags and constructs a configuration has
no use for (so no error can come from PyYAML without a line)."""

from __future__ import annotations

import yaml

from .validator import ConfigError, _one_line

# The tags SafeLoader resolves by itself: anything else (`!custom`, `!!python/object:...`) is
# refused by name rather than left to the constructor, which raises on it.
_KNOWN_TAGS = frozenset(t for t in yaml.SafeLoader.yaml_constructors if t is not None)


def _first_unknown_tag(root: yaml.Node) -> yaml.Node | None:
    """The first node (in document order) whose tag YAML's safe schema does not know. Walked
    with a stack and a set of seen nodes: aliases make the tree a graph, and a deep one must
    not exhaust the recursion limit."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in _KNOWN_TAGS:
            return node
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


def _compose(text: str, source: str) -> yaml.Node | None:
    """The node tree of `text`; every YAML problem is one line naming its own line."""

    def refuse(line: int, what: str) -> ConfigError:
        return ConfigError([_one_line(f"{source}:{line}: invalid YAML: {' '.join(what.split())}")])

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise refuse(
            mark.line + 1 if mark is not None else 1,
            str(exc.problem or exc.context or "not valid YAML"),
        ) from None
    except yaml.reader.ReaderError as exc:  # a control character, say: it knows its offset
        char = exc.character
        what = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        line = text.count("\n", 0, max(0, exc.position)) + 1
        raise refuse(line, f"character {what} is not allowed ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise refuse(1, str(exc)) from None
    except RecursionError:
        raise refuse(1, "nested too deeply") from None
    if root is not None:
        bad = _first_unknown_tag(root)
        if bad is not None:
            raise refuse(
                bad.start_mark.line + 1,
                f"unknown tag {bad.tag!r} (l4lb reads plain YAML: strings, numbers, booleans,"
                " lists, mappings)",
            )
    return root

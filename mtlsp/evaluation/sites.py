"""Cross-file call sites of a Python repository, found with the parser (CrossCodeEval's construction).

A *site* is a call whose callee (a plain name, or the last name of an attribute chain) is a
function, method or class defined in *another* file of the repository and nowhere in the
calling file: completing it needs knowledge the file itself does not hold, which is what the
memory is for.  The line is cut at the start of the callee's name; the rest of the line is the
target.  Builtin names and dunders are left out, and so are names shorter than three
characters, which are too often shared by unrelated definitions.
"""

from __future__ import annotations

import builtins
import random
from collections import defaultdict
from dataclasses import dataclass

from tree_sitter import Node

from ..languages import parser_for

_BUILTINS = set(dir(builtins)).union(*(dir(t) for t in (dict, list, str, bytes, set, tuple, int, object)))


@dataclass(frozen=True)
class Site:
    path: str  # repository-relative, '/'-separated
    offset: int  # character offset of the callee's name in the file's text
    line: int  # 0-based line of the call
    column: int  # character column of the callee's name
    name: str  # the callee's name
    target: str  # the rest of the line from the name on, trailing whitespace stripped
    defined_in: tuple[str, ...]  # the other files that define ``name``


def _walk(node: Node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children))


def definitions(data: bytes, path: str = "x.py") -> set[str]:
    """Names of the functions, methods and classes a Python file defines, at any depth."""
    parser = parser_for(path)
    if parser is None:
        return set()
    tree = parser.parse(data)
    names = set()
    for n in _walk(tree.root_node):
        if n.type in ("function_definition", "class_definition"):
            name = n.child_by_field_name("name")
            if name is not None:
                names.add(name.text.decode("utf-8", "replace"))
    return names


def calls(data: bytes, path: str = "x.py") -> list[tuple[int, str]]:
    """(byte offset of the callee name, name) for every call in a Python file."""
    parser = parser_for(path)
    if parser is None:
        return []
    tree = parser.parse(data)
    found = []
    for n in _walk(tree.root_node):
        if n.type != "call":
            continue
        fn = n.child_by_field_name("function")
        if fn is not None and fn.type == "attribute":
            fn = fn.child_by_field_name("attribute")
        if fn is not None and fn.type == "identifier":
            found.append((fn.start_byte, fn.text.decode("utf-8", "replace")))
    return found


def _wanted(name: str) -> bool:
    return len(name) >= 3 and name not in _BUILTINS and not (name.startswith("__") and name.endswith("__"))


def find_sites(sources: dict[str, str]) -> list[Site]:
    """Every cross-file call site in ``sources`` (relative path -> text), in path order."""
    encoded = {p: t.encode("utf-8") for p, t in sources.items()}
    defined: dict[str, set[str]] = {p: definitions(d, p) for p, d in encoded.items()}
    where: dict[str, set[str]] = defaultdict(set)
    for p, names in defined.items():
        for name in names:
            where[name].add(p)
    sites = []
    for p in sorted(sources):
        data, text = encoded[p], sources[p]
        for start, name in sorted(calls(data, p)):
            others = where.get(name, set()) - {p}
            if not others or name in defined[p] or not _wanted(name):
                continue
            offset = len(data[:start].decode("utf-8", "replace"))
            line_start = text.rfind("\n", 0, offset) + 1
            line_end = text.find("\n", offset)
            line_end = len(text) if line_end < 0 else line_end
            sites.append(Site(
                path=p,
                offset=offset,
                line=text.count("\n", 0, offset),
                column=offset - line_start,
                name=name,
                target=text[offset:line_end].rstrip(),
                defined_in=tuple(sorted(others)),
            ))
    return sites


def sample(sites: list[Site], limit: int | None, seed: int) -> list[Site]:
    """A reproducible sample of at most ``limit`` sites (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(sites):
        return list(sites)
    picked = random.Random(seed).sample(range(len(sites)), limit)
    return [sites[i] for i in sorted(picked)]


def cut(text: str, site: Site, typed: int) -> tuple[str, int]:
    """The file as the user has it at the site: the line cut ``typed`` characters into the
    callee's name, everything after the line kept.  Returns (text, cursor)."""
    line_end = text.find("\n", site.offset)
    line_end = len(text) if line_end < 0 else line_end
    cursor = site.offset + typed
    return text[:cursor] + text[line_end:], cursor

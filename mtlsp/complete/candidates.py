"""The names a completion may offer: identifiers that exist, from every source that knows some.

A 135M-parameter model spells a name it has seen only in its memory approximately
(``calculate_total_with_vat`` for ``compute_invoice_total_with_vat``).  So the popup and the
identifier at the start of ghost text are chosen among names that exist, and the model's job
is to rank them (``rank.py``).  The sources, in the order they are merged:

- Python's static analysis (jedi) at the cursor, where it is installed and the file is Python;
- the names defined in the memory's chunks (tree-sitter, kept with each chunk in the store);
- the names defined in open buffers, read from their current text, so a function typed a moment
  ago in another file is a candidate before the memory has even been updated;
- the identifiers of the current file;
- the language's builtins and keywords (Python).
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PYTHON = frozenset(dir(builtins)) | frozenset(keyword.kwlist)
_DEFINING = re.compile(r"\b(def|class|function|func|fn|struct|interface|type)\s+\w*\Z")


@dataclass(frozen=True)
class Sources:
    """Where candidate names come from, for one workspace folder."""

    names: Callable[[], Iterable[str]]  # the memory's chunks and the open buffers
    static: Callable[[str, str, int], list[str]] | None = None  # (path, text, cursor) -> jedi's names


def identifier_position(line_before: str, typed: str) -> bool:
    """Whether the cursor is where an existing name is expected: inside a word, or right after
    ``x.``; not where a new name is being defined (``def |``)."""
    head = line_before[: len(line_before) - len(typed)]
    if _DEFINING.search(line_before):
        return False
    return bool(typed) or head.endswith(".")


def pool(path: str, text: str, cursor: int, typed: str, sources: Sources | None, limit: int = 4000) -> list[str]:
    """Existing names that complete ``typed`` (longer than it), best-informed sources first.
    After ``x.`` the language's builtins and keywords are left out: they are not attributes."""
    out: dict[str, None] = {}

    def add(names: Iterable[str]) -> None:
        for n in names:
            if len(out) >= limit:
                return
            if n.startswith(typed) and n != typed and n not in out and IDENTIFIER.fullmatch(n):
                out[n] = None

    if sources is not None and sources.static is not None and path.endswith((".py", ".pyi")):
        add(sources.static(path, text, cursor))
    if sources is not None:
        add(sources.names())
    word_start = cursor - len(typed)
    add(m.group(0) for m in IDENTIFIER.finditer(text) if not m.start() <= word_start <= m.end())
    attribute = text[:word_start].endswith(".")
    if path.endswith((".py", ".pyi")) and not attribute:
        add(sorted(_PYTHON))
    return list(out)

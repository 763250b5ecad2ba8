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

After ``alias.`` where ``alias`` is a Python module of the workspace (bound by an import in the
current file), the candidates are that module's top-level names only, read from its open buffer
if it has one, else from disk: jedi does the same for saved files, but a function typed a moment
ago in the module's unsaved buffer is also an attribute, and nothing else is.  The names an edit
added to that module a moment ago (``Indexer.gained``) are listed first: the model has never
seen them after ``module.`` and finds them far less likely than the module's older names.
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import NamedTuple

from ..index.chunks import defined_names

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PYTHON = frozenset(dir(builtins)) | frozenset(keyword.kwlist)
_DEFINING = re.compile(r"\b(def|class|function|func|fn|struct|interface|type)\s+\w*\Z")
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#;]+)", re.M)
_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)", re.M)
_CHAIN = re.compile(r"([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)\.\Z")
_ALIAS = re.compile(r"([\w.]+)(?:\s+as\s+(\w+))?")
_PACKAGE_ROOTS = ("", "src")  # where absolute imports of a workspace's own packages start


def module_aliases(text: str) -> dict[str, str]:
    """Names the imports of a Python file bind to modules: ``import a.b`` binds ``a`` → ``a``,
    ``import a.b as x`` binds ``x`` → ``a.b``, ``from .p import m`` binds ``m`` → ``.p.m`` (which
    may turn out not to be a module; resolution decides)."""
    out: dict[str, str] = {}
    for m in _IMPORT.finditer(text):
        for part in m.group(1).split(","):
            a = _ALIAS.fullmatch(part.strip())
            if a:
                out[a.group(2) or a.group(1).split(".")[0]] = a.group(1) if a.group(2) else a.group(1).split(".")[0]
    for m in _FROM.finditer(text):
        origin = m.group(1)
        for part in m.group(2).strip("() \t\n").split(","):
            a = _ALIAS.fullmatch(part.strip())
            if a and "." not in a.group(1):
                sep = "" if origin.endswith(".") else "."
                out[a.group(2) or a.group(1)] = f"{origin}{sep}{a.group(1)}"
    return out


def module_files(importer: str, dotted: str) -> list[str]:
    """Workspace-relative files that may hold module ``dotted`` imported from file ``importer``
    (``.x`` is relative to the importer's package), most likely first."""
    level = len(dotted) - len(dotted.lstrip("."))
    parts = [p for p in dotted[level:].split(".") if p]
    if level:
        base = PurePosixPath(importer).parent
        for _ in range(level - 1):
            base = base.parent
        bases = [base]
    else:
        bases = [PurePosixPath(r) for r in _PACKAGE_ROOTS]
    out = []
    for b in bases:
        stem = b.joinpath(*parts) if parts else b
        out += [f"{stem}.py", f"{stem / '__init__.py'}"] if parts else [f"{stem / '__init__.py'}"]
    return [o[2:] if o.startswith("./") else o for o in out]


class Module(NamedTuple):
    names: list[str]  # its top-level names, then what it imports
    gained: Collection[str]  # the names an edit added a moment ago


@dataclass
class ModuleNames:
    """Top-level names of the workspace's Python modules, as their current text defines them.

    ``read(rel)`` returns a file's current text (its open buffer, else disk; None if absent);
    ``gained(rel)`` the names an edit added to it a moment ago (``Indexer.gained``).  Names are
    kept per text, so keystrokes in another file cost a dictionary lookup."""

    read: Callable[[str], str | None]
    gained: Callable[[str], Collection[str]] | None = None
    _cache: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def __call__(self, importer: str, dotted: str) -> Module | None:
        for rel in module_files(importer, dotted):
            text = self.read(rel)
            if text is None:
                continue
            cached = self._cache.get(rel)
            if cached is None or cached[0] != text:
                names = [n for _, n in defined_names(rel, text.encode("utf-8"), depth=0)]
                names += module_aliases(text)  # what it imports is an attribute too
                cached = self._cache[rel] = (text, names)
            return Module(cached[1], self.gained(rel) if self.gained is not None else ())
        return None


def attribute_module(path: str, text: str, word_start: int, modules: ModuleNames | None) -> Module | None:
    """The names of the workspace module before ``alias.`` at ``word_start``, or None where the
    expression is not one (``self.``, a library module, a file that is not Python)."""
    if modules is None or not path.endswith((".py", ".pyi")):
        return None
    line_start = text.rfind("\n", 0, word_start) + 1
    chain = _CHAIN.search(text[line_start:word_start])
    if chain is None:
        return None
    head, _, rest = chain.group(1).partition(".")
    target = module_aliases(text).get(head)
    if target is None:
        return None
    dotted = f"{target}.{rest}" if rest else target
    return modules(path, dotted)


@dataclass(frozen=True)
class Sources:
    """Where candidate names come from, for one workspace folder."""

    names: Callable[[], Iterable[str]]  # the memory's chunks and the open buffers
    static: Callable[[str, str, int], list[str]] | None = None  # (path, text, cursor) -> jedi's names
    modules: ModuleNames | None = None  # the workspace's Python modules, for ``alias.``


def word_byte(byte: int) -> bool:
    """Whether a byte of UTF-8 text continues an ASCII identifier (letter, digit, underscore)."""
    return byte < 0x80 and (chr(byte).isalnum() or byte == ord("_"))


def defining(line_before: str) -> bool:
    """Whether the word at the end of ``line_before`` is a name being defined (``def |``)."""
    return _DEFINING.search(line_before) is not None


def identifier_position(line_before: str, typed: str) -> bool:
    """Whether the cursor is where an existing name is expected: inside a word, or right after
    ``x.``; not where a new name is being defined (``def |``)."""
    head = line_before[: len(line_before) - len(typed)]
    if defining(line_before):
        return False
    return bool(typed) or head.endswith(".")


def _folded(name: str) -> str:
    return name.replace("_", "").lower()


def _one_edit(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with one character replaced, inserted or deleted."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i + (len(a) == len(b)) :] == b[i + 1 :]


def respellings(word: str, path: str, text: str, sources: Sources | None, *, long: int = 8) -> list[str]:
    """The existing names that ``word`` misspells, where ``word`` names nothing; else [].

    Ghost text writes a bare name the model has not read exactly (``_collect_errors()`` for the
    ``_CollectErrors()`` that the file imports): called or dereferenced, a name that the file,
    the memory, the open buffers and the language's builtins all lack is a ``NameError`` to be.
    Its respellings are the existing names equal to it but for case and underscores, or, for
    names of ``long`` letters or more, one letter apart; shorter names, or anything looser,
    would turn a variable the line is about to bind (``record`` in a comprehension) into
    another one (``records``).  Python only: what counts as bound is Python's."""
    if not path.endswith((".py", ".pyi")) or not IDENTIFIER.fullmatch(word) or word in _PYTHON:
        return []
    known = {m.group(0) for m in IDENTIFIER.finditer(text)}
    if sources is not None:
        known.update(sources.names())
    if word in known:
        return []
    key = _folded(word)
    return sorted(n for n in known if (f := _folded(n)) == key or (
        len(key) >= long and f[:1] == key[:1] and _one_edit(f, key)))


class Names(list):
    """Candidate names, best-informed sources first.  ``closed``: they are all there can be (the
    attributes of a workspace module), so the best of them may be taken however unlikely the
    model finds it.  ``first``: those an edit added to that module a moment ago, which go
    before the others whatever the model thinks of them.  ``bound``: those static analysis
    lists at the cursor (empty where it found none of them): the others are names it cannot see
    there, an attribute the object lacks or a name no import binds."""

    closed: bool = False
    first: frozenset[str] = frozenset()
    bound: frozenset[str] = frozenset()


def pool(path: str, text: str, cursor: int, typed: str, sources: Sources | None, limit: int = 4000,
         exact: bool = False) -> Names:
    """Existing names that complete ``typed`` (longer than it; ``typed`` itself too where it is
    a name that exists and ``exact``), best-informed sources first.
    After ``x.`` the language's builtins and keywords are left out: they are not attributes (a
    Python keyword never is: ``x.from`` does not parse, though the file's own words hold it);
    after ``module.`` (a workspace module) only static analysis and the module's own names count."""
    out: dict[str, None] = {}
    python = path.endswith((".py", ".pyi"))
    word_start = cursor - len(typed)
    attribute = text[:word_start].endswith(".")

    def add(names: Iterable[str]) -> None:
        for n in names:
            if len(out) >= limit:
                return
            if n.startswith(typed) and (exact or n != typed) and n not in out and IDENTIFIER.fullmatch(n) and not (
                    attribute and python and keyword.iskeyword(n)):
                out[n] = None

    if sources is not None and sources.static is not None and python:
        add(sources.static(path, text, cursor))
    bound = frozenset(out)
    module = attribute_module(path, text, word_start, sources.modules if sources is not None else None)
    if module is not None:
        add(module.names)
        names = Names(out)
        names.closed = True
        names.first = frozenset(n for n in module.gained if n in out)
        return names
    if sources is not None:
        add(sources.names())
    add(m.group(0) for m in IDENTIFIER.finditer(text) if not m.start() <= word_start <= m.end())
    if python and not attribute:
        add(sorted(_PYTHON))
    names = Names(out)
    names.bound = bound
    return names

"""File extension → tree-sitter grammar: the one table that chunking, stop rules and the
evaluation's site finder share, so a language added here is chunked, stopped and evaluated alike.

Grammars come from the per-language wheels, which bundle them (nothing is downloaded).
"""

from __future__ import annotations

import functools
import importlib

from tree_sitter import Language, Parser

# extension -> (grammar module, its language function)
_GRAMMARS: dict[str, tuple[str, str]] = {
    ".py": ("tree_sitter_python", "language"),
    ".pyi": ("tree_sitter_python", "language"),
    ".js": ("tree_sitter_javascript", "language"),
    ".mjs": ("tree_sitter_javascript", "language"),
    ".cjs": ("tree_sitter_javascript", "language"),
    ".jsx": ("tree_sitter_javascript", "language"),
    ".ts": ("tree_sitter_typescript", "language_typescript"),
    ".mts": ("tree_sitter_typescript", "language_typescript"),
    ".cts": ("tree_sitter_typescript", "language_typescript"),
    ".tsx": ("tree_sitter_typescript", "language_tsx"),
    ".go": ("tree_sitter_go", "language"),
    ".rs": ("tree_sitter_rust", "language"),
    ".java": ("tree_sitter_java", "language"),
    ".c": ("tree_sitter_c", "language"),
    ".h": ("tree_sitter_c", "language"),
    ".cc": ("tree_sitter_cpp", "language"),
    ".cpp": ("tree_sitter_cpp", "language"),
    ".cxx": ("tree_sitter_cpp", "language"),
    ".hpp": ("tree_sitter_cpp", "language"),
    ".hh": ("tree_sitter_cpp", "language"),
}


def extension(path: str) -> str:
    """The lower-cased suffix of ``path``'s file name (``.py``), or "" when it has none."""
    name = path.rsplit("/", 1)[-1]
    return name[name.rfind(".") :].lower() if "." in name else ""


@functools.cache
def _parser(ext: str) -> Parser:
    module, fn = _GRAMMARS[ext]
    return Parser(Language(getattr(importlib.import_module(module), fn)()))


def parser_for(path: str) -> Parser | None:
    """The tree-sitter parser of ``path``'s language, or None where there is no grammar."""
    ext = extension(path)
    return _parser(ext) if ext in _GRAMMARS else None

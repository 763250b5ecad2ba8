"""Files → chunks: byte ranges that tile a file, cut where top-level definitions start.

Why chunks: a memory entry depends on the text before it, so an edit would invalidate every
entry after it in the file.  Cutting at definitions and encoding each chunk on its own (after a
short, stable context) confines an edit to the chunks whose bytes changed: a new function is
encoded alone, in milliseconds.

Cuts sit where a definition (with its decorators and the comments directly above it) begins,
moved up over the blank lines before it: blank lines go with the definition after them, code
between definitions with the definition before.  A definition larger than ``max_bytes`` (a long class) is cut again at
the definitions inside it.  Languages without a grammar, or files that fail to parse, fall
back to windows of lines (the grammars are in ``languages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tree_sitter import Node

from ..languages import parser_for

# Node types that start a definition worth its own chunk, across the grammars of ``languages.py``.
DEFINITIONS = frozenset({
    # Python
    "function_definition", "class_definition", "decorated_definition",
    # JavaScript / TypeScript
    "function_declaration", "generator_function_declaration", "class_declaration",
    "abstract_class_declaration", "method_definition", "interface_declaration",
    "type_alias_declaration", "enum_declaration", "module", "internal_module",
    "lexical_declaration", "export_statement",
    # Go
    "method_declaration", "type_declaration",
    # Rust
    "function_item", "impl_item", "struct_item", "enum_item", "trait_item", "mod_item",
    "macro_definition", "union_item",
    # Java
    "constructor_declaration", "record_declaration", "annotation_type_declaration",
    # C / C++
    "struct_specifier", "class_specifier", "namespace_definition", "template_declaration",
    "type_definition",
})
_COMMENTS = frozenset({"comment", "line_comment", "block_comment"})
# Nodes inside a definition wrapper that carry the defined name (Go type specs, JS declarators).
_NAMED_PARTS = frozenset({"type_spec", "variable_declarator", "function_declaration", "class_declaration"})


@dataclass(frozen=True)
class Chunk:
    start: int  # byte offsets into the file
    end: int
    kind: str  # the grammar's node type at the cut, or "lines"


def _line_start(data: bytes, pos: int) -> int:
    return data.rfind(b"\n", 0, pos) + 1


def _cut_before(node: Node, data: bytes) -> int:
    """Where a definition's chunk starts: its line, pulled up over comments right above it and
    then over the blank lines before those, so that appending after a definition (or inserting
    a new one) leaves the bytes of the chunk before it unchanged."""
    first = node
    prev = node.prev_named_sibling
    while prev is not None and prev.type in _COMMENTS and data.count(b"\n", prev.end_byte, first.start_byte) <= 1:
        first, prev = prev, prev.prev_named_sibling
    cut = _line_start(data, first.start_byte)
    while cut > 0:
        above = _line_start(data, cut - 1)
        if data[above:cut].strip():
            break
        cut = above
    return cut


def _inner_definitions(node: Node, depth: int = 4) -> list[Node]:
    """The shallowest definitions inside ``node`` (methods of a class, items of an impl...)."""
    level = list(node.named_children)
    for _ in range(depth):
        found = [n for n in level if n.type in DEFINITIONS]
        if found:
            return found
        level = [c for n in level for c in n.named_children]
    return []


def chunk_file(path: str, data: bytes, *, max_bytes: int = 4096, window_lines: int = 60) -> list[Chunk]:
    """Chunks tiling ``data`` exactly (first starts at 0, each ends where the next starts)."""
    if not data:
        return []
    parser = parser_for(path)
    cuts: dict[int, str] = {0: "preamble"}
    if parser is not None:
        # tree-sitter recovers from syntax errors: half-typed code still gets its cuts
        tree = parser.parse(data)
        _cut_definitions(tree.root_node.named_children, data, max_bytes, cuts)
    else:
        cuts[0] = "lines"
    bounds = sorted(cuts)
    chunks = []
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(data)
        if end > start:
            chunks.extend(_split_long(data, start, end, cuts[start], max_bytes * 4, window_lines))
    return _merge_tiny(chunks)


def _cut_definitions(nodes: list[Node], data: bytes, max_bytes: int, cuts: dict[int, str]) -> None:
    for node in nodes:
        if node.type not in DEFINITIONS:
            continue
        cuts.setdefault(_cut_before(node, data), node.type)
        if node.end_byte - node.start_byte > max_bytes:
            _cut_definitions(_inner_definitions(node), data, max_bytes, cuts)


def _split_long(data: bytes, start: int, end: int, kind: str, limit: int, window: int) -> list[Chunk]:
    """Windows of ``window`` lines for text with no structure, or a chunk over ``limit`` bytes."""
    if kind != "lines" and end - start <= limit:
        return [Chunk(start, end, kind)]
    out, pos = [], start
    while pos < end:
        nxt = pos
        for _ in range(window):
            nl = data.find(b"\n", nxt, end)
            nxt = end if nl < 0 else nl + 1
            if nxt >= end or nxt - pos >= limit:
                break
        out.append(Chunk(pos, nxt, kind if pos == start else "lines"))
        pos = nxt
    return out


def defined_names(path: str, data: bytes, depth: int = 3) -> list[tuple[int, str]]:
    """(byte offset, name) of what ``data`` defines: functions, classes, methods, types, and
    module-level assignments, in file order.  These are the names a completion may offer as
    existing; the store keeps them with the chunk they fall in."""
    parser = parser_for(path)
    if parser is None:
        return []
    out: list[tuple[int, str]] = []

    def visit(nodes: list[Node], level: int) -> None:
        for node in nodes:
            if node.type == "decorated_definition":
                node = node.child_by_field_name("definition") or node
            name = node.child_by_field_name("name")
            if node.type in DEFINITIONS and name is None:  # a wrapper: export, const, type (...)
                visit([c for c in node.named_children if c.type != "comment"], level)
            elif node.type in DEFINITIONS or node.type in _NAMED_PARTS:
                if name is not None and name.type.endswith("identifier"):
                    out.append((name.start_byte, data[name.start_byte : name.end_byte].decode("utf-8", "replace")))
                if level < depth:
                    body = node.child_by_field_name("body")
                    visit(body.named_children if body is not None else [], level + 1)
            elif level == 0 and node.type == "expression_statement" and node.named_children:
                target = node.named_children[0]
                left = target.child_by_field_name("left") if target.type == "assignment" else None
                if left is not None and left.type == "identifier":
                    out.append((left.start_byte, data[left.start_byte : left.end_byte].decode("utf-8", "replace")))

    visit(parser.parse(data).root_node.named_children, 0)
    return sorted(out)


def _merge_tiny(chunks: list[Chunk], min_bytes: int = 64) -> list[Chunk]:
    """Fold chunks of a few bytes (a blank preamble, a one-line alias) into their successor."""
    out: list[Chunk] = []
    for c in chunks:
        if out and out[-1].end - out[-1].start < min_bytes:
            prev = out.pop()
            c = Chunk(prev.start, c.end, c.kind)
        out.append(c)
    return out

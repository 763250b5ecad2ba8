"""Projects as the memory sees them: files, their names, their chunks, and their memory entries.

Training and evaluation both need, for a file of a project, (a) the memory of the *other*
files, (b) which of its tokens spell names defined in another file (where the memory should
help most), and (c) the chunk of another file most related to a stretch of it (what a person,
or a prompt-stuffing retriever, would put in front of it).  This module computes those from
plain text, with Python's own parser, so the model package needs no grammar library.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .memory import TensorMemory
from .model import MemorizingTransformer
from .runtime import encoding
from .tokenizer import Tokenizer

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMON = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls", "args", "kwargs"}
PIECE_TOKENS = 512  # a file is encoded into memory in pieces of at most this many tokens


@dataclass
class SourceFile:
    path: str
    text: str
    ids: list[int] = field(default_factory=list)  # header + text tokens
    first: int = 0  # index of the first text token (after the header)


@dataclass
class Chunk:
    path: str
    text: str
    names: Counter  # identifiers it uses


def defined_names(text: str) -> set[str]:
    """Names a Python file defines at module or class level (functions, classes, assignments)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))

    visit(tree.body)
    return {n for n in names if len(n) >= 3 and n not in _COMMON}


def top_level_chunks(path: str, text: str) -> list[Chunk]:
    """The file's top-level statements grouped into definition-sized chunks (whole file if unparsable)."""
    lines = text.splitlines(keepends=True)
    try:
        body = ast.parse(text).body
    except (SyntaxError, ValueError):
        body = []
    spans = [(n.lineno - 1 - len(getattr(n, "decorator_list", [])), n.end_lineno or n.lineno) for n in body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if not spans:
        return [Chunk(path, text, Counter(_IDENT.findall(text)))] if text.strip() else []
    out = []
    for a, b in spans:
        piece = "".join(lines[a:b])
        out.append(Chunk(path, piece, Counter(_IDENT.findall(piece))))
    return out


def related_chunks(window: str, chunks: list[Chunk], budget: int, tokens_of=len) -> list[Chunk]:
    """Chunks sharing the most distinct uncommon identifiers with ``window``, best first, while
    their sizes (``tokens_of``) fit ``budget``; chunks sharing none are never chosen."""
    want = {n for n in _IDENT.findall(window) if n not in _COMMON and len(n) >= 3}
    scored = sorted(((sum(1 for n in want if n in c.names), -i, c) for i, c in enumerate(chunks)), reverse=True)
    out, used = [], 0
    for score, _, c in scored:
        if score == 0:
            break
        size = tokens_of(c)
        if used + size > budget:
            if not out:  # the best chunk alone is too big: its head is still the best context
                out.append(c)
            continue
        out.append(c)
        used += size
    return out


def cross_file_mask(tok: Tokenizer, f: SourceFile, foreign: set[str]) -> np.ndarray:
    """True for tokens of ``f.ids`` that overlap a name defined in another file but not in ``f``."""
    names = foreign - defined_names(f.text)
    mask = np.zeros(len(f.ids), dtype=bool)
    if not names:
        return mask
    data = f.text.encode("utf-8")
    spans = np.zeros(len(data) + 1, dtype=bool)
    for m in _IDENT.finditer(f.text):
        if m.group(0) in names:
            a = len(f.text[: m.start()].encode("utf-8"))
            spans[a : a + len(m.group(0).encode("utf-8"))] = True
    lengths = np.array([len(tok.token_bytes[i]) for i in f.ids[f.first :]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for j, (s, n) in enumerate(zip(starts, lengths)):
        if n and spans[s : s + n].any():
            mask[f.first + j] = True
    return mask


def tokenize_files(tok: Tokenizer, files: list[tuple[str, str]]) -> list[SourceFile]:
    out = []
    bodies = tok.encode_batch([t for _, t in files])
    for (path, text), body in zip(files, bodies):
        header = tok.file_header(path)
        out.append(SourceFile(path, text, header + body, len(header)))
    return out


def pieces(f: SourceFile, tok: Tokenizer, size: int = PIECE_TOKENS) -> list[tuple[int, int]]:
    """Token ranges of ``f``'s text, at most ``size`` long, cut after a newline where possible."""
    out, a, n = [], f.first, len(f.ids)
    while a < n:
        b = min(n, a + size)
        if b < n:
            for c in range(b, a + size // 2, -1):
                if tok.token_bytes[f.ids[c - 1]].endswith(b"\n"):
                    b = c
                    break
        out.append((a, b))
        a = b
    return out


@torch.no_grad()
@encoding()
def encode_memory(model: MemorizingTransformer, tok: Tokenizer, files: list[SourceFile], *,
                  batch_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16) -> TensorMemory:
    """Every file's entries (each piece read after its file header) in one ``TensorMemory``;
    entry file ids are positions in ``files``."""
    jobs = [(fi, a, b) for fi, f in enumerate(files) for a, b in pieces(f, tok)]
    jobs.sort(key=lambda j: j[2] - j[1])
    keys, values, tokens, owners = [], [], [], []
    device = model.embed.weight.device
    i = 0
    while i < len(jobs):
        width = files[jobs[i][0]].first + jobs[i][2] - jobs[i][1]
        j = i
        while j < len(jobs) and (j - i + 1) * (files[jobs[j][0]].first + jobs[j][2] - jobs[j][1]) <= batch_tokens:
            j += 1
        j = max(j, i + 1)
        rows = [files[fi].ids[: files[fi].first] + files[fi].ids[a:b] for fi, a, b in jobs[i:j]]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), tok.eot, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, : len(row)] = torch.tensor(row)
        e = model.encode(x.to(device))
        for r, (fi, a, b) in enumerate(jobs[i:j]):
            h = files[fi].first
            keys.append(e.keys[r, :, h : h + b - a].to(dtype).cpu())
            values.append(e.values[r, :, h : h + b - a].to(dtype).cpu())
            tokens.append(torch.tensor(files[fi].ids[a:b]))
            owners.append(torch.full((b - a,), fi))
        i = j
    if not keys:
        S, D = len(model.cfg.memory_kv_heads), model.cfg.head_dim
        return TensorMemory(torch.zeros(S, 0, D, dtype=dtype), torch.zeros(S, 0, D, dtype=dtype),
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return TensorMemory(torch.cat(keys, 1), torch.cat(values, 1), torch.cat(tokens), torch.cat(owners))

"""The retrieval baseline: BM25 over the repository's chunks, stuffed into the prompt.

This is what retrieval-augmented completers such as Tabby and the CrossCodeEval baselines do:
split the repository into chunks (here the indexer's own tree-sitter chunks), take the lines
before the cursor as the query, rank the other files' chunks with Okapi BM25, and put the best
ones in front of the prompt.  Ours go in as earlier files of the same document, each behind its
``<|file|>`` header, the layout the model saw in training; the best chunk comes last, nearest
the cursor.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from mtlsp_model.tokenizer import Tokenizer

from ..index.chunks import chunk_file

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")


def terms(text: str) -> list[str]:
    """Identifier-ish words, with snake_case and CamelCase parts added: ``get_user`` also
    matches ``user``."""
    out = []
    for w in _WORD.findall(text):
        low = w.lower()
        out.append(low)
        parts = [p.lower() for p in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", w) if p]
        if len(parts) > 1:
            out.extend(parts)
    return out


@dataclass(frozen=True)
class Snippet:
    path: str
    text: str


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over chunks of the repository's files."""

    def __init__(self, texts: dict[str, str], k1: float = 1.5, b: float = 0.75) -> None:
        self.snippets: list[Snippet] = []
        for path in sorted(texts):
            data = texts[path].encode("utf-8")
            for c in chunk_file(path, data):
                piece = data[c.start : c.end].decode("utf-8", "replace")
                if piece.strip():
                    self.snippets.append(Snippet(path, piece))
        bags = [Counter(terms(s.text)) for s in self.snippets]
        lengths = [sum(b.values()) for b in bags]
        avg = sum(lengths) / max(1, len(lengths))
        self.norm = [k1 * (1 - b + b * n / max(1e-9, avg)) for n in lengths]
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, bag in enumerate(bags):
            for t, f in bag.items():
                self.postings.setdefault(t, []).append((i, f))
        n = len(bags)
        self.idf = {t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}
        self.k1 = k1

    def scores(self, query: str, exclude: str | None = None) -> list[tuple[float, int]]:
        """(score, snippet index) best first, leaving out ``exclude``'s chunks and zero scores."""
        acc: dict[int, float] = {}
        for t, qf in Counter(terms(query)).items():
            idf = self.idf.get(t)
            if idf is None:
                continue
            for i, f in self.postings[t]:
                acc[i] = acc.get(i, 0.0) + idf * f * (self.k1 + 1) / (f + self.norm[i]) * qf
        ranked = [(s, i) for i, s in acc.items() if self.snippets[i].path != exclude]
        ranked.sort(key=lambda x: (-x[0], x[1]))
        return ranked

    def preamble(self, tok: Tokenizer, query: str, exclude: str, budget: int) -> list[int]:
        """Token ids of the best snippets that fit in ``budget`` tokens, best one last."""
        if budget <= 0:
            return []
        picked: list[list[int]] = []
        used = 0
        for _, i in self.scores(query, exclude):
            s = self.snippets[i]
            ids = tok.file_header(s.path) + tok.encode(s.text)
            room = budget - used
            if room < 16:
                break
            picked.append(ids[:room])
            used += len(picked[-1])
        return [t for ids in reversed(picked) for t in ids]


def query_before(text: str, cursor: int, lines: int = 10) -> str:
    """The query: the last ``lines`` lines before the cursor (CrossCodeEval uses the same)."""
    start = cursor
    for _ in range(lines):
        start = text.rfind("\n", 0, start - 1) if start > 0 else -1
        if start < 0:
            return text[:cursor]
    return text[start + 1 : cursor]

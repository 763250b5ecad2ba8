"""Completing cross-file call sites the way the server does, under each retrieval condition.

At each site the line is cut at the callee's name, then after one and two typed characters, as a
user would type it.  Each cut asks the ``Completer`` for ghost text (the line completion that is
scored) and for the popup list (scored by the rank of the callee's name), under:

- ``memory``: the repository's store, with the calling file hidden (its stored copy holds the
  very line being completed), and the candidate names the server ranks (``complete/candidates.py``);
- ``memory_only``: the same memory with the candidate ranking switched off: the model spells
  every name itself, so the memory's own share is visible;
- ``none``: the same model, prompts and candidate names, no memory;
- ``bm25``: no memory, other files' best BM25 chunks stuffed in front of the prompt (candidate
  names as in ``none``).

One document per site and condition keeps the server's per-document caches honest: the second
and third keystrokes reuse the first's model state exactly as in an editor.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from ..complete.completer import Completer, Recall
from . import metrics
from .sites import Site, cut


class LineIndex:
    """(path, byte offset) -> 1-based line, for the provenance the completer computes."""

    def __init__(self, texts: dict[str, str]) -> None:
        self._starts: dict[str, list[int]] = {}
        for path, text in texts.items():
            self.set(path, text)

    def set(self, path: str, text: str) -> None:
        """Follow an edit of ``path`` (the new-function trials write into the memory)."""
        data = text.encode("utf-8")
        starts, pos = [0], data.find(b"\n")
        while pos >= 0:
            starts.append(pos + 1)
            pos = data.find(b"\n", pos + 1)
        self._starts[path] = starts

    def __call__(self, path: str, offset: int) -> int:
        starts = self._starts.get(path)
        return bisect.bisect_right(starts, offset) if starts else 0


@dataclass
class Condition:
    name: str
    recall: Recall | None = None
    stuffing: dict[str, list[int]] = field(default_factory=dict)  # site key -> preamble ids
    names: bool = True  # rank existing names (the server's behaviour) or let the model spell them


@dataclass
class Attempt:
    """One condition at one cut of one site."""

    condition: str
    typed: int
    prediction: str  # from the cut: the typed characters, then the ghost text's first line
    exact: bool
    similarity: float
    identifiers: bool
    name_hit: bool  # the completion starts with the callee's name
    definition_read: bool  # a file defining the callee is among the ghost text's top memory support
    inline_ms: float
    popup: list[str]
    reciprocal_rank: float
    popup_ms: float


def site_key(site: Site) -> str:
    return f"{site.path}:{site.offset}"


def complete_site(
    completer: Completer,
    site: Site,
    text: str,
    condition: Condition,
    typed_counts: tuple[int, ...],
    max_tokens: int,
) -> list[Attempt]:
    uri = f"eval://{condition.name}/{site_key(site)}"
    preamble = condition.stuffing.get(site_key(site), [])
    attempts = []
    try:
        for typed in typed_counts:
            if typed >= len(site.name):
                continue
            cut_text, cursor = cut(text, site, typed)
            inline = completer.inline(uri, site.path, cut_text, cursor, condition.recall,
                                      max_tokens=max_tokens, preamble=preamble, names=condition.names)
            prediction = site.name[:typed] + inline.text.split("\n", 1)[0]
            t0 = time.perf_counter()
            _, items = completer.popup(uri, site.path, cut_text, cursor, condition.recall, preamble=preamble,
                                       names=condition.names)
            popup_ms = (time.perf_counter() - t0) * 1000
            words = [c.word for c in items]
            attempts.append(Attempt(
                condition=condition.name,
                typed=typed,
                prediction=prediction,
                exact=metrics.exact_match(prediction, site.target),
                similarity=metrics.edit_similarity(prediction, site.target),
                identifiers=metrics.identifier_match(prediction, site.target),
                name_hit=metrics.first_name(prediction) == site.name,
                definition_read=any(sp.path in site.defined_in for sp in inline.support),
                inline_ms=inline.ms,
                popup=words,
                reciprocal_rank=metrics.reciprocal_rank(site.name, words),
                popup_ms=popup_ms,
            ))
    finally:
        completer.forget(uri)
    return attempts


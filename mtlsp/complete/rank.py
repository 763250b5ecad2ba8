"""Candidate names → ranked by the memorizing model: the log-probability of each name's tokens
after the prompt, with the memory, and of the name ending there.

A beam search constrained to the trie of the candidates' token sequences: every step advances
the best ``width`` partial names by one token, in one batch, reusing the prompt's keys and
values, so shared prefixes (``compute_``...) are read once and a pool of thousands of names costs
a handful of decoding steps.  A name is finished when its last token is read; its score adds the
probability that the next token does not continue the identifier (``sum`` must not win just
for being a prefix of ``summarize_quarterly_ledger``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .decode import Context, Decoder, Evidence, check


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    ends: list[str] = field(default_factory=list)


@dataclass
class Ranked:
    name: str
    logprob: float  # of the name's tokens and of a token that ends the identifier after them
    ctx: Context  # the prompt and the name, read: ghost text continues from here
    evidence: list[Evidence | None]  # what the memory heads read along the name


class Ranker:
    """Ranks names after prompts of one model; not thread-safe (one decoding worker)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        tok = decoder.tok
        # tokens that would continue an identifier: they start with a word character (or a
        # non-ASCII byte, which in Python may be a letter)
        cont = [bool(b) and (chr(b[0]).isalnum() or b[0] == ord("_") or b[0] >= 0x80) for b in tok.token_bytes]
        self._ends = ~torch.tensor(cont)
        self._cache: dict[tuple[bytes, str], list[int]] = {}

    def _tokens(self, head: bytes, name: str) -> list[int]:
        key = (head, name)
        ids = self._cache.get(key)
        if ids is None:
            if len(self._cache) > 200_000:
                self._cache.clear()
            ids = self._cache[key] = self.decoder.tok.encode_bytes(head + name.encode("utf-8"))
        return ids

    def end_mask(self, device: torch.device) -> torch.Tensor:
        """Additive score mask: -inf for the tokens that would continue an identifier."""
        return torch.zeros(self._ends.shape, device=device).masked_fill(~self._ends.to(device), float("-inf"))

    def boundary(self, logits: torch.Tensor) -> float:
        """log P(the next token ends the identifier)."""
        return float(torch.logsumexp(logits[self._ends.to(logits.device)], dim=0))

    def rank(self, ctx: Context, head: bytes, names: list[str], memory, *, width: int = 8, top: int = 8,
             max_depth: int = 16, margin: float | None = None, floor: float | None = None,
             cancel: threading.Event | None = None) -> list[Ranked]:
        """The ``top`` names, best first.  ``head``: bytes every name follows (the healed token).

        ``margin``: names more than this many nats below the best are not wanted; ``floor``: nor
        are names at or below this log-probability.  Partial names already past either are
        dropped (a name's score only falls as it grows), which ends the search sooner without
        changing what is kept.
        """
        root = _Node()
        for name in names:
            node = root
            ids = self._tokens(head, name)
            if not ids or len(ids) > max_depth or len(ctx.ids) + len(ids) >= self.decoder.window:
                continue
            for t in ids:
                node = node.children.setdefault(t, _Node())
            node.ends.append(name)
        beams: list[tuple[float, Context, _Node, list]] = [(0.0, ctx, root, [ctx.evidence])]
        finished: list[Ranked] = []
        while beams:
            check(cancel)
            grown = [(score + float(c.logits[t]), c, t, child, ev)
                     for score, c, node, ev in beams for t, child in node.children.items()]
            grown.sort(key=lambda g: -g[0])
            scores = sorted((r.logprob for r in finished), reverse=True)
            bars = [floor] if floor is not None else []
            if len(scores) >= top:
                bars.append(scores[top - 1])
            if scores and margin is not None:
                bars.append(scores[0] - margin)
            bar = max(bars) if bars else None
            grown = [g for g in grown[:width] if bar is None or g[0] > bar]  # scores only fall
            if not grown:
                break
            stepped = self.decoder.step([g[1] for g in grown], [g[2] for g in grown], memory)
            beams = []
            for (score, _, _, child, ev), c in zip(grown, stepped, strict=True):
                trail = ev + [c.evidence]
                for name in child.ends:
                    finished.append(Ranked(name, score + self.boundary(c.logits), c, trail))
                if child.children:
                    beams.append((score, c, child, trail))
        finished.sort(key=lambda r: -r.logprob)
        return finished[:top]

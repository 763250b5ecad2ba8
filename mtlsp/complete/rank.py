"""Candidate names → ranked by the memorizing model: the log-probability of each name's tokens
after the prompt, with the memory, and of the name ending there.

The names' token sequences form a trie, so shared prefixes (``compute_``...) are read once:

- **a small trie is read whole, in one forward pass** (``Decoder.tree``: every node attends to
  the prompt and its own ancestors).  Every name gets its exact score, at the cost of about
  three decoding steps for 64 nodes; typing a letter leaves a few dozen names, so this is the
  keystroke's case.
- **a large one** (thousands of names where nothing is typed yet) **is searched with a beam**:
  every step advances the best ``width`` partial names by one token, in one batch.

A name is finished when its last token is read; its score adds the probability that the next
token does not continue the identifier (``sum`` must not win just for being a prefix of
``summarize_quarterly_ledger``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .candidates import word_byte
from .decode import Context, Decoder, Evidence, check


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    ends: list[str] = field(default_factory=list)
    prior: float = float("-inf")  # the best prior of the names at or below this node


@dataclass
class Ranked:
    name: str
    logprob: float  # of the name's tokens and of a token that ends the identifier after them
    # on demand, since only the names shown need them:
    trail: Callable[[], list[Evidence | None]]  # what the memory heads read along the name
    read: Callable[[], Context]  # the prompt and the name, read: ghost text continues from there


@dataclass(frozen=True)
class Prior:
    """What is known of the names before the model reads them: static analysis listed
    ``bound`` at the cursor, so a name outside that list is most likely wrong there (an
    attribute the object lacks, a name no import binds) and loses ``outside`` nats.  No list, no
    prior: static analysis found nothing, or the names are all there can be."""

    bound: frozenset[str] = frozenset()
    outside: float = 0.0

    def __call__(self, name: str) -> float:
        return -self.outside if self.bound and name not in self.bound else 0.0


NO_PRIOR = Prior()


class Ranker:
    """Ranks names after prompts of one model; not thread-safe (one decoding worker)."""

    def __init__(self, decoder: Decoder, *, tree_nodes: int = 96) -> None:
        """``tree_nodes``: the largest trie read whole (``Decoder.tree``); larger ones are searched."""
        self.decoder = decoder
        self.tree_nodes = tree_nodes
        tok = decoder.tok
        # tokens that would continue an identifier: they start with a word character (or a
        # non-ASCII byte, which in Python may be a letter)
        cont = [bool(b) and (word_byte(b[0]) or b[0] >= 0x80) for b in tok.token_bytes]
        self._ends = ~torch.tensor(cont)
        self._cache: dict[tuple[bytes, str], list[int]] = {}
        self._last: tuple[Context, object, tuple, frozenset[str], list[Ranked]] | None = None  # see ``score``

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
        return float(self._boundaries(logits))

    def _boundaries(self, logits: torch.Tensor) -> torch.Tensor:
        """``boundary`` along the last axis, for any number of positions at once."""
        return torch.logsumexp(logits[..., self._ends.to(logits.device)], dim=-1)

    def rank(self, ctx: Context, head: bytes, names: list[str], memory, *, width: int = 8, top: int = 8,
             max_depth: int = 16, margin: float | None = None, floor: float | None = None,
             prior: Prior = NO_PRIOR, cancel: threading.Event | None = None) -> list[Ranked]:
        """The ``top`` names, best first.  ``head``: bytes every name follows (the healed token).

        ``margin``: names more than this many nats below the best are not wanted; ``floor``: nor
        are names at or below this log-probability.  ``width``: the beam of a large trie.
        ``prior``: added to each name's log-probability (``Ranked.logprob`` includes it).
        """
        found = self.score(ctx, head, names, memory, width=width, top=top, max_depth=max_depth,
                           margin=margin, floor=floor, prior=prior, cancel=cancel)
        if found and margin is not None:
            found = [r for r in found if r.logprob >= found[0].logprob - margin]
        if floor is not None:
            found = [r for r in found if r.logprob > floor]
        return found[:top]

    def score(self, ctx: Context, head: bytes, names: list[str], memory, *, width: int = 8, top: int = 8,
              max_depth: int = 16, margin: float | None = None, floor: float | None = None,
              prior: Prior = NO_PRIOR, cancel: threading.Event | None = None) -> list[Ranked]:
        """Every name the ranking scored, best first: all of a trie read whole; of a larger one,
        those the beam finished before ``top``, ``margin`` and ``floor`` ended its search.  A
        popup keeps them, so that a keystroke can be answered from them (``completer.py``).

        The last trie read whole answers the next ranking of the same prompt state, memory,
        depth and prior, of its names or of any of them (a name's score depends on its own path
        alone): an editor asks for ghost text and the popup at each keystroke, and both rank the
        same names there (a trie pass of 200-450 ms after one typed letter), or ghost text only
        the names an edit added among the module's the popup ranked; it answers any ``width``,
        ``top``, ``margin`` and ``floor``.  It is kept for that one ranking only, and
        dropped before another is computed, so that two tries' logits and keys are never held
        at once (the server's peak memory rose by 140 MB on flask when the last one was kept).
        A beam's answer is not kept: it depends on how far the search went (the ghost text's
        stops sooner than the popup's), and each name it finished holds a whole copy of the
        prompt state (18 MB at 384 tokens) where a trie holds one."""
        question, wanted = (head, max_depth, prior), frozenset(names)
        last, self._last = self._last, None  # kept for one more answer at most: a trie is ~40 MB
        if last is not None and last[0] is ctx and last[1] is memory and last[2] == question and wanted <= last[3]:
            return [r for r in last[4] if r.name in wanted]
        del last
        root, size = _Node(), 0
        for name in names:
            node = root
            ids = self._tokens(head, name)
            if not ids or len(ids) > max_depth or len(ctx.ids) + len(ids) >= self.decoder.window:
                continue
            weight = prior(name)
            for t in ids:
                if t not in node.children:
                    size += 1
                node = node.children.setdefault(t, _Node())
                node.prior = max(node.prior, weight)
            node.ends.append(name)
        if not size:
            return []
        if size > self.tree_nodes:
            found = self._search(ctx, root, memory, width, top, margin, floor, prior, cancel)
            found.sort(key=lambda r: -r.logprob)
            return found
        found = self._read_whole(ctx, root, memory, prior, cancel)
        found.sort(key=lambda r: -r.logprob)
        self._last = (ctx, memory, question, wanted, found)
        return list(found)

    def _read_whole(self, ctx: Context, root: _Node, memory, prior: Prior,
                    cancel: threading.Event | None) -> list[Ranked]:
        """Every name of the trie, scored from one forward pass over all its nodes."""
        check(cancel)
        tokens: list[int] = []
        parents: list[int] = []
        ends: list[tuple[int, str]] = []
        todo = [(root, -1)]
        while todo:  # depth first: a node's parent is always listed before it
            node, at = todo.pop()
            for t, child in node.children.items():
                tokens.append(t)
                parents.append(at)
                ends += [(len(tokens) - 1, name) for name in child.ends]
                todo.append((child, len(tokens) - 1))
        tree = self.decoder.tree(ctx, tokens, parents, memory)
        ids = torch.tensor(tokens, device=tree.logits.device)
        up = torch.tensor(parents, device=tree.logits.device)
        gained = torch.where(up < 0, ctx.logits[ids], tree.logits[up.clamp(min=0), ids]).tolist()
        score: list[float] = []
        for i, p in enumerate(parents):
            score.append(gained[i] + (score[p] if p >= 0 else 0.0))
        nodes = sorted({i for i, _ in ends})  # every leaf ends a name: never empty
        boundary = dict(zip(nodes, self._boundaries(tree.logits[nodes]).tolist(), strict=True))
        trail = tree.trail  # what a popup keeps of the trie (``decode.Trail``)
        return [Ranked(name, score[i] + boundary[i] + prior(name), lambda i=i: trail.along(i),
                       lambda i=i: tree.context(i))
                for i, name in ends]

    def _search(self, ctx: Context, root: _Node, memory, width: int, top: int, margin: float | None,
                floor: float | None, prior: Prior, cancel: threading.Event | None) -> list[Ranked]:
        """A beam over the trie: the best ``width`` partial names advance one token per step,
        each scored with the best prior of the names it may become.  Partial names already below
        what ``top``, ``margin`` or ``floor`` keep are dropped (that score only falls as a name
        grows), which ends the search sooner without changing what is kept."""
        beams: list[tuple[float, Context, _Node, list]] = [(0.0, ctx, root, [ctx.evidence])]
        finished: list[Ranked] = []
        while beams:
            check(cancel)
            grown = [(score + float(c.logits[t]), c, t, child, ev)
                     for score, c, node, ev in beams for t, child in node.children.items()]
            grown.sort(key=lambda g: -(g[0] + g[3].prior))
            scores = sorted((r.logprob for r in finished), reverse=True)
            bars = [floor] if floor is not None else []
            if len(scores) >= top:
                bars.append(scores[top - 1])
            if scores and margin is not None:
                bars.append(scores[0] - margin)
            bar = max(bars) if bars else None
            grown = [g for g in grown[:width] if bar is None or g[0] + g[3].prior > bar]
            if not grown:
                break
            stepped = self.decoder.step([g[1] for g in grown], [g[2] for g in grown], memory)
            beams = []
            for (score, _, _, child, ev), c in zip(grown, stepped, strict=True):
                trail = ev + [c.evidence]
                for name in child.ends:
                    finished.append(Ranked(name, score + self.boundary(c.logits) + prior(name), lambda t=trail: t,
                                           lambda c=c: c))
                if child.children:
                    beams.append((score, c, child, trail))
        return finished

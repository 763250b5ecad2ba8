"""Bits per token with and without the memory, leaving one file out: the paper's measurement,
on a project's files, plus the figures that say *why* it helps.

For every file of a project, scored in sliding windows behind its file header:

- ``none``: the base alone (the memory heads read nothing);
- ``memory``: the memory holds every other file of the project (the file's own entries hidden);
- ``control``: the memory holds an unrelated project instead: a memory that helps only because it
  holds the right code should not help here;
- ``stuffed``: no memory, but each window is read after the most related chunk of another file
  (most shared identifiers), the in-prompt context the memory stands in for.  The share of the
  gap closed, ``(none - memory) / (none - stuffed)``, says how close the memory comes to it.

Each is reported on all tokens and on *cross-file identifier tokens*: tokens of names that
another file defines and this one does not, where a project memory should matter most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .memory import Memory, TensorMemory
from .model import MemorizingTransformer
from .projects import SourceFile, cross_file_mask, defined_names, related_chunks, top_level_chunks
from .tokenizer import Tokenizer

LN2 = math.log(2)
CONDITIONS = ("none", "memory", "control", "stuffed")
STUFF_TOKENS = 1024  # the related chunks' budget in the stuffed condition
WINDOW = 512  # files are scored in windows of this many tokens, advancing by half


@torch.no_grad()
def score_file(model: MemorizingTransformer, f: SourceFile, memory: Memory | None, *, window: int = WINDOW,
               stride: int = WINDOW // 2, prefix_of: Callable[[int, int], list[int]] | None = None) -> np.ndarray:
    """Negative log-likelihood (nats) of each text token of ``f``, NaN where not scored.

    Sliding windows of ``window`` tokens advancing by ``stride``: every token is scored once,
    with at least ``window - stride`` tokens before it (all of them near the start).
    ``prefix_of(a, b)``: tokens read before the window ``ids[a:b]`` (the stuffed condition).
    """
    ids = f.ids
    nll = np.full(len(ids), np.nan)
    done = max(1, f.first)  # the next position to score
    device = model.embed.weight.device
    for a in range(0, len(ids), stride):
        b = min(a + window, len(ids))
        if b <= done:
            continue
        prefix = prefix_of(a, b) if prefix_of else []
        x = torch.tensor([prefix + ids[a:b]], device=device)
        logp = model(x, memory=memory).logits[0, len(prefix):]
        targets = torch.tensor(ids[a + 1 : b], device=device)
        got = -logp[:-1].gather(-1, targets[:, None])[:, 0].float().cpu().numpy()
        nll[done:b] = got[done - a - 1 :]
        done = b
        if b == len(ids):
            break
    return nll


def stuffing(tok: Tokenizer, window: str, chunks: list, budget: int) -> list[int]:
    """The most related chunks of other files, each behind its file header, up to ``budget``
    tokens, the best last (nearest the window it is read before)."""
    picked = related_chunks(window, chunks, budget, tokens_of=lambda c: len(c.text) // 3)
    out: list[int] = []
    for c in reversed(picked):
        out += tok.file_header(c.path) + tok.encode(c.text)
    return out[-budget:]


class _Stuffing:
    """The stuffed condition's prefix for each window of one file (computed once per window)."""

    def __init__(self, tok: Tokenizer, f: SourceFile, chunks: list, budget: int) -> None:
        self.tok, self.f, self.chunks, self.budget = tok, f, chunks, budget
        self.done: dict[tuple[int, int], list[int]] = {}

    def __call__(self, a: int, b: int) -> list[int]:
        if (a, b) not in self.done:
            window = self.tok.decode(self.f.ids[max(a, self.f.first) : b])
            self.done[(a, b)] = stuffing(self.tok, window, self.chunks, self.budget)
        return self.done[(a, b)]


@dataclass
class FileScore:
    path: str
    tokens: int
    cross_tokens: int
    nats: dict[str, float] = field(default_factory=dict)  # condition -> summed nats, all tokens
    cross_nats: dict[str, float] = field(default_factory=dict)  # the same on cross-file identifier tokens


def evaluate_files(
    model: MemorizingTransformer,
    tok: Tokenizer,
    files: list[SourceFile],
    memory: TensorMemory,
    *,
    control: TensorMemory | None = None,
    score: Iterable[int] | None = None,
    conditions: Iterable[str] = CONDITIONS,
    stuff_tokens: int = STUFF_TOKENS,
    tick: Callable[[], None] = lambda: None,
) -> list[FileScore]:
    """Score ``files[i]`` for ``i`` in ``score`` (default all) under each condition.

    ``memory`` holds the entries of every file of the project (file id = position in ``files``).
    """
    conditions = [c for c in conditions if c != "control" or control is not None]
    stuff_tokens = min(stuff_tokens, model.cfg.max_context - WINDOW)  # the prefix and a window fit
    defined = [defined_names(f.text) for f in files]
    chunks = [top_level_chunks(f.path, f.text) for f in files]
    out = []
    for i in score if score is not None else range(len(files)):
        f = files[i]
        foreign = set().union(*(d for j, d in enumerate(defined) if j != i))
        cross = cross_file_mask(tok, f, foreign)
        others = [c for j, cs in enumerate(chunks) if j != i for c in cs]
        prefix_of = _Stuffing(tok, f, others, stuff_tokens)

        fs = FileScore(f.path, 0, 0)
        for cond in conditions:
            if cond == "memory":
                memory.hide([i])
                nll = score_file(model, f, memory)
                memory.hide([])
            elif cond == "control":
                nll = score_file(model, f, control)
            elif cond == "stuffed":
                nll = score_file(model, f, None, prefix_of=prefix_of)
            else:
                nll = score_file(model, f, None)
            ok = ~np.isnan(nll)
            fs.tokens, fs.cross_tokens = int(ok.sum()), int((ok & cross).sum())
            fs.nats[cond] = float(nll[ok].sum())
            fs.cross_nats[cond] = float(nll[ok & cross].sum())
            tick()
        out.append(fs)
    return out


def summarize(scores: list[FileScore]) -> dict:
    """Bits per token per condition, on all tokens and on cross-file identifier tokens, with the
    relative changes against ``none`` and the share of the in-prompt gap the memory closes."""
    tokens = sum(s.tokens for s in scores)
    cross = sum(s.cross_tokens for s in scores)
    conds = list(scores[0].nats) if scores else []
    res: dict = {"files": len(scores), "tokens": tokens, "cross_tokens": cross}
    for name, total, key in (("all", tokens, "nats"), ("cross", cross, "cross_nats")):
        bpt = {c: sum(getattr(s, key)[c] for s in scores) / max(1, total) / LN2 for c in conds}
        part: dict = {"bits_per_token": bpt}
        if "none" in bpt and bpt["none"]:
            part["change_vs_none"] = {c: bpt[c] / bpt["none"] - 1 for c in bpt if c != "none"}
            if "stuffed" in bpt and "memory" in bpt and bpt["none"] != bpt["stuffed"]:
                part["gap_closed"] = (bpt["none"] - bpt["memory"]) / (bpt["none"] - bpt["stuffed"])
        res[name] = part
    return res

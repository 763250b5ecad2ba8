"""Token ids → next-token scores, incrementally, with the memory heads reading a store.

The language server asks for completions at every keystroke, and consecutive prompts share
almost all of their tokens.  ``Decoder.prefill`` keeps each prompt's per-layer keys and values
(``Context``) and, for the next prompt, computes only the tokens after the longest common
prefix: typing inside a word leaves the healed prompt (``prompt.py``) unchanged, so the cached
scores are reused outright.

Every call returns its **evidence** with its scores: the memory entries the memory heads read
at the scored position and the attention they got (``Evidence``).  Provenance is computed from
that, not re-derived afterwards.

``constraints`` is token healing's half of decoding: the prompt stops before the characters
the user has typed of the current word (and the token before them), and generation must
reproduce those bytes first, so a prompt that ends mid-token cannot derail the model.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import torch
from mtlsp_model.memory import Memory
from mtlsp_model.model import KV, MemorizingTransformer, Read
from mtlsp_model.tokenizer import Tokenizer
from torch import Tensor


class Cancelled(Exception):
    """The request was superseded or cancelled; raised between tokens."""


def check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


@dataclass(frozen=True)
class Evidence:
    """What the memory heads read at one scored position: ``weights`` (M, k) attention shares,
    ``sources`` (M, k) the memory's ids of the entries (-1: none), M = memory heads."""

    weights: Tensor
    sources: Tensor

    @staticmethod
    def of(reads: list[Read], row: int, pos: int = -1) -> Evidence | None:
        """The evidence at position ``pos`` of batch row ``row`` (None without memory reads)."""
        if not reads:
            return None
        return Evidence(torch.stack([r.weights[row, pos].float().cpu() for r in reads]),
                        torch.stack([r.source[row, pos].cpu() for r in reads]))


@dataclass
class Context:
    """A prompt the model has read: its ids, every layer's keys/values, the next-token scores
    and the evidence behind them."""

    ids: list[int]
    kv: list[KV]
    logits: Tensor  # (V,) log-probabilities of the token after ``ids``
    evidence: Evidence | None
    memory: object = None  # the memory's version when it was read (``memory_version``)
    clean: int = 0  # leading positions that read no memory: right whatever the memory holds now

    def truncated(self, n: int) -> list[KV]:
        return [KV(kv.keys[:, :, :n], kv.values[:, :, :n], kv.buffer) for kv in self.kv]


def memory_version(memory: Memory | None) -> object:
    """What a context's memory reads depend on.  A memory whose entries change under the same
    object (the workspace's store, written as the user edits) says so with a ``version``;
    without one, a memory is taken to be fixed."""
    if memory is None:
        return None
    return getattr(memory, "version", id(memory))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def guess(ids: list[int], k: int, longest: int = 3) -> list[int]:
    """The ``k`` tokens that followed the latest earlier occurrence of ``ids``' last few tokens
    (the longest n-gram, of 2 up to ``longest`` tokens, that occurred before), or none.  Code
    repeats itself (arguments, keys, a call's shape), so what followed last time is a good guess
    of what the model writes next ("prompt lookup decoding"); ``Decoder.extend`` checks it.
    A single repeated token guesses too badly to pay for the larger pass (measured on flask:
    the same time saved with 20% fewer tokens read)."""
    for size in range(min(longest, len(ids) - 1), 1, -1):
        tail = ids[-size:]
        for start in range(len(ids) - size - 1, -1, -1):
            if ids[start : start + size] == tail:
                return ids[start + size : start + size + k]
    return []


class Trail:
    """What the memory heads read along each node's path of a trie, apart from the trie's scores
    and keys.  A popup list keeps it for every name it scored, to show the support of whichever
    names it lists later (``completer._Listed``); keeping the whole trie instead would hold its
    ``(N, V)`` log-probabilities and its own copy of the prompt's keys and values, about 40 MB
    at 96 nodes after a 384-token prompt, for every document whose list came from a trie."""

    def __init__(self, first: Evidence | None, parents: list[int], reads: list[Read]) -> None:
        self.first, self.parents, self.reads = first, parents, reads  # ``first``: the context's own

    def path(self, node: int) -> list[int]:
        """The nodes from the context's child down to ``node``."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def evidence(self, node: int) -> Evidence | None:
        return Evidence.of(self.reads, 0, node)

    def along(self, node: int) -> list[Evidence | None]:
        """The context's evidence, then each node's down to ``node``."""
        return [self.first] + [self.evidence(j) for j in self.path(node)]


class Tree:
    """Token sequences sharing a context, read as one trie in one call (``Decoder.tree``): node
    ``i`` is token ``tokens[i]`` read after the context and the nodes up to ``parents[i]``
    (-1: the context itself)."""

    def __init__(self, ctx: Context, tokens: list[int], parents: list[int], logits: Tensor,
                 kv: list[KV], reads: list[Read]) -> None:
        self.ctx, self.tokens = ctx, tokens
        self.logits = logits  # (N, V): log-probabilities of the token after each node
        self._kv = kv
        self.trail = Trail(ctx.evidence, parents, reads)  # the trie's shape and memory reads

    @property
    def parents(self) -> list[int]:
        return self.trail.parents

    def path(self, node: int) -> list[int]:
        return self.trail.path(node)

    def evidence(self, node: int) -> Evidence | None:
        return self.trail.evidence(node)

    def context(self, node: int) -> Context:
        """The context followed by the tokens down to ``node``, as if read one at a time: the
        keys and values of the path's nodes, gathered after the context's."""
        path = self.path(node)
        n = len(self.ctx.ids)
        at = torch.cat((torch.arange(n), n + torch.tensor(path))).to(self._kv[0].keys.device)
        kv = [KV(layer.keys.index_select(2, at), layer.values.index_select(2, at)) for layer in self._kv]
        return Context(self.ctx.ids + [self.tokens[j] for j in path], kv, self.logits[node],
                       self.evidence(node), self.ctx.memory, self.ctx.clean)


class Decoder:
    """One model, read incrementally.  Not thread-safe: the server runs it on one worker."""

    def __init__(self, model: MemorizingTransformer, tok: Tokenizer, *, window: int = 2048,
                 chunk: int = 512, memory_tail: int = 16, copy: bool = True) -> None:
        """``copy``: mix the memory's kNN copy into the next-token distribution, as the model
        was trained to (off only to measure what the copy itself does)."""
        self.model = model
        self.copy = copy
        self.tok = tok
        self.device = next(model.parameters()).device
        self.window = min(window, model.cfg.max_context)  # prompt + completion, at most
        self.chunk = chunk  # a long prompt is read this many tokens at a time (cancellable)
        # Only a prompt's last ``memory_tail`` tokens read the memory: every position costs a
        # search per memory head, and the scores asked for are those at the end.
        self.memory_tail = memory_tail
        self.constraints = _TokenTable(tok)

    def prefill(
        self,
        ids: list[int],
        memory: Memory | None,
        reuse: Context | None = None,
        cancel: threading.Event | None = None,
    ) -> Context:
        """Read ``ids``, reusing ``reuse``'s keys/values for the prefix the two share."""
        if not ids:
            raise ValueError("an empty prompt")
        if len(ids) > self.window:
            raise ValueError(f"a prompt of {len(ids)} tokens exceeds the {self.window}-token window")
        version = memory_version(memory)
        n = common_prefix(reuse.ids, ids) if reuse is not None else 0
        tail_from = len(ids) - self.memory_tail
        if reuse is not None and reuse.memory != version:
            # another memory, or the memory changed (a function was just stored): the positions
            # that read the old one, and this prompt's tail, read the memory as it is now
            n = min(n, reuse.clean, max(0, tail_from))
        elif reuse is not None and n == len(ids) == len(reuse.ids):
            return reuse
        n = min(n, len(ids) - 1)  # the last token is always run: its scores are the answer
        past = reuse.truncated(n) if reuse is not None and n else None
        out = None
        for start in range(n, len(ids), self.chunk):
            check(cancel)
            piece = ids[start : start + self.chunk]
            reads = memory if start + len(piece) > tail_from else None
            out = self._forward([piece], past, reads, memory_from=max(0, tail_from - start))
            past = out.kv
        assert out is not None
        kept_clean = min(n, reuse.clean) if reuse is not None else 0
        clean = kept_clean if kept_clean < n else len(ids) if memory is None else max(n, tail_from)
        return Context(list(ids), out.kv, out.logits[0, -1], Evidence.of(out.reads, 0), version, clean)

    def step(self, ctxs: list[Context], tokens: list[int], memory: Memory | None) -> list[Context]:
        """Append one token to each context, as one batch when they have the same length."""
        if len({len(c.ids) for c in ctxs}) != 1:
            return [self.step([c], [t], memory)[0] for c, t in zip(ctxs, tokens, strict=True)]
        if len(ctxs[0].ids) + 1 > self.window:
            raise ValueError("the completion ran past the context window")
        one = len(ctxs) == 1
        # the contexts as one batch, copied once, with room for the token this step appends
        past = ctxs[0].kv if one else [KV.join([c.kv[i] for c in ctxs], room=1) for i in range(len(ctxs[0].kv))]
        out = self._forward([[t] for t in tokens], past, memory)
        return [
            Context(c.ids + [t], out.kv if one else [KV(kv.keys[b : b + 1], kv.values[b : b + 1]) for kv in out.kv],
                    out.logits[b, -1], Evidence.of(out.reads, b), c.memory, c.clean)
            for b, (c, t) in enumerate(zip(ctxs, tokens, strict=True))
        ]

    def extend(self, ctx: Context, tokens: list[int], memory: Memory | None) -> list[Context]:
        """``ctx`` followed by ``tokens[:1]``, ``tokens[:2]``, ...: all read in one forward pass.
        Decoding checks a guess of the next few tokens this way (``guess``): on the CPU a pass
        over 4 tokens costs little more than one step (38 against 29 ms, flask memory), so every
        right guess saves a step."""
        n, T = len(ctx.ids), len(tokens)
        if n + T > self.window:
            raise ValueError("the completion ran past the context window")
        out = self._forward([tokens], ctx.kv, memory, last_only=False)
        return [Context(ctx.ids + tokens[: i + 1], [KV(kv.keys[:, :, : n + i + 1], kv.values[:, :, : n + i + 1], kv.buffer)
                                                     for kv in out.kv],
                        out.logits[0, i], Evidence.of(out.reads, 0, i), ctx.memory, ctx.clean)
                for i in range(T)]

    def tree(self, ctx: Context, tokens: list[int], parents: list[int], memory: Memory | None) -> Tree:
        """Read a trie of continuations of ``ctx`` in one forward pass: every node after the
        context and its own ancestors, at the position its depth gives it.  Each node's parent
        comes before it (``parents[i] < i``; -1 for the context's children)."""
        N = len(tokens)
        reads = torch.zeros(N, N, dtype=torch.bool)
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}'s parent {p} does not come before it")
            if p >= 0:
                reads[i] = reads[p]
            reads[i, i] = True
        if len(ctx.ids) + int(reads.sum(-1).max()) > self.window:
            raise ValueError("the trie runs past the context window")
        out = self._forward([tokens], ctx.kv, memory, last_only=False, tree=reads.to(self.device))
        return Tree(ctx, list(tokens), list(parents), out.logits[0], out.kv, out.reads)

    def _forward(self, rows: list[list[int]], past: list[KV] | None, memory: Memory | None, memory_from: int = 0,
                 *, last_only: bool = True, tree: Tensor | None = None):
        x = torch.tensor(rows, device=self.device)
        with torch.inference_mode():
            return self.model(x, past=past, memory=memory, last_only=last_only, memory_from=memory_from, tree=tree,
                              copy=self.copy)


class _TokenTable:
    """Which tokens are consistent with bytes that must come next (token healing)."""

    def __init__(self, tok: Tokenizer) -> None:
        pairs = sorted((b, i) for i, b in enumerate(tok.token_bytes) if b)
        self._sorted = [b for b, _ in pairs]
        self._ids = [i for _, i in pairs]
        self._exact = {b: i for b, i in pairs}
        self.vocab = tok.vocab_size

    def allowed(self, required: bytes) -> list[int]:
        """Tokens that start with ``required`` or are a proper prefix of it."""
        lo = bisect.bisect_left(self._sorted, required)
        hi = len(self._sorted)
        head = required.rstrip(b"\xff")
        if head:  # the least byte string above every string that starts with ``required``
            hi = bisect.bisect_left(self._sorted, head[:-1] + bytes([head[-1] + 1]))
        ids = self._ids[lo:hi]
        ids += [i for n in range(1, len(required)) if (i := self._exact.get(required[:n])) is not None]
        return ids

    def mask(self, required: bytes, device: torch.device) -> Tensor:
        """Additive score mask: 0 for allowed tokens, -inf for the rest."""
        m = torch.full((self.vocab,), float("-inf"), device=device)
        allowed = self.allowed(required)
        if allowed:
            m[allowed] = 0.0
        return m

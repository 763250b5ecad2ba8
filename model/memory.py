"""The seam between the memorizing transformer and whatever holds its memory.

A memory head only ever asks one question: "for these queries, which stored (key, value) pairs
of my key/value head score highest, what are they, and which tokens were they?"  ``Memory`` is
that question as a protocol.  In training and evaluation the answer comes from ``TensorMemory``
(entries in tensors, searched exactly by a matrix product); in the product it comes from the
persistent per-project store.  The model never knows which.

Shapes: ``slot`` names one stored key/value head (an index into ``cfg.memory_kv_heads``);
queries are ``(B, G, T, D)`` for the G memory heads that share it.  Layers are searched one
after the other, since a layer's queries exist only once the layers below have run.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import faiss
import torch
from torch import Tensor


class Retrieved(NamedTuple):
    """Top-k entries per query: keys/values ``(B, G, T, k, D)``, mask and tokens ``(B, G, T, k)``.

    ``mask`` is False where fewer than k entries exist; those carry arbitrary numbers and get no
    attention.  ``source`` ``(B, G, T, k)`` int64 is the memory's own id of each hit (-1: none),
    passed through untouched so a completion can say where its evidence came from (the product's
    store packs file and byte offset into it).
    """

    keys: Tensor
    values: Tensor
    mask: Tensor
    tokens: Tensor
    source: Tensor


class Memory(Protocol):
    def search(self, slot: int, queries: Tensor, k: int) -> Retrieved:
        """The k best entries of key/value head ``slot`` by inner product, per query (no gradient)."""
        ...


class TensorMemory:
    """Entries held in tensors, searched exactly; entries of hidden files are left out.

    Why a file id per entry and a hidden set: evaluation and training score a file against the
    memory of the rest of its repository, one file after the other, without rebuilding it.
    """

    def __init__(self, keys: Tensor, values: Tensor, tokens: Tensor, files: Tensor | None = None) -> None:
        """``keys``/``values`` ``(S, N, D)``, ``tokens`` ``(N,)``, ``files`` ``(N,)`` file ids."""
        if keys.shape != values.shape or keys.dim() != 3 or tokens.shape != keys.shape[1:2]:
            raise ValueError(f"entries must be (S, N, D) keys and values and (N,) tokens; got "
                             f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(tokens.shape)}")
        self.keys, self.values, self.tokens = keys, values, tokens.long()
        self.files = files if files is not None else torch.zeros(keys.shape[1], dtype=torch.long)
        self.hidden: Tensor | None = None  # (N,) True where left out
        self._f32: list | None = None
        self._keep: Tensor | None = None

    def __len__(self) -> int:
        return self.keys.shape[1]

    def hide(self, file_ids: list[int]) -> None:
        """Leave these files' entries out of later searches (``[]``: none)."""
        self.hidden = torch.isin(self.files, torch.tensor(file_ids, dtype=self.files.dtype)) if file_ids else None
        self._keep = None

    @torch.no_grad()
    def search(self, slot: int, queries: Tensor, k: int) -> Retrieved:
        B, G, T, D = queries.shape
        keys = self.keys[slot]
        n = keys.shape[0]
        q = queries.detach().reshape(-1, D)
        if keys.device.type == "cpu" and n:
            # faiss's blocked exact search: far faster on a CPU than a full score matrix + topk
            # (and it never holds that matrix); hidden entries are left out of the searched set.
            if self.hidden is not None and not len(self._kept()):
                idx = torch.zeros((q.shape[0], 0), dtype=torch.long)  # everything is hidden
            elif self.hidden is not None:
                keep = self._kept()
                sub = self._float_keys(slot)[keep.numpy()]
                scores, idx = faiss.knn(q.float().numpy(), sub, min(k, len(sub)), metric=faiss.METRIC_INNER_PRODUCT)
                idx = torch.from_numpy(idx)
                idx = torch.where(idx >= 0, keep[idx.clamp(min=0)], -1)
            else:
                scores, idx = faiss.knn(q.float().numpy(), self._float_keys(slot), min(k, n),
                                        metric=faiss.METRIC_INNER_PRODUCT)
                idx = torch.from_numpy(idx)
        else:
            scores = q.to(keys.dtype) @ keys.T
            if self.hidden is not None:
                scores.masked_fill_(self.hidden.to(scores.device), float("-inf"))
            best, idx = scores.float().topk(min(k, n), dim=-1)
            idx = idx.masked_fill(~torch.isfinite(best), -1)
        if idx.shape[1] < k:  # fewer entries than k: pad with empty hits
            idx = torch.cat((idx, torch.full((idx.shape[0], k - idx.shape[1]), -1, dtype=idx.dtype)), 1)
        idx = idx[:, :k].to(keys.device)
        ok = idx >= 0
        safe = idx.clamp(min=0)
        shape = (B, G, T, k)
        if n == 0:
            zeros = torch.zeros(*shape, D, dtype=queries.dtype)
            return Retrieved(zeros, zeros, ok.view(shape), torch.full(shape, -1), torch.full(shape, -1))
        return Retrieved(
            keys[safe].view(*shape, D),
            self.values[slot][safe].view(*shape, D),
            ok.view(shape),
            torch.where(ok, self.tokens[safe], -1).view(shape),
            idx.view(shape),
        )

    def _kept(self) -> Tensor:
        """Indices of the entries not hidden (cached until ``hide`` changes)."""
        if self._keep is None:
            self._keep = torch.nonzero(~self.hidden).flatten()
        return self._keep

    def _float_keys(self, slot: int):
        """The slot's keys as a contiguous float32 array (cached: faiss reads float32)."""
        if self._f32 is None:
            self._f32 = [None] * self.keys.shape[0]
        if self._f32[slot] is None:
            self._f32[slot] = self.keys[slot].float().contiguous().numpy()
        return self._f32[slot]

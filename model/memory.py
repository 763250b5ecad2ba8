"""The seam between the memorizing transformer and whatever holds its memory.

The kNN-augmented layer only ever asks one question: "for these queries, which stored
(key, value) pairs score highest, and what are they?"  ``Memory`` is that question as a
protocol.  During training the answer comes from ``TensorMemory`` (one ring buffer per batch
slot, searched exactly by a matrix product on the accelerator); in the product it comes from the
persistent per-project store.  The model never knows which.

Shapes: queries are ``(B, H, T, D)`` with ``H`` query heads; a memory stores ``Hkv`` key/value
heads (1 for the compact shared head), and query head ``h`` searches key head ``h // (H // Hkv)``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class Retrieved(NamedTuple):
    """Top-k memories for every query: keys/values ``(B, H, T, k, D)``, mask ``(B, H, T, k)``.

    ``mask`` is False where fewer than k entries exist (an empty or young memory); those slots
    carry arbitrary keys and must get zero attention weight.
    """

    keys: Tensor
    values: Tensor
    mask: Tensor


class Memory(Protocol):
    """Anything that can answer a batched top-k query with stored (key, value) pairs."""

    def search(self, queries: Tensor, k: int) -> Retrieved:
        """Return the k best entries by inner product for each query (no gradient)."""
        ...


class TensorMemory:
    """Per-slot ring buffers of memory entries, searched exactly on the device.

    Why this shape: each training batch slot streams its own document, so each needs its own
    memory, cleared when a new document starts.  All slots write the same number of tokens per
    step, so one shared write pointer serves every slot and every operation is a batched tensor
    op: no Python loop over slots, which is what made earlier memorizing implementations slow.
    A validity mask (rather than per-slot counters) covers resets and padding alike.
    """

    def __init__(
        self,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_elements: int = 1 << 26,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"memory capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.keys = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(batch, capacity, device=device, dtype=torch.bool)
        self.ptr = 0
        # Bounds the (queries x capacity) score matrix held at once during search.
        self.chunk_elements = chunk_elements

    @property
    def size(self) -> Tensor:
        """Number of live entries per slot."""
        return self.valid.sum(dim=1)

    def reset(self, slots: Tensor | None = None) -> None:
        """Forget everything in the given slots (bool mask ``(B,)``), or in all slots."""
        if slots is None:
            self.valid.zero_()
        else:
            self.valid.masked_fill_(slots.to(self.valid.device, torch.bool)[:, None], False)

    @torch.no_grad()
    def add(self, keys: Tensor, values: Tensor, valid: Tensor | None = None) -> None:
        """Append ``(B, Hkv, n, D)`` entries; the oldest are overwritten once full.

        ``valid`` ``(B, n)`` marks which positions are real tokens (padding is not memorised).
        """
        n = keys.shape[2]
        if n > self.capacity:  # only the newest `capacity` entries can survive anyway
            keys, values = keys[:, :, -self.capacity :], values[:, :, -self.capacity :]
            valid = None if valid is None else valid[:, -self.capacity :]
            n = self.capacity
        pos = (self.ptr + torch.arange(n, device=self.keys.device)) % self.capacity
        self.keys.index_copy_(2, pos, keys.to(self.keys.dtype))
        self.values.index_copy_(2, pos, values.to(self.values.dtype))
        flags = torch.ones(keys.shape[0], n, dtype=torch.bool, device=self.valid.device)
        if valid is not None:
            flags = valid.to(self.valid.device, torch.bool)
        self.valid[:, pos] = flags
        self.ptr = (self.ptr + n) % self.capacity

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> Retrieved:
        B, H, T, D = queries.shape
        Hkv, M = self.keys.shape[1], self.capacity
        k = min(k, M)
        group = H // Hkv
        # (B, Hkv, group*T, D): all query heads sharing a key head form one matmul.
        q = queries.to(self.keys.dtype).reshape(B, Hkv, group * T, D)
        dead = ~self.valid[:, None, None, :]  # (B, 1, 1, M)
        rows = max(1, self.chunk_elements // max(1, B * Hkv * M))
        top_idx = []
        top_ok = []
        for start in range(0, group * T, rows):
            scores = q[:, :, start : start + rows] @ self.keys.transpose(-1, -2)
            scores = scores.float().masked_fill_(dead, float("-inf"))
            best, idx = scores.topk(k, dim=-1)
            top_idx.append(idx)
            top_ok.append(torch.isfinite(best))
        idx = torch.cat(top_idx, dim=2)  # (B, Hkv, group*T, k)
        ok = torch.cat(top_ok, dim=2)
        # Gather rows from the flattened store: offset each (slot, head) block by its base row.
        base = (torch.arange(B * Hkv, device=idx.device) * M).view(B, Hkv, 1, 1)
        flat = (idx + base).reshape(-1)
        keys = self.keys.reshape(-1, D).index_select(0, flat).view(B, H, T, k, D)
        values = self.values.reshape(-1, D).index_select(0, flat).view(B, H, T, k, D)
        return Retrieved(keys, values, ok.view(B, H, T, k))

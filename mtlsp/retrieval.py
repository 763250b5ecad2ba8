"""The model's memory, answered by a workspace's ``MemoryStore``.

The memorizing transformer asks its memory one batched question (``Memory.search``); this
adapter turns the model's query tensor into a store search and the hits back into tensors, and
keeps the last hits so that a completion can say which files and lines supported it.
"""

from __future__ import annotations

import numpy as np
import torch
from mtlsp_model.memory import Retrieved
from mtlsp_model.model import KV
from torch import Tensor

from .memory import Hits, MemoryStore
from .memory_files import Entries, StoreError


class StoreMemory:
    """``mtlsp_model.memory.Memory`` over a ``MemoryStore`` (one shared key/value head)."""

    def __init__(self, store: MemoryStore, hide: tuple[str, ...] = ()) -> None:
        self.store = store
        self.hide = hide  # files this view leaves out (evaluation: the file being scored)
        self.last: Hits | None = None  # hits of the latest search, for provenance

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> Retrieved:
        B, H, T, D = queries.shape
        if D != self.store.dim:
            raise StoreError(f"model queries have {D} dims, the memory store holds {self.store.dim}")
        hits = self.store.search(queries.detach().float().cpu().numpy().reshape(-1, D), k, hide=self.hide)
        self.last = hits
        shape = (B, H, T, k)
        keys = torch.from_numpy(hits.keys).view(*shape, D).to(queries.device, queries.dtype)
        values = torch.from_numpy(hits.values).view(*shape, D).to(queries.device, queries.dtype)
        mask = torch.from_numpy(hits.mask).view(shape).to(queries.device)
        return Retrieved(keys, values, mask)


def entries_from_kv(kv: KV, offsets: np.ndarray) -> Entries:
    """Storage entries from the model's ``encode`` output for one text, ``(1, 1, n, D)``."""
    if kv.keys.shape[0] != 1 or kv.keys.shape[1] != 1:
        raise StoreError(
            f"the memory store holds one shared key/value head per token; got entries shaped {tuple(kv.keys.shape)}"
        )
    keys = kv.keys[0, 0].float().cpu().numpy()
    values = kv.values[0, 0].float().cpu().numpy()
    return Entries.from_float(keys, values, offsets)

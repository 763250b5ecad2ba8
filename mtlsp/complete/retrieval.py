"""The model's memory, answered by a workspace's ``MemoryStore``.

The memorizing transformer asks its memory one question per memory key/value head and layer
(``Memory.search``); this adapter turns the model's query tensor into a store search of that
head and the hits back into tensors.  Each hit's source is its file id and byte offset packed
into one integer, so the decoder can hand back its evidence and a completion can say which
files and lines supported it, even if the store changes in between (file ids never change
meaning).
"""

from __future__ import annotations

import torch
from mtlsp_model.memory import Retrieved
from torch import Tensor

from ..store.files import StoreError
from ..store.memory_store import MemoryStore

_OFFSET_BITS = 32


class StoreMemory:
    """``mtlsp_model.memory.Memory`` over a ``MemoryStore``."""

    def __init__(self, store: MemoryStore, hide: tuple[str, ...] = ()) -> None:
        self.store = store
        self.hide = hide  # files this view leaves out (evaluation: the file being scored)

    @property
    def version(self) -> tuple[int, tuple[str, ...]]:
        """Changes whenever a search could answer differently: a model state that read the
        memory before is then read again (``decode.memory_version``)."""
        return self.store.generation, self.hide

    @torch.no_grad()
    def search(self, slot: int, queries: Tensor, k: int) -> Retrieved:
        B, G, T, D = queries.shape
        if D != self.store.dim:
            raise StoreError(f"model queries have {D} dims, the memory store holds {self.store.dim}")
        q = queries.detach().float().cpu().numpy().reshape(-1, D)
        hits = self.store.search_head(slot, q, k, hide=self.hide)
        shape = (B, G, T, k)
        mask = torch.from_numpy(hits.slots >= 0)
        source = torch.from_numpy((hits.file_ids.astype("int64") << _OFFSET_BITS) | hits.offsets.astype("int64"))
        return Retrieved(
            torch.from_numpy(hits.keys).view(*shape, D).to(queries.device, queries.dtype),
            torch.from_numpy(hits.values).view(*shape, D).to(queries.device, queries.dtype),
            mask.view(shape).to(queries.device),
            torch.from_numpy(hits.tokens).view(shape).to(queries.device),
            source.masked_fill(~mask, -1).view(shape),
        )

    def where(self, source: int) -> tuple[str, int]:
        """(path, byte offset) of a hit's ``source``."""
        return self.store.path_of(source >> _OFFSET_BITS), source & ((1 << _OFFSET_BITS) - 1)

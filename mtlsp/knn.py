"""Top-k inner-product search over memory entries, addressed by slot number.

The store keeps every entry in a numbered slot and hands each index here the slot numbers as
ids.  ``ExactIndex`` (faiss ``IndexIDMap2`` over ``IndexFlatIP``) is the source of truth on
every machine.  A mirror may answer searches instead:

- ``TorchMirror``: exact search by a matrix product in torch, for CUDA when faiss has no GPU;
- ``FlatMirror`` over a faiss GPU flat index, when the installed faiss has GPU support;
- ``IvfMirror``: an approximate IVF index on the CPU once the store is large, its ``nprobe``
  chosen by measuring recall@k against the exact index.

Removal is two-step everywhere: ``remove`` hides slots from searches at once (a tombstone),
``purge`` frees them physically later, in bulk.  Physically removing from a flat faiss index
moves every later vector (and ``IndexIDMap2`` rebuilds its whole reverse map), tens of
milliseconds at a million entries, which one edit must not pay.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import torch


def _tombstone_params(dead: set[int], params_cls=faiss.SearchParameters, **kw):
    """faiss search parameters that hide ``dead`` slots; the selectors are kept alive with it."""
    batch = faiss.IDSelectorBatch(np.fromiter(dead, dtype=np.int64, count=len(dead)))
    sel = faiss.IDSelectorNot(batch)
    params = params_cls(sel=sel, **kw)
    params._keep = (batch, sel)  # SWIG holds raw pointers to these
    return params


class ExactIndex:
    """The source of truth: exact inner-product search in faiss, ids = slots."""

    name = "faiss-cpu exact"

    def __init__(self, dim: int) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.dead: set[int] = set()
        self._params = None

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), slots.astype(np.int64))

    def remove(self, slots: np.ndarray) -> None:
        self.dead.update(slots.tolist())
        self._params = None

    def purge(self) -> np.ndarray:
        """Physically drop tombstoned slots; returns them, now free for reuse."""
        dead = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        if dead.size:
            self.index.remove_ids(dead)
        self.dead.clear()
        self._params = None
        return dead

    def search(self, queries: np.ndarray, k: int, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``hidden``: slots to leave out of this search only (evaluation's leave-one-file-out)."""
        if hidden is not None and hidden.size:
            return self.index.search(queries, k, params=_tombstone_params(self.dead | set(hidden.tolist())))
        if self.dead and self._params is None:
            self._params = _tombstone_params(self.dead)
        return self.index.search(queries, k, params=self._params)

    @property
    def live(self) -> int:
        return self.index.ntotal - len(self.dead)


class TorchMirror:
    """Exact search as one matrix product and a top-k in torch (CUDA, or CPU in tests).

    Keys sit in a slot-indexed tensor with an ``alive`` mask, so removal is immediate and
    ``purge`` has nothing to do.
    """

    def __init__(self, dim: int, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.keys = torch.zeros(0, dim, device=device, dtype=self.dtype)
        self.alive = torch.zeros(0, device=device, dtype=torch.bool)
        self.name = f"torch exact ({device.type})"

    def _reserve(self, n: int) -> None:
        if n <= self.keys.shape[0]:
            return
        cap = max(n, 2 * self.keys.shape[0], 1024)
        keys = torch.zeros(cap, self.keys.shape[1], device=self.device, dtype=self.dtype)
        keys[: self.keys.shape[0]] = self.keys
        alive = torch.zeros(cap, device=self.device, dtype=torch.bool)
        alive[: self.alive.shape[0]] = self.alive
        self.keys, self.alive = keys, alive

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        if not slots.size:
            return
        self._reserve(int(slots.max()) + 1)
        idx = torch.from_numpy(slots.astype(np.int64)).to(self.device)
        self.keys[idx] = torch.from_numpy(np.asarray(keys, dtype=np.float32)).to(self.device, self.dtype)
        self.alive[idx] = True

    def remove(self, slots: np.ndarray) -> None:
        if slots.size:
            self.alive[torch.from_numpy(slots.astype(np.int64)).to(self.device)] = False

    def purge(self) -> None:
        """Nothing to do: removal already freed the rows."""

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)).to(self.device, self.dtype)
        kk = min(k, self.keys.shape[0])
        if kk == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        scores = (q @ self.keys.T).float().masked_fill_(~self.alive, float("-inf"))
        best, idx = scores.topk(kk, dim=1)
        idx = idx.masked_fill_(~torch.isfinite(best), -1)
        D = np.full((len(queries), k), -np.inf, np.float32)
        I = np.full((len(queries), k), -1, np.int64)
        D[:, :kk], I[:, :kk] = best.cpu().numpy(), idx.cpu().numpy()
        return D, I


class FlatMirror:
    """A mirror of the truth in a faiss flat index that cannot remove (faiss GPU indexes).

    Removed slots are filtered out of an over-fetched result; once too many are hidden that
    way, the mirror is rebuilt from the truth's live entries.
    """

    max_hidden = 1024

    def __init__(self, make_index, name: str) -> None:
        self.make_index = make_index
        self.index = faiss.IndexIDMap(make_index())
        self.hidden: set[int] = set()
        self.name = name

    def rebuild(self, slots: np.ndarray, keys: np.ndarray) -> None:
        self.index = faiss.IndexIDMap(self.make_index())
        self.hidden.clear()
        self.add(slots, keys)

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        if slots.size:
            self.index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), slots.astype(np.int64))

    def remove(self, slots: np.ndarray) -> None:
        self.hidden.update(slots.tolist())

    @property
    def needs_rebuild(self) -> bool:
        return len(self.hidden) > self.max_hidden

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k + len(self.hidden))
        if not self.hidden:
            return D, I
        keep = ~np.isin(I, np.fromiter(self.hidden, np.int64, len(self.hidden)))
        keep &= I >= 0
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept hits first, in score order
        D, I, keep = (np.take_along_axis(a, order, axis=1) for a in (D, I, keep))
        return np.where(keep, D, -np.inf).astype(np.float32), np.where(keep, I, -1)


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_gpu_mirror(dim: int) -> FlatMirror:
    res = faiss.StandardGpuResources()
    return FlatMirror(lambda: faiss.GpuIndexFlatIP(res, dim), "faiss-gpu exact")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k ids that the approximate top-k also found."""
    hits = total = 0
    for a, e in zip(approx, exact):
        e = e[e >= 0]
        hits += np.isin(e, a).sum()
        total += e.size
    return float(hits / total) if total else 1.0


class IvfMirror:
    """Approximate search: inverted lists over k-means cells, fp16 codes, inner product.

    Built from a snapshot of the live entries (possibly on a background thread: faiss releases
    the GIL), then kept current by the same add/remove calls as the truth.  ``tune`` picks the
    smallest ``nprobe`` whose measured recall@k against exact search reaches the target.
    """

    name = "faiss-cpu ivf"

    def __init__(self, slots: np.ndarray, keys: np.ndarray, *, seed: int = 0) -> None:
        """Train and fill from ``keys`` (n, D), fp16 or fp32, stored under ids ``slots``."""
        n, dim = keys.shape
        self.nlist = int(np.clip(2 ** round(np.log2(max(1.0, np.sqrt(n)))), 64, 1024))
        quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, self.nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        self.index.cp.niter = 10
        self.index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = keys[np.sort(rng.choice(n, size=min(n, 48 * self.nlist), replace=False))]
        t0 = time.perf_counter()
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))
        for start in range(0, n, 65_536):  # fp16 keys in, fp32 only a block at a time
            self.add(slots[start : start + 65_536], keys[start : start + 65_536])
        self.build_seconds = time.perf_counter() - t0
        self.built_size = n
        self._quantizer = quantizer  # the IVF index points at it
        self.nprobe = self.nlist
        self.recall = 1.0
        self.dead: set[int] = set()
        self._params = None

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        if slots.size:
            self.index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), slots.astype(np.int64))

    def remove(self, slots: np.ndarray) -> None:
        self.dead.update(slots.tolist())
        self._params = None

    def purge(self) -> None:
        if self.dead:
            self.index.remove_ids(np.fromiter(self.dead, np.int64, len(self.dead)))
        self.dead.clear()
        self._params = None

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, hidden: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if hidden is not None and hidden.size:
            params = _tombstone_params(self.dead | set(hidden.tolist()), faiss.SearchParametersIVF,
                                       nprobe=nprobe or self.nprobe)
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        if nprobe is not None:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            if self.dead:
                params = _tombstone_params(self.dead, faiss.SearchParametersIVF, nprobe=nprobe)
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        if self._params is None:
            self._params = (
                _tombstone_params(self.dead, faiss.SearchParametersIVF, nprobe=self.nprobe)
                if self.dead
                else faiss.SearchParametersIVF(nprobe=self.nprobe)
            )
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=self._params)

    def tune(self, queries: np.ndarray, exact_ids: np.ndarray, k: int, target: float) -> float:
        """Smallest power-of-two nprobe with recall@k >= target; returns the recall reached."""
        nprobe = 1
        while True:
            recall = recall_at_k(self.search(queries, k, nprobe)[1], exact_ids)
            if recall >= target or nprobe >= self.nlist:
                break
            nprobe *= 2
        self.nprobe, self.recall = min(nprobe, self.nlist), recall
        self._params = None
        return recall

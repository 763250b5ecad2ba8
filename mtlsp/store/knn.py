"""Top-k inner-product search, one memory head at a time, over the store's numbered slots.

A slot holds one token: for each of the model's H memory heads an int8 key with an fp16 scale
(``KeyTable``).  That table is the only exact copy of the keys in RAM.  Exact search scans it,
every other index is built from it, and the IVF indexes rescore their candidates with it.  At a million tokens and four heads, fp32 copies would
take a gigabyte per index.  Memory head h searches only head h's keys.  A ``Searcher`` answers
(H, nq, D) queries (or those of some heads) with (H, nq, k) hits, and runs the indexes'
lifecycle:

- exact search (``top_k``): the truth everywhere, and what answers when nothing else can;
- ``TorchMirror``: exact search by a batched matrix product in torch, for CUDA when faiss has
  no GPU;
- ``FlatMirror``: faiss GPU flat indexes, when the installed faiss has GPU support;
- ``IvfIndex``: an approximate IVF index per head on the CPU once the store is large: 8-bit
  codes in its lists, its candidates rescored from the key table.  Each head's ``nprobe`` is
  chosen by measuring its recall@k against exact search.  Built on a background thread, one
  head at a time; after a restart, filled from the cells and list numbers the last build
  saved (``cells.py``) instead of trained again.

Slot numbers are shared by all heads: one slot is one token.  Removal is two-step for the
indexes that hold their own copies.  ``remove`` hides slots at once: exact search and the
torch mirror by an alive mask, IVF searches by a faiss selector, the flat mirror by filtering
its hits.  ``purge`` frees the slots later, in bulk, so that they can be reused.  Removing
from a faiss index scans or moves every list, which one edit must not pay.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import faiss
import numpy as np
import torch

from .cells import HeadCells, SavedCells
from .files import StoreError, dequantize

log = logging.getLogger("mtlsp.memory")

_MIN_IVF_ENTRIES = 8192  # below this an exact scan is as fast as probing IVF lists
_BLOCK = 65_536  # keys dequantised to fp32 at a time when filling an index
_SCAN_BLOCK = 16_384  # keys per step of an exact scan: the fp32 block stays in cache
_QUERY_GROUP = 8  # queries scored together by an exact scan
_PROBE_QUERIES = 256  # queries per head the IVF recall is measured on
_RERANK = 2  # an IVF search rescores this many times k candidates exactly (``IvfIndex``)
_RANGE_MARGIN = 0.05  # an IVF head's 8-bit range spans its keys' and this share more on each side
_SPLIT_QUERIES = 32  # a CPU search of this many queries or more runs in pieces, one per core


def in_pieces(search: Callable[[slice], tuple[np.ndarray, np.ndarray]], n: int,
              ways: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``search(slice(0, n))`` over ``n`` queries, for many queries split by rows across ``ways``
    threads (the model's own count by default), answered the same.  The CPU searches run
    single-threaded (see ``top_k`` and ``IvfIndex.search``), which is right for a decoding
    step's few queries; a trie of 96 names asks 768 at once while the model waits for them,
    and one core then does all the work.  ``search`` may not call torch (see
    ``IvfIndex.search``); faiss and numpy release the interpreter lock."""
    ways = 1 if n < _SPLIT_QUERIES else min(ways or torch.get_num_threads(), n)
    if ways < 2:
        return search(slice(0, n))
    cuts = np.linspace(0, n, ways + 1).astype(int)
    rest = [_pool().submit(search, slice(a, b)) for a, b in zip(cuts[1:-1], cuts[2:])]
    got = [search(slice(0, int(cuts[1])))] + [f.result() for f in rest]
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="mtlsp-search")
        return _POOL


class Settings(Protocol):
    """The store options the searcher reads (``memory_store.StoreOptions``); read at each use, so
    that a change takes effect at once."""

    ann_threshold: int
    ann_recall: float
    ann_k: int
    ann_rebuild_fraction: float
    ann_background: bool


class KeyTable:
    """Every slot's keys: int8 ``codes`` (H, cap, D), fp16 ``scales`` (H, cap), ``alive`` (cap,).

    Head-major, so that one head's keys are contiguous for an exact scan.  ``used`` bounds the
    slots ever written: scans stop there.
    """

    def __init__(self, heads: int, dim: int) -> None:
        self.codes = np.zeros((heads, 0, dim), np.int8)
        self.scales = np.zeros((heads, 0), np.float16)
        self.alive = np.zeros(0, bool)
        self.used = 0

    @property
    def heads(self) -> int:
        return self.codes.shape[0]

    @property
    def dim(self) -> int:
        return self.codes.shape[2]

    def reserve(self, cap: int) -> None:
        """Grow to ``cap`` slots, one array at a time: the peak is one array's copy, not all."""
        n = self.alive.shape[0]
        if cap <= n:
            return
        codes = np.zeros((self.heads, cap, self.dim), np.int8)
        codes[:, :n] = self.codes
        self.codes = codes
        scales = np.zeros((self.heads, cap), np.float16)
        scales[:, :n] = self.scales
        self.scales = scales
        alive = np.zeros(cap, bool)
        alive[:n] = self.alive
        self.alive = alive

    def put(self, slots: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        """Write entries' keys, ``codes`` (n, H, D) and ``scales`` (n, H), into (not yet alive) slots."""
        if slots.size:
            self.codes[:, slots] = codes.transpose(1, 0, 2)
            self.scales[:, slots] = scales.T
            self.used = max(self.used, int(slots.max()) + 1)

    def floats(self, slots: np.ndarray, head: int | None = None) -> np.ndarray:
        """Dequantised keys of ``slots``: (H, n, D), or (n, D) for one head."""
        if head is None:
            return dequantize(self.codes[:, slots], self.scales[:, slots])
        return dequantize(self.codes[head, slots], self.scales[head, slots])

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.alive[: self.used])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run faiss (and the OpenBLAS it bundles) on one OpenMP thread in the calling thread.

    For the index updates an edit waits for (its keys assigned to cells, a purge).  On a shared
    2-core machine a second OpenMP thread mostly waits for a time slice: assigning 2,048 keys
    to 1,024 cells took 28 ms on two threads under load, 4.7 ms on one.  OpenMP settings are
    per thread (libgomp), so background IVF builds keep every thread.  (Searches need no such
    care: nothing they call starts OpenMP threads.)
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def top_k(
    queries: np.ndarray, codes: np.ndarray, scales: np.ndarray, k: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of ``queries`` (nq, D) with dequantised int8 keys (n, D).

    Returns scores and row numbers, (nq, k) each, best first; -inf and -1 past the last hit.
    ``keep`` (n,) masks rows out.  Single-threaded on purpose: on a shared 2-core machine,
    multi-threaded BLAS or OpenMP calls for a handful of queries wait milliseconds on each
    other.  A 3-query scan of 1M keys took 490 ms through two OpenBLAS threads and 24 ms through
    faiss's SIMD ``fvec_inner_products_ny``.  Keys are converted to fp32 a block at a time, in a
    buffer that stays in cache; each score is scaled after its dot product.
    """
    nq, (n, dim) = len(queries), codes.shape
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    buf = np.empty((min(n, _SCAN_BLOCK), dim), np.float32)
    for first in range(0, nq, _QUERY_GROUP):  # a group's scores: 4 MB per query per 1M keys
        group = q[first : first + _QUERY_GROUP]
        scores = np.empty((len(group), n), np.float32)
        for start in range(0, n, _SCAN_BLOCK):
            stop = min(n, start + _SCAN_BLOCK)
            block = buf[: stop - start]
            np.copyto(block, codes[start:stop], casting="unsafe")
            for row, query in zip(scores, group):
                out = row[start:stop]
                faiss.fvec_inner_products_ny(
                    faiss.swig_ptr(out), faiss.swig_ptr(query), faiss.swig_ptr(block), dim, stop - start)
            part = scores[:, start:stop]
            part *= scales[start:stop].astype(np.float32) * np.float32(1 / 127)
            if keep is not None:
                part[:, ~keep[start:stop]] = -np.inf
        for i, row in enumerate(scores, start=first):
            rows = _best(row, k)
            best_s[i, : len(rows)], best_i[i, : len(rows)] = row[rows], rows
    return best_s, best_i


def _best(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the (at most) k largest finite values of ``row``, best first.

    Candidates are the values at or above the 8th best of a 1-in-64 sample: about 512 of them,
    found in one pass over the row, 20x faster than a partition of the whole row at 1M.  Exact
    whenever at least k pass: the k-th best value then passes too.
    """
    candidates = None
    if len(row) >= 64 * 64:
        above = np.flatnonzero(row >= np.partition(row[::64], -8)[-8])
        candidates = above if len(above) >= k else None
    if candidates is None:
        candidates = np.arange(len(row))
    if len(candidates) > k:
        candidates = candidates[np.argpartition(row[candidates], -k)[-k:]]
    candidates = candidates[np.argsort(-row[candidates], kind="stable")]
    return candidates[np.isfinite(row[candidates])]


def _return_freed_memory() -> None:
    """Hand the heap memory freed by an IVF build back to the OS.

    glibc keeps freed small blocks for reuse, and a build frees many (samples, assignments, the
    index it replaces): about 30 MB per head at 1M keys, held for good otherwise.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k ids that the approximate top-k also found."""
    hits = total = 0
    for a, e in zip(approx, exact):
        e = e[e >= 0]
        hits += np.isin(e, a).sum()
        total += e.size
    return float(hits / total) if total else 1.0


def _selector(slots: set[int]) -> tuple:
    """A faiss selector hiding ``slots``, with the objects SWIG only points at kept alive."""
    batch = faiss.IDSelectorBatch(np.fromiter(slots, dtype=np.int64, count=len(slots)))
    sel = faiss.IDSelectorNot(batch)
    return sel, batch


class IvfIndex:
    """Approximate search over one head's keys: inverted lists of 8-bit codes, scanned by inner
    product, in cells found on keys lifted to norm-equalised vectors; the best ``_RERANK`` x k
    then scored exactly from the store's key table.

    Raw attention keys vary in norm, and inner-product k-means lets big centroids swallow the
    cells.  On 1M synthetic keys, recall@32 with 32 of 1,024 cells probed was 0.59.  So the cells come
    from L2 k-means on keys lifted to D+1 dimensions, x -> (x, sqrt(M^2 - |x|^2)) with M the
    largest norm (Bachrach et al., 2014).  A lifted query (q, 0) is then nearest to the cells
    holding its best inner products, which gave recall 0.98 at the same 32 probes.  Lists keep
    each key as D bytes (faiss's per-dimension 8-bit scalar quantizer, its range the head's
    smallest and largest value in each dimension) and are scanned in faiss, which sees the cells
    only as list numbers (``add_core``, ``search_preassigned``).  Those codes alone order close
    keys wrongly (recall@16 0.930-0.973 where fp16 lists reached 0.947-0.996 on pydantic's 1M
    real keys); rescoring twice as many candidates from the key table's exact keys gave fp16's
    recall at every nprobe, in half the RAM (72 instead of 136 bytes per key with its id), for
    a search about 30% slower (``docs/memory.md``).  A key added later with a norm above M lifts
    to (x, 0), and one beyond the trained range is clipped to it: both still found, slightly
    less well, until the rebuild.

    Built from a snapshot of the head's live keys (possibly on a background thread: faiss
    releases the GIL), then kept current by ``add`` and ``purge``; removed slots are hidden by
    the selector the searcher passes.  ``tune`` picks the smallest ``nprobe`` whose measured
    recall@k against exact search reaches the target.
    """

    def __init__(self, slots: np.ndarray, codes: np.ndarray, scales: np.ndarray, table: KeyTable, head: int, *,
                 seed: int = 0, cells: HeadCells | None = None, lists: np.ndarray | None = None) -> None:
        """Train and fill from int8 ``codes`` (n, D) and ``scales`` (n,), stored under ids ``slots``.

        ``table`` and ``head``: where the exact keys of the candidates are read.  With saved
        ``cells`` (``cells.py``) nothing is trained or tuned: the keys go into those cells, into
        the list ``lists`` (n,) gives where it is not -1, else the nearest.
        """
        n, dim = codes.shape
        t0 = time.perf_counter()

        def blocks() -> Iterator[tuple[int, np.ndarray]]:  # fp32 only a block at a time
            for start in range(0, n, _BLOCK):
                yield start, dequantize(codes[start : start + _BLOCK], scales[start : start + _BLOCK])

        self.table, self.head = table, head
        # one pass for the codes' range, and for the largest norm where the cells are trained
        lo, hi, norm = np.full(dim, np.inf, np.float32), np.full(dim, -np.inf, np.float32), 0.0
        for _start, keys in blocks():
            lo, hi = np.minimum(lo, keys.min(axis=0)), np.maximum(hi, keys.max(axis=0))
            if cells is None:
                norm = max(norm, float(np.linalg.norm(keys, axis=1).max()))
        self._cells = faiss.IndexFlatL2(dim + 1)  # lifted centroids: assigns added keys to lists
        if cells is None:
            self.nlist = int(np.clip(2 ** round(np.log2(max(1.0, np.sqrt(n)))), 64, 1024))
            self.max_norm = norm
            pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 48 * self.nlist), replace=False))
            kmeans = faiss.Clustering(dim + 1, self.nlist)
            kmeans.niter, kmeans.seed = 10, seed
            kmeans.train(self._lift(dequantize(codes[pick], scales[pick])), self._cells)
            self.nprobe, self.recall = self.nlist, 1.0  # until ``tune`` measures
        else:
            self.nlist, self.max_norm = cells.nlist, cells.max_norm
            self._cells.add(np.ascontiguousarray(cells.centroids, np.float32))
            self.nprobe, self.recall = cells.nprobe, cells.recall
        lifted = self.centroids
        centroids = np.ascontiguousarray(lifted[:, :dim])  # a query's lift is 0 in the last dim
        self._half_norms = torch.from_numpy(np.ascontiguousarray(0.5 * (lifted**2).sum(axis=1), dtype=np.float32))
        self._centroids_t = torch.from_numpy(np.ascontiguousarray(centroids.T))  # (D, nlist)
        self._quantizer = faiss.IndexFlatIP(dim)  # faiss wants one; lists are chosen by the lifted cells
        self._quantizer.add(centroids)
        self.index = faiss.IndexIVFScalarQuantizer(
            self._quantizer, dim, self.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
        )
        # the quantizer is full already: this trains only the codes' range, from the two extreme
        # vectors (min-max over them is the head's per-dimension range), widened for later keys
        self.index.sq.rangestat_arg = _RANGE_MARGIN
        self.index.train(np.ascontiguousarray(np.stack([lo, hi])))
        known = np.full(n, -1, np.int64) if lists is None else np.asarray(lists, np.int64)
        todo = np.flatnonzero(known < 0)
        self.assigned = len(todo)  # keys put into cells by search now, not by saved list numbers
        for start in range(0, len(todo), _BLOCK):
            part = todo[start : start + _BLOCK]
            known[part] = self._lists_of(dequantize(codes[part], scales[part]))
        self._reserve(np.bincount(known, minlength=self.nlist))
        for start, keys in blocks():
            self._add(slots[start : start + len(keys)], keys, known[start : start + len(keys)])
        self.build_seconds = time.perf_counter() - t0
        self.built_size = n if cells is None else cells.built_size
        self.restored = cells is not None

    @property
    def centroids(self) -> np.ndarray:
        """The lifted centroids (nlist, D+1): what ``cells.HeadCells`` saves."""
        return self._cells.reconstruct_n(0, self.nlist)

    def saved(self) -> HeadCells:
        return HeadCells(self.centroids, self.max_norm, self.nprobe, self.recall, self.built_size, self.build_seconds)

    def list_numbers(self, size: int) -> np.ndarray:
        """Each slot's list (size,) int64, -1 for slots the lists do not hold."""
        out = np.full(size, -1, np.int64)
        invlists = self.index.invlists
        for number in range(self.nlist):
            ids = faiss.rev_swig_ptr(invlists.get_ids(number), invlists.list_size(number))
            out[ids[ids < size]] = number
        return out

    def _lift(self, keys: np.ndarray) -> np.ndarray:
        lift = np.sqrt(np.maximum(self.max_norm**2 - (keys * keys).sum(axis=1), 0.0))
        return np.ascontiguousarray(np.hstack([keys, lift[:, None]]), dtype=np.float32)

    def _lists_of(self, keys: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._cells.search(self._lift(keys), 1)[1][:, 0])

    def _reserve(self, sizes: np.ndarray) -> None:
        """Give each list room for its entries and an eighth more before it is filled.

        Grown by faiss one block of additions at a time, the lists of a 1M-key head took 217 MB
        of RAM for 136 MB of codes and ids; reserved, 191 MB (163 MB once freed memory is
        returned, see ``_return_freed_memory``).  The margin holds the additions expected before
        a purge compacts the lists (tombstones are purged at 5% of the entries).
        """
        for number, size in enumerate(sizes.tolist()):
            self.index.invlists.resize(number, size + size // 8 + 8)  # a vector keeps its capacity
            self.index.invlists.resize(number, 0)

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        if slots.size:
            keys = np.ascontiguousarray(keys, dtype=np.float32)
            self._add(slots, keys, self._lists_of(keys))

    def _add(self, slots: np.ndarray, keys: np.ndarray, lists: np.ndarray) -> None:
        ids = np.ascontiguousarray(slots, dtype=np.int64)  # all named: faiss only gets their pointers
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        self.index.add_core(len(ids), faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def purge(self, slots: np.ndarray) -> None:
        if slots.size:
            self.index.remove_ids(slots.astype(np.int64))

    def search(self, queries: np.ndarray, k: int, sel=None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (nq, D) in the ``nprobe`` best cells, without faiss hiding ``sel``.

        Cells are ranked by one torch product, on this thread (torch called from another
        thread starts a second team of math threads); the lists are scanned by
        ``search_preassigned`` (single-threaded in faiss's default parallel mode: for three
        queries, an OpenMP call on a busy 2-core machine waits ~8 ms for its second thread, 40x
        the search itself), many queries in pieces (``in_pieces``).
        """
        nprobe = min(nprobe or self.nprobe, self.nlist)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        # |lift(q) - c|^2 / 2, less |q|^2 / 2; in torch, whose threads the model keeps warm: numpy's
        # BLAS woke its own threads for 48 queries and waited ~10 ms on the model's
        nearness = (self._half_norms - torch.from_numpy(q) @ self._centroids_t).numpy()
        lists = np.ascontiguousarray(np.argpartition(nearness, nprobe - 1, axis=1)[:, :nprobe], dtype=np.int64)
        return in_pieces(lambda rows: self._scan(q[rows], lists[rows], k, sel, nprobe), len(q))

    def _scan(self, q: np.ndarray, lists: np.ndarray, k: int, sel, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k of each query's cells ``lists``: faiss's 8-bit scores, then exact ones."""
        q, lists = np.ascontiguousarray(q), np.ascontiguousarray(lists)
        cell_scores = np.zeros(lists.shape, np.float32)  # unused for inner product without residuals
        wide = _RERANK * k
        D = np.empty((len(q), wide), np.float32)
        I = np.empty((len(q), wide), np.int64)
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if sel is not None:
            params.sel = sel
        self.index.search_preassigned_c(
            len(q), faiss.swig_ptr(q), wide, faiss.swig_ptr(lists), faiss.swig_ptr(cell_scores),
            faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
        found = I >= 0
        # ``tune`` runs outside the store's lock: a slot reused meanwhile is scored by its new key
        exact = np.einsum("qcd,qd->qc", self.table.floats(np.where(found, I, 0), self.head), q)
        exact[~found] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, best, 1), np.where(np.take_along_axis(found, best, 1),
                                                            np.take_along_axis(I, best, 1), -1)

    def tune(self, queries: np.ndarray, exact_ids: np.ndarray, k: int, target: float) -> float:
        """Smallest power-of-two nprobe with recall@k >= target; returns the recall reached."""
        nprobe = 1
        while True:
            recall = recall_at_k(self.search(queries, k, nprobe=nprobe)[1], exact_ids)
            if recall >= target or nprobe >= self.nlist:
                break
            nprobe *= 2
        self.nprobe, self.recall = min(nprobe, self.nlist), recall
        return recall


class TorchMirror:
    """Exact search of all heads as one batched matrix product and a top-k in torch (CUDA, or
    CPU in tests).  Keys sit in a slot-indexed (H, cap, D) tensor with an ``alive`` mask, so
    removal is immediate and nothing needs purging."""

    needs_purge = False

    def __init__(self, heads: int, dim: int, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.keys = torch.zeros(heads, 0, dim, device=device, dtype=self.dtype)
        self.alive = torch.zeros(0, device=device, dtype=torch.bool)
        self.name = f"torch exact ({device.type})"

    def _reserve(self, n: int) -> None:
        if n <= self.keys.shape[1]:
            return
        cap = max(n, self.keys.shape[1] * 5 // 4, 1024)
        keys = torch.zeros(self.keys.shape[0], cap, self.keys.shape[2], device=self.device, dtype=self.dtype)
        keys[:, : self.keys.shape[1]] = self.keys
        alive = torch.zeros(cap, device=self.device, dtype=torch.bool)
        alive[: self.alive.shape[0]] = self.alive
        self.keys, self.alive = keys, alive

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """``keys`` (H, n, D) float32 for ``slots`` (n,)."""
        if not slots.size:
            return
        self._reserve(int(slots.max()) + 1)
        idx = torch.from_numpy(slots.astype(np.int64)).to(self.device)
        self.keys[:, idx] = torch.from_numpy(keys).to(self.device, self.dtype)
        self.alive[idx] = True

    def remove(self, slots: np.ndarray) -> None:
        if slots.size:
            self.alive[torch.from_numpy(slots.astype(np.int64)).to(self.device)] = False

    def reset(self) -> None:
        """Nothing to do: removal already freed the rows."""

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int, heads: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (len(heads), nq, D), set i among the keys of ``heads[i]``."""
        G, nq, _ = queries.shape
        D = np.full((G, nq, k), -np.inf, np.float32)
        I = np.full((G, nq, k), -1, np.int64)
        kk = min(k, self.keys.shape[1])
        if kk == 0:
            return D, I
        q = torch.from_numpy(queries).to(self.device, self.dtype)
        if heads == list(range(self.keys.shape[0])):
            scores = torch.bmm(q, self.keys.transpose(1, 2))
        else:  # per head: indexing the heads out of the keys would copy them
            scores = torch.stack([q[i] @ self.keys[h].T for i, h in enumerate(heads)])
        scores = scores.float().masked_fill_(~self.alive, float("-inf"))
        best, idx = scores.topk(kk, dim=2)
        idx = idx.masked_fill_(~torch.isfinite(best), -1)
        D[..., :kk], I[..., :kk] = best.cpu().numpy(), idx.cpu().numpy()
        return D, I


class FlatMirror:
    """One faiss flat index per head that cannot remove (faiss GPU indexes).

    Removed slots are filtered out of an over-fetched result; once too many are hidden that
    way, or when slots are purged for reuse, the mirror is refilled from the key table.
    """

    max_hidden = 1024
    needs_purge = True

    def __init__(self, make_index: Callable[[], faiss.Index], heads: int, name: str) -> None:
        self.make_index = make_index
        self.heads = heads
        self.indexes = [faiss.IndexIDMap(make_index()) for _ in range(heads)]
        self.hidden: set[int] = set()
        self.name = name

    def reset(self) -> None:
        """Empty the indexes; the caller adds the live entries back."""
        self.indexes = [faiss.IndexIDMap(self.make_index()) for _ in range(self.heads)]
        self.hidden.clear()

    def add(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """``keys`` (H, n, D) float32 for ``slots`` (n,)."""
        if slots.size:
            for index, head_keys in zip(self.indexes, keys):
                index.add_with_ids(np.ascontiguousarray(head_keys), slots.astype(np.int64))

    def remove(self, slots: np.ndarray) -> None:
        self.hidden.update(slots.tolist())

    @property
    def needs_rebuild(self) -> bool:
        return len(self.hidden) > self.max_hidden

    def search(self, queries: np.ndarray, k: int, heads: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``queries`` (len(heads), nq, D), set i among the keys of ``heads[i]``."""
        over = k + len(self.hidden)
        results = [self.indexes[h].search(np.ascontiguousarray(q), over) for h, q in zip(heads, queries)]
        D, I = np.stack([r[0] for r in results]), np.stack([r[1] for r in results])
        keep = I >= 0
        if self.hidden:
            keep &= ~np.isin(I, np.fromiter(self.hidden, np.int64, len(self.hidden)))
        order = np.argsort(~keep, axis=2, kind="stable")[..., :k]  # kept hits first, in score order
        D, I, keep = (np.take_along_axis(a, order, axis=2) for a in (D, I, keep))
        return np.where(keep, D, -np.inf).astype(np.float32), np.where(keep, I, -1)


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def make_mirror(backend: str, device: str, heads: int, dim: int) -> TorchMirror | FlatMirror | None:
    """The index that answers plain searches instead of the CPU ones, if any (see ``StoreOptions``)."""
    if backend not in ("auto", "faiss-cpu", "faiss-gpu", "torch"):
        raise StoreError(f"unknown memory backend {backend!r} (auto, faiss-cpu, faiss-gpu, torch)")
    if backend == "faiss-cpu":
        return None
    if backend == "faiss-gpu" or (backend == "auto" and device != "cpu" and faiss_gpu_available()):
        if not faiss_gpu_available():
            raise StoreError("backend faiss-gpu asked for, but this faiss has no GPU (pip install 'mtlsp[gpu]')")
        res = faiss.StandardGpuResources()
        return FlatMirror(lambda: faiss.GpuIndexFlatIP(res, dim), heads, "faiss-gpu exact")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if backend == "torch":
        if device == "cuda" and not torch.cuda.is_available():
            raise StoreError("memory device cuda asked for, but torch sees no CUDA device")
        return TorchMirror(heads, dim, torch.device("cuda" if cuda else "cpu"))
    return TorchMirror(heads, dim, torch.device("cuda")) if cuda else None


class Searcher:
    """Search over a store's slots for every memory head, and the lifecycle of its indexes.

    The store writes an entry's keys into ``keys`` (a ``KeyTable``; no lock needed, as no search
    uses a slot before it is alive), then calls ``add``; ``remove`` hides slots, ``purge``
    returns those safe to reuse.  Every other call but ``wait`` and ``bulk`` is made holding
    ``lock``, the store's lock over its RAM, which the background IVF build also takes for its
    snapshot and its swap.
    """

    def __init__(self, heads: int, dim: int, settings: Settings, lock: threading.RLock,
                 mirror: TorchMirror | FlatMirror | None = None) -> None:
        self.keys = KeyTable(heads, dim)
        self.settings = settings
        self.mirror = mirror
        self.live = 0
        self.dead: set[int] = set()  # removed slots some index still holds (tombstones)
        self._lock = lock
        # faiss selectors hiding ``dead`` (key b"") and ``dead`` with the latest ``hidden`` slots
        # (key: those slots), built when needed (``_hiding``)
        self._selectors: dict[bytes, tuple | None] = {}
        self.ivf: list[IvfIndex | None] = [None] * heads
        self._thread: threading.Thread | None = None
        self._log: list[tuple[str, np.ndarray]] | None = None  # changes during a head's IVF build
        self._changes = 0  # entries added or removed since the IVF indexes were built
        self._bulk = 0
        self._probe_source = "stored keys"
        self._recent = np.zeros((heads, _PROBE_QUERIES, dim), np.float32)
        self._n_recent = [0] * heads
        self._offer: SavedCells | None = None  # saved cells the next build may use instead of training
        self._offer_lists: np.ndarray | None = None  # (H, slots) int16 saved list numbers, -1 unknown
        self._offer_missing = 0  # saved entries the store no longer holds
        self.on_built: Callable[[], None] | None = None  # called after a build or restore that changed what is saved

    @property
    def heads(self) -> int:
        return self.keys.heads

    # ------------------------------------------------------------------ changes

    def add(self, slots: np.ndarray) -> None:
        """Make ``slots``, whose keys are in the table, searchable."""
        self.keys.alive[slots] = True
        self.live += len(slots)
        built = [(h, ivf) for h, ivf in enumerate(self.ivf) if ivf is not None]
        copies = self.mirror is not None or built
        with _one_thread():
            for start in range(0, len(slots) if copies else 0, _BLOCK):  # fp32 a block at a time
                s = slots[start : start + _BLOCK]
                keys = self.keys.floats(s)
                if self.mirror is not None:
                    self.mirror.add(s, keys)
                for h, ivf in built:
                    ivf.add(s, keys[h])
        if self._log is not None:
            self._log.append(("add", slots))
        self._changes += len(slots)

    def remove(self, slots: np.ndarray) -> None:
        self.keys.alive[slots] = False
        self.live -= len(slots)
        if self._offer_lists is not None:  # a removed slot may be reused by another key
            self._offer_lists[:, slots[slots < self._offer_lists.shape[1]]] = -1
        if self.mirror is not None:
            self.mirror.remove(slots)
        self.dead.update(slots.tolist())
        self._selectors.clear()
        self._changes += len(slots)

    def purge(self, force: bool = False) -> np.ndarray:
        """Physically drop tombstones once they are many; returns the slots now free for reuse.

        Immediate where no index holds copies (exact search and the torch mirror only need the
        alive mask); otherwise one bulk cost instead of one per edit.
        """
        holders = any(ivf is not None for ivf in self.ivf) or self._log is not None or (
            self.mirror is not None and self.mirror.needs_purge)
        if not self.dead or not (force or not holders or len(self.dead) > max(16_384, self.live // 20)):
            return np.zeros(0, np.int64)
        freed = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        with _one_thread():
            for ivf in self.ivf:
                if ivf is not None:
                    ivf.purge(freed)
        if self._log is not None:
            self._log.append(("purge", freed))
        if self.mirror is not None and self.mirror.needs_purge:
            self._refill_mirror()
        self.dead.clear()
        self._selectors.clear()
        return freed

    def _refill_mirror(self) -> None:
        self.mirror.reset()
        live = self.keys.live_slots()
        for start in range(0, len(live), _BLOCK):
            s = live[start : start + _BLOCK]
            self.mirror.add(s, self.keys.floats(s))

    # ------------------------------------------------------------------ searching

    @property
    def name(self) -> str:
        if self.mirror is not None:
            return self.mirror.name
        ready = sum(self._ivf_in_use(h) for h in range(self.heads))
        if ready == 0:
            return "cpu exact"
        return "faiss-cpu ivf" if ready == self.heads else f"faiss-cpu ivf ({ready}/{self.heads} heads)"

    def _ivf_in_use(self, h: int) -> bool:
        return self.ivf[h] is not None and self.live >= self.settings.ann_threshold

    def search(self, queries: np.ndarray, k: int, heads: list[int],
               hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k scores and slots, (len(heads), nq, k), of ``queries`` (len(heads), nq, D):
        query set i among the keys of head ``heads[i]`` only.

        ``hidden``: slots to leave out of this search only.  Such searches go to the CPU
        indexes (exact or IVF), which can skip slots.
        """
        self._remember(queries, heads)
        hidden = hidden if hidden is not None and hidden.size else None
        if self.mirror is not None and hidden is None:
            if isinstance(self.mirror, FlatMirror) and self.mirror.needs_rebuild:
                self._refill_mirror()
            return self.mirror.search(queries, k, heads)
        G, nq, _ = queries.shape
        scores = np.full((G, nq, k), -np.inf, np.float32)
        slots = np.full((G, nq, k), -1, np.int64)
        keep = None
        for i, h in enumerate(heads):
            if self._ivf_in_use(h):
                use = self._hiding(hidden)
                scores[i], slots[i] = self.ivf[h].search(queries[i], k, use[0] if use else None)
            else:
                if keep is None:
                    keep = self.keys.alive[: self.keys.used].copy()
                    if hidden is not None:
                        keep[hidden] = False
                n = self.keys.used
                codes, scales, q = self.keys.codes[h, :n], self.keys.scales[h, :n], queries[i]
                # called here and now (``in_pieces`` returns when every piece is done)
                scores[i], slots[i] = in_pieces(lambda rows: top_k(q[rows], codes, scales, k, keep), len(q))
        return scores, slots

    def _hiding(self, hidden: np.ndarray | None) -> tuple | None:
        """The faiss selector hiding ``dead`` and ``hidden`` (None: nothing to hide), reused
        while both stay the same: the server's searches hide ``dead`` only, evaluation's one
        file for thousands of searches, and building a selector took ~2 ms.  Kept: the one
        without ``hidden`` and the latest one with it."""
        key = b"" if hidden is None else hidden.tobytes()
        if key not in self._selectors:
            if key:
                for old in [k for k in self._selectors if k]:
                    del self._selectors[old]
            slots = self.dead if hidden is None else self.dead | set(hidden.tolist())
            self._selectors[key] = _selector(slots) if slots else None
        return self._selectors[key]

    def _remember(self, queries: np.ndarray, heads: list[int]) -> None:
        """Keep each head's latest queries: IVF recall is measured on real ones when it can be."""
        n = self._recent.shape[1]
        for q, h in zip(queries[:, -n:], heads):
            self._recent[h, (self._n_recent[h] + np.arange(len(q))) % n] = q
            self._n_recent[h] += len(q)

    # ------------------------------------------------------------------ approximate index

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """Hold IVF (re)builds during a bulk load: one build at the end does the job."""
        self._bulk += 1
        try:
            yield
        finally:
            self._bulk -= 1
            if not self._bulk:
                self.maybe_build()

    def offer(self, saved: SavedCells, slots: np.ndarray, lists: np.ndarray, missing: int) -> None:
        """Saved cells for the next build: ``lists`` (H, n) are the saved list numbers of the
        live ``slots``; ``missing`` saved entries are gone.  Used instead of training when they
        were tuned for the current k and recall target and most entries are still there."""
        changed = saved.changes + self.live - len(slots) + missing
        if (self.mirror is not None or saved.k != self.settings.ann_k or saved.recall_target != self.settings.ann_recall
                or changed >= self.settings.ann_rebuild_fraction * min(c.built_size for c in saved.heads)):
            return
        self._offer, self._offer_missing = saved, missing
        self._offer_lists = np.full((self.heads, self.keys.used), -1, np.int16)
        self._offer_lists[:, slots] = lists

    def maybe_build(self, force: bool = False) -> None:
        """Start IVF builds when the store is large and has none, or has changed a lot."""
        if self.mirror is not None or self._thread is not None or self._bulk:
            return
        if self.live < max(self.settings.ann_threshold, _MIN_IVF_ENTRIES):
            return
        if force:
            self._offer = self._offer_lists = None
        built = [ivf.built_size for ivf in self.ivf if ivf is not None]
        stale = len(built) < self.heads or self._changes >= self.settings.ann_rebuild_fraction * min(built)
        if not (stale or force):
            return
        if self.settings.ann_background:
            self._thread = threading.Thread(target=self.build, name="mtlsp-ivf", daemon=True)
            self._thread.start()
        else:
            self.build()

    def build(self) -> None:
        """Train every head's IVF index on a snapshot, tune its nprobe by measured recall, swap
        it in.  One head at a time: the old index serves its head until the new one is ready,
        and the extra memory is one head's index, not H.  With saved cells on offer, fill
        those instead (``offer``)."""
        saved = self._offer
        try:
            for h in range(self.heads):
                self._build_head(h, saved)
            fresh = [ivf.assigned for ivf in self.ivf if ivf is not None and ivf.restored]
            self._changes = saved.changes + max(fresh, default=0) + self._offer_missing if saved else 0
        finally:
            with self._lock:
                self._log = None
                self._thread = None
                self._offer = self._offer_lists = None
                self._offer_missing = 0
        if self.on_built is not None and (saved is None or self._changes):
            self.on_built()

    def _build_head(self, h: int, saved: SavedCells | None = None) -> None:
        k = self.settings.ann_k  # recall is measured at the k the model reads: a smaller k needs fewer lists
        with self._lock:
            slots = self.keys.live_slots()
            if len(slots) < _MIN_IVF_ENTRIES:  # the store shrank since the build began
                return
            codes, scales = self.keys.codes[h, slots], self.keys.scales[h, slots]
            self._log = []
            if saved is None:
                queries, source = self._probe_queries(h, codes, scales)
            else:
                known = np.full(len(slots), -1, np.int64)
                inside = slots < self._offer_lists.shape[1]
                known[inside] = self._offer_lists[h, slots[inside]]
                source = f"{saved.measured_on}, cells read from disk"
        if saved is None:
            ivf = IvfIndex(slots, codes, scales, self.keys, h)
            exact = top_k(queries, codes, scales, k)[1]
            exact = np.where(exact >= 0, slots[np.clip(exact, 0, None)], -1)
            ivf.tune(queries, exact, k, self.settings.ann_recall)
        else:
            ivf = IvfIndex(slots, codes, scales, self.keys, h, cells=saved.heads[h], lists=known)
        del codes, scales
        with self._lock:
            for op, changed in self._log:
                if op == "add":
                    ivf.add(changed, self.keys.floats(changed, h))
                else:
                    ivf.purge(changed)
            self.ivf[h], self._log = ivf, None
            self._probe_source = source
        _return_freed_memory()
        log.info("IVF index of head %d over %d entries: nlist %d, nprobe %d, recall@%d %.3f (%s), %.1f s",
                 h, ivf.built_size, ivf.nlist, ivf.nprobe, k, ivf.recall, source, ivf.build_seconds)

    def saved_cells(self, chunks: list[tuple[int, int, int, str]], slots: np.ndarray) -> SavedCells | None:
        """What ``cells.write_cells`` saves, for ``chunks`` whose live slots are ``slots`` in
        order; None unless every head has an index holding them all.  Under the lock."""
        if any(ivf is None for ivf in self.ivf):
            return None
        lists = np.stack([ivf.list_numbers(self.keys.used)[slots] for ivf in self.ivf])
        if (lists < 0).any():
            return None
        return SavedCells([ivf.saved() for ivf in self.ivf], chunks, lists.astype(np.uint16), self.settings.ann_k,
                          self.settings.ann_recall, self._probe_source.removesuffix(", cells read from disk"),
                          self._changes)

    def _probe_queries(self, h: int, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, str]:
        """Real recent queries of head ``h`` if enough were seen, else a sample of its keys."""
        if self._n_recent[h] >= 64:
            n = min(self._n_recent[h], self._recent.shape[1])
            return self._recent[h, :n].copy(), f"{n} recent queries"
        pick = np.random.default_rng(0).choice(len(codes), size=min(_PROBE_QUERIES, len(codes)), replace=False)
        return dequantize(codes[pick], scales[pick]), f"{len(pick)} stored keys"

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background IVF build (if any) has finished."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def stats(self) -> dict:
        built = [ivf for ivf in self.ivf if ivf is not None]
        return {
            "backend": self.name,
            "tombstones": len(self.dead),
            "ann": None if not built else {
                "heads_built": len(built),
                "nlist": [ivf.nlist for ivf in built],
                "nprobe": [ivf.nprobe for ivf in built],
                "recall_at_k": min(ivf.recall for ivf in built),
                "k": self.settings.ann_k,
                "recall_per_head": [ivf.recall for ivf in built],
                "measured_on": self._probe_source,
                "built_size": min(ivf.built_size for ivf in built),
                "build_seconds": sum(ivf.build_seconds for ivf in built),
                "restored_heads": sum(ivf.restored for ivf in built),
                "in_use": any(self._ivf_in_use(h) for h in range(self.heads)),
            },
            "ann_building": self._thread is not None,
        }

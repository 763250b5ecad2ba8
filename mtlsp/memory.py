"""The persistent per-project kNN memory: what the memorizing transformer reads at inference.

One ``MemoryStore`` per workspace folder.  It maps each indexed file to its chunks and each
chunk to memory entries (one per token: key, value, byte offset), keeps them on disk in the
format of ``memory_files`` and in RAM in numbered slots searched by the indexes of ``knn``.

Guarantees, and how they are kept:

- **Atomic replacement.**  All changes of one ``update`` become one generation: one manifest
  rename on disk, one critical section in RAM.  A searcher sees the old entries of a file or the
  new ones, never a mix.
- **One writer, many readers.**  Writers (an indexing daemon, a language server) take the
  store's file lock, first catch up with the newest generation, then commit theirs.  Readers
  notice a new manifest (checked at most every ``refresh_interval`` seconds when searching)
  and apply only the difference.
- **Nothing silently mixed.**  A store built by another model fingerprint or entry size, or
  whose manifest is corrupt, is refused with a message (``reset_reason``) and started afresh,
  so the indexer rebuilds it from the files.  A corrupt segment drops only the files whose
  entries it held.
- **Bounded.**  Above ``cap_tokens`` whole files are evicted: not-open files before open ones,
  least recently edited first, the files of the current update last.  Never a wipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from . import knn
from .memory_files import (
    FORMAT,
    MANIFEST,
    CorruptStore,
    Entries,
    StoreError,
    WriterLock,
    dequantize,
    make_private_dir,
    read_manifest,
    read_segment,
    segment_id,
    segment_name,
    store_dir_for,
    write_manifest,
    write_segment,
)

log = logging.getLogger("mtlsp.memory")

ChunkId = tuple[int, int]  # (segment, first row): where a chunk's entries live, forever
_MIN_IVF_ENTRIES = 8192  # below this an exact scan is as fast as probing IVF lists
_BLOCK = 65_536  # entries converted to fp32 at a time


@dataclass
class StoreOptions:
    """Settings a user or the language server may change; defaults suit a laptop."""

    cap_tokens: int = 1_000_000
    backend: str = "auto"  # auto | faiss-cpu | faiss-gpu | torch
    device: str = "auto"  # torch backend device: auto | cpu | cuda
    # Live entries from which a CPU store searches an IVF index: exact search of 8 queries over
    # 200k entries takes 20-35 ms on a 2-core VM, the IVF index ~1 ms at recall@32 >= 0.95.
    ann_threshold: int = 65_536
    ann_recall: float = 0.95  # recall@k the IVF nprobe is tuned to (the paper's floor is 0.9)
    ann_rebuild_fraction: float = 0.25  # retrain once this share of entries changed since
    ann_background: bool = True
    refresh_interval: float = 0.5
    lock_timeout: float = 30.0
    on_invalid: str = "rebuild"  # rebuild | raise
    segment_rows: int = 262_144  # compaction writes segments of at most this many entries


@dataclass(frozen=True)
class NewChunk:
    """A chunk of a file with freshly encoded entries (offsets relative to ``start``)."""

    start: int
    end: int
    hash: str
    entries: Entries


@dataclass(frozen=True)
class KeptChunk:
    """A chunk whose content hash the file already holds: its entries are reused, maybe moved."""

    start: int
    end: int
    hash: str


@dataclass(frozen=True)
class FileUpdate:
    path: str  # relative to the workspace, '/'-separated
    content_hash: str
    chunks: Sequence[NewChunk | KeptChunk]


@dataclass(frozen=True)
class ChunkInfo:
    start: int
    end: int
    hash: str
    tokens: int


@dataclass(frozen=True)
class FileInfo:
    content_hash: str
    edited: float
    chunks: list[ChunkInfo]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)


@dataclass(frozen=True)
class Hits:
    """Top-k results for ``nq`` queries; ``slots`` is -1 where fewer than k entries exist.

    ``source(i, j)`` says where hit j of query i came from (file and byte offset of its token):
    the provenance a completion can show.  Resolved from ids gathered with the hits, so it
    stays right even if the store changes afterwards.
    """

    scores: np.ndarray  # (nq, k) float32, -inf where no hit
    slots: np.ndarray  # (nq, k) int64
    keys: np.ndarray  # (nq, k, D) float32
    values: np.ndarray  # (nq, k, D) float32
    file_ids: np.ndarray  # (nq, k) int32, -1 where no hit
    offsets: np.ndarray  # (nq, k) int64
    path_table: list[str]  # append-only: ids never change meaning

    @property
    def mask(self) -> np.ndarray:
        return self.slots >= 0

    def source(self, i: int, j: int) -> tuple[str, int] | None:
        f = int(self.file_ids[i, j])
        return None if f < 0 else (self.path_table[f], int(self.offsets[i, j]))


@dataclass
class _Diff:
    removed: dict[ChunkId, tuple[str, list]] = field(default_factory=dict)
    added: dict[ChunkId, tuple[str, list]] = field(default_factory=dict)
    moved: dict[ChunkId, tuple[str, list, int]] = field(default_factory=dict)  # + old start


def _diff(old: dict, new: dict) -> _Diff:
    """Chunks that left, arrived or moved between two manifests' ``files`` maps.

    Only files whose records differ are walked, so a one-file update is cheap in a big store.
    """
    d = _Diff()
    before: dict[ChunkId, tuple[str, list]] = {}
    after: dict[ChunkId, tuple[str, list]] = {}
    for path in old.keys() | new.keys():
        o, n = old.get(path), new.get(path)
        if o == n:
            continue
        for rec in o["chunks"] if o else ():
            before[(rec[3], rec[4])] = (path, rec)
        for rec in n["chunks"] if n else ():
            after[(rec[3], rec[4])] = (path, rec)
    for cid, (path, rec) in before.items():
        if cid not in after:
            d.removed[cid] = (path, rec)
    for cid, (path, rec) in after.items():
        if cid not in before:
            d.added[cid] = (path, rec)
        elif before[cid][0] != path or before[cid][1][0] != rec[0]:
            d.moved[cid] = (path, rec, before[cid][1][0])
    return d


def _empty_manifest(fingerprint: str, dim: int, workspace: str | None) -> dict:
    return {
        "format": FORMAT,
        "generation": 0,
        "fingerprint": fingerprint,
        "dim": dim,
        "workspace": workspace,
        "next_segment": 0,
        "files": {},
        "segments": {},
    }


class MemoryStore:
    """A workspace's memory entries: on disk, in RAM, searchable.  Thread-safe."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: str,
        dim: int,
        options: StoreOptions | None = None,
        workspace: str | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.dim = dim
        self.options = options or StoreOptions()
        self.workspace = workspace
        self.open_files: set[str] = set()  # the language server's open buffers: evicted last
        self.reset_reason: str | None = None  # why an existing store was refused, if it was
        self.dropped_files: set[str] = set()  # files lost to a corrupt segment: to re-index
        make_private_dir(self.dir)

        self._lock = threading.RLock()  # guards every RAM structure below
        self._write_lock = threading.Lock()  # one writing thread per process (flock is per fd)
        self._sync_lock = threading.RLock()  # one manifest applied at a time
        self._m = _empty_manifest(fingerprint, dim, workspace)
        self._manifest_stat: tuple | None = None
        self._orphans_checked = False  # leftovers of crashed writers are swept once per process
        self._last_check = 0.0
        self._chunk_slots: dict[ChunkId, np.ndarray] = {}
        self._seg_live: Counter[int] = Counter()
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._hi = 0  # slots below this have been handed out
        self._free: list[np.ndarray] = []  # purged slots, reusable
        self._keys = np.zeros((0, dim), np.float16)
        self._values = np.zeros((0, dim), np.int8)
        self._scales = np.zeros(0, np.float16)
        self._pos = np.zeros(0, np.int64)
        self._file = np.zeros(0, np.int32)

        self._truth = knn.ExactIndex(dim)
        self._mirror = self._make_mirror()
        self._ann: knn.IvfMirror | None = None
        self._ann_thread: threading.Thread | None = None
        self._ann_log: list[tuple] | None = None  # changes made while an IVF index is being built
        self._ann_changes = 0
        self._bulk = 0  # > 0 while a bulk load holds IVF builds
        self._ann_query_source = "stored keys"
        self._recent_queries = np.zeros((256, dim), np.float32)
        self._n_recent = 0

        self._load()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        workspace: str | os.PathLike,
        *,
        fingerprint: str,
        dim: int,
        cache_root: str | os.PathLike | None = None,
        directory: str | os.PathLike | None = None,
        options: StoreOptions | None = None,
    ) -> MemoryStore:
        """The store of ``workspace``: ``directory`` if given, else under the cache root."""
        where = Path(directory) if directory is not None else store_dir_for(workspace, cache_root)
        return cls(where, fingerprint=fingerprint, dim=dim, options=options, workspace=str(Path(workspace).resolve()))

    def _make_mirror(self):
        want, device = self.options.backend, self.options.device
        if want not in ("auto", "faiss-cpu", "faiss-gpu", "torch"):
            raise StoreError(f"unknown memory backend {want!r} (auto, faiss-cpu, faiss-gpu, torch)")
        if want == "faiss-cpu":
            return None
        if want == "faiss-gpu" or (want == "auto" and device != "cpu" and knn.faiss_gpu_available()):
            if not knn.faiss_gpu_available():
                raise StoreError("backend faiss-gpu asked for, but this faiss has no GPU (pip install 'mtlsp[gpu]')")
            return knn.faiss_gpu_mirror(self.dim)
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if want == "torch":
            if device == "cuda" and not torch.cuda.is_available():
                raise StoreError("memory device cuda asked for, but torch sees no CUDA device")
            return knn.TorchMirror(self.dim, torch.device("cuda" if cuda else "cpu"))
        return knn.TorchMirror(self.dim, torch.device("cuda")) if cuda else None

    def _load(self) -> None:
        try:
            manifest = read_manifest(self.dir)
        except CorruptStore as e:
            self._refuse(f"memory store {self.dir} is corrupt ({e}); rebuilding it from the files")
            return
        if manifest is None:
            return
        if not self._ours(manifest):
            self._refuse(
                f"memory store {self.dir} was built by model {manifest.get('fingerprint')} "
                f"(entries of {manifest.get('dim')} dims), not by {self.fingerprint} ({self.dim}); "
                "rebuilding it from the files"
            )
            return
        self._sync_from_disk(manifest, at_open=True)

    def _ours(self, manifest: dict) -> bool:
        """Was this manifest written for our model (fingerprint) and entry size?"""
        return manifest.get("fingerprint") == self.fingerprint and manifest.get("dim") == self.dim

    def _refuse(self, reason: str) -> None:
        """Refuse an unusable store: raise, or set it aside and start an empty one.

        The empty store continues the generation count, so other processes holding the old
        one notice the change (and its new fingerprint) instead of writing over it.
        """
        if self.options.on_invalid == "raise":
            raise StoreError(reason)
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            try:  # another process may have rebuilt it while we waited for the lock
                current = read_manifest(self.dir)
            except CorruptStore:
                current = None
            if current is not None and self._ours(current):
                self._sync_from_disk(current, locked=True, at_open=True)
                return
            log.warning(reason)
            self.reset_reason = reason
            manifest = self.dir / MANIFEST
            if manifest.exists():  # kept for a bug report; only the latest one
                for old in self.dir.glob("manifest.refused-*"):
                    old.unlink()
                manifest.rename(self.dir / f"manifest.refused-{int(time.time())}")
            fresh = _empty_manifest(self.fingerprint, self.dim, self.workspace)
            fresh["generation"] = current["generation"] + 1 if current else int(time.time())
            write_manifest(self.dir, fresh)
            self._m = fresh
            self._remove_orphans(fresh)
            self._note_manifest()

    # ------------------------------------------------------------------ reading

    def _note_manifest(self) -> None:
        try:
            st = os.stat(self.dir / MANIFEST)
            self._manifest_stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            self._manifest_stat = None

    def refresh(self) -> bool:
        """Catch up with a newer generation written by another process; True if one came."""
        self._last_check = time.monotonic()
        try:
            st = os.stat(self.dir / MANIFEST)
        except FileNotFoundError:
            return False
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._manifest_stat:
            return False
        for _ in range(10):
            try:
                manifest = read_manifest(self.dir)
            except CorruptStore:  # caught mid-rename on an exotic filesystem, or truly bad
                time.sleep(0.01)
                continue
            if manifest is None or manifest["generation"] <= self._m["generation"]:
                self._note_manifest()
                return False
            if not self._ours(manifest):
                raise StoreError(f"memory store {self.dir} was rebuilt by another model ({manifest.get('fingerprint')})")
            try:
                self._sync_from_disk(manifest)
                return True
            except FileNotFoundError:  # a writer retired a segment between our two reads
                continue
        return False

    def _sync_from_disk(self, manifest: dict, *, locked: bool = False, at_open: bool = False) -> None:
        """Apply ``manifest``, reading the segments it adds; repair around corrupt ones.

        A missing segment is damage at open (or under the lock), but only a race for a reader
        whose manifest a writer has just replaced: that reader reads the new one instead.
        """
        try:
            self._sync_to(manifest)
        except (CorruptStore, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) and not (locked or at_open):
                raise
            if locked:
                self._repair_locked(e)
            else:
                with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
                    self._repair_locked(e)

    def _repair_locked(self, error: Exception) -> None:
        """Drop the files whose entries sit in a corrupt or missing segment, keep the rest.

        Checks again under the writer lock: at open, a segment can vanish because a writer
        retired it between our reads, which is no damage at all.
        """
        manifest = read_manifest(self.dir) or _empty_manifest(self.fingerprint, self.dim, self.workspace)
        bad = set()
        for seg in manifest["segments"]:
            try:
                read_segment(self.dir, seg, self.dim)
            except (CorruptStore, FileNotFoundError):
                bad.add(seg)
        if not bad:
            self._sync_to(manifest)
            return
        files = {
            p: f for p, f in manifest["files"].items() if not any(c[3] in bad for c in f["chunks"])
        }
        lost = sorted(set(manifest["files"]) - set(files))
        log.warning("%s; dropping the entries of %d file(s) to re-index: %s", error, len(lost), ", ".join(lost[:10]))
        self.dropped_files.update(lost)
        fixed = dict(manifest, files=files, generation=manifest["generation"] + 1,
                     segments={s: n for s, n in manifest["segments"].items() if s not in bad})
        write_manifest(self.dir, fixed)
        self._sync_to(fixed)
        self._remove_orphans(fixed)

    def _sync_to(self, manifest: dict, fresh: dict[int, Entries] | None = None, relocated: dict[ChunkId, ChunkId] | None = None) -> None:
        """Make RAM hold exactly ``manifest``'s entries; segments in ``fresh`` need no read.

        Serialised by ``_sync_lock`` (a searcher's refresh may race its own process's writer
        to the same new manifest; whoever comes second finds nothing left to do).  Segments
        are read before ``_lock`` is taken, so searches wait only for the in-RAM swap.
        """
        with self._sync_lock:
            if manifest["generation"] <= self._m["generation"]:
                return
            self._sync_locked(manifest, fresh, relocated)

    def _sync_locked(self, manifest: dict, fresh: dict[int, Entries] | None, relocated: dict[ChunkId, ChunkId] | None) -> None:
        relocated = relocated or {}
        diff = _diff(self._m["files"], manifest["files"])
        for new_id, old_id in relocated.items():
            diff.removed.pop(old_id, None)
            diff.added.pop(new_id, None)
        loaded: dict[int, Entries] = dict(fresh or {})
        for seg, _row in diff.added:
            if seg not in loaded:
                loaded[seg] = read_segment(self.dir, seg, self.dim)
        parts, owners = [], []
        for cid, (path, rec) in diff.added.items():
            seg, row, n = rec[3], rec[4], rec[5]
            if row + n > len(loaded[seg]):
                raise CorruptStore(f"{self.dir / segment_name(seg)}: the manifest names rows it does not have")
            parts.append(loaded[seg].take(row, row + n))
            owners.append((cid, path, rec))
        batch = Entries.concat(parts, self.dim)
        del parts, loaded  # the segments' bytes: the batch holds its own copy
        with self._lock:
            for new_id, old_id in relocated.items():
                self._chunk_slots[new_id] = self._chunk_slots.pop(old_id)
                self._seg_live[old_id[0]] -= len(self._chunk_slots[new_id])
                self._seg_live[new_id[0]] += len(self._chunk_slots[new_id])
            gone = [self._chunk_slots.pop(cid) for cid in diff.removed]
            for cid, (_path, rec) in diff.removed.items():
                self._seg_live[cid[0]] -= rec[5]
            if gone:
                self._remove_slots(np.concatenate(gone))
            if len(batch):
                slots = self._alloc(len(batch))
                self._keys[slots] = batch.keys
                self._values[slots] = batch.values
                self._scales[slots] = batch.scales
                i = 0
                for cid, path, rec in owners:
                    s = slots[i : i + rec[5]]
                    self._chunk_slots[cid] = s
                    self._seg_live[cid[0]] += rec[5]
                    self._file[s] = self._path_id(path)
                    self._pos[s] = rec[0] + batch.offsets[i : i + rec[5]].astype(np.int64)
                    i += rec[5]
                self._add_slots(slots, batch.keys)
            for cid, (path, rec, old_start) in diff.moved.items():
                s = self._chunk_slots[cid]
                self._pos[s] += rec[0] - old_start
                self._file[s] = self._path_id(path)
            for seg in [s for s, n in self._seg_live.items() if n <= 0]:
                del self._seg_live[seg]
            self._m = manifest
            self._maybe_purge()
        self._note_manifest()
        self._maybe_build_ann()

    def _path_id(self, path: str) -> int:
        pid = self._path_ids.get(path)
        if pid is None:
            pid = self._path_ids[path] = len(self._paths)
            self._paths.append(path)
        return pid

    # ------------------------------------------------------------------ slots

    def _alloc(self, n: int) -> np.ndarray:
        got: list[np.ndarray] = []
        need = n
        while need and self._free:
            block = self._free.pop()
            take, rest = block[:need], block[need:]
            if rest.size:
                self._free.append(rest)
            got.append(take)
            need -= take.size
        if need:
            got.append(np.arange(self._hi, self._hi + need, dtype=np.int64))
            self._hi += need
            self._reserve(self._hi)
        return np.concatenate(got)

    def _reserve(self, n: int) -> None:
        if n <= self._keys.shape[0]:
            return
        cap = max(n, self._keys.shape[0] * 5 // 4, 4096)  # x1.25: a doubling overshoots by 100s of MB
        for name in ("_keys", "_values", "_scales", "_pos", "_file"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def _add_slots(self, slots: np.ndarray, keys16: np.ndarray) -> None:
        # fp32 copies in blocks: a whole-store copy at reload would add 256 MB per 1M entries
        for start in range(0, len(slots), _BLOCK):
            s, keys = slots[start : start + _BLOCK], keys16[start : start + _BLOCK].astype(np.float32)
            self._truth.add(s, keys)
            if self._mirror is not None:
                self._mirror.add(s, keys)
            if self._ann is not None:
                self._ann.add(s, keys)
            if self._ann_log is not None:
                self._ann_log.append(("add", s, keys))
        if self._ann is not None:
            self._ann_changes += len(slots)

    def _remove_slots(self, slots: np.ndarray) -> None:
        self._truth.remove(slots)
        self._file[slots] = -1
        if self._mirror is not None:
            self._mirror.remove(slots)
        if self._ann is not None:
            self._ann.remove(slots)
            self._ann_changes += len(slots)
        if self._ann_log is not None:
            self._ann_log.append(("remove", slots))

    def _maybe_purge(self, force: bool = False) -> None:
        """Physically drop tombstones once they are many: one bulk cost instead of one per edit."""
        dead = len(self._truth.dead)
        if not dead or not (force or dead > max(16_384, self._truth.live // 20)):
            return
        freed = self._truth.purge()
        if self._ann is not None:
            self._ann.purge()
        if self._ann_log is not None:
            self._ann_log.append(("purge",))
        if isinstance(self._mirror, knn.FlatMirror):
            live = self._live_slots()
            self._mirror.rebuild(live, self._keys[live].astype(np.float32))
        self._free.append(freed)

    def _live_slots(self) -> np.ndarray:
        if not self._chunk_slots:
            return np.zeros(0, np.int64)
        return np.concatenate(list(self._chunk_slots.values()))

    # ------------------------------------------------------------------ writing

    def update(self, puts: Sequence[FileUpdate] = (), removes: Iterable[str] = ()) -> int:
        """Replace the entries of ``puts`` and drop those of ``removes``: one atomic generation.

        Returns the new generation number.  Files over the capacity evict others (see the
        module docstring); a single file larger than the whole capacity is refused.
        """
        puts = list(puts)
        removes = list(removes)
        for put in puts:
            self._check_put(put)
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            self._catch_up()
            old = self._m
            files = dict(old["files"])
            seg = old["next_segment"]
            parts: list[Entries] = []
            rows = 0
            now = time.time()
            for put in puts:
                prev = files.get(put.path)
                have = {rec[2]: rec for rec in prev["chunks"]} if prev else {}
                recs = []
                for ch in put.chunks:
                    if isinstance(ch, KeptChunk):
                        if ch.hash not in have:
                            raise StoreError(f"{put.path}: no stored chunk with hash {ch.hash} to keep")
                        rec = have[ch.hash]
                        recs.append([ch.start, ch.end, ch.hash, rec[3], rec[4], rec[5]])
                    else:
                        recs.append([ch.start, ch.end, ch.hash, seg, rows, len(ch.entries)])
                        parts.append(ch.entries)
                        rows += len(ch.entries)
                edited = prev["edited"] if prev and prev["hash"] == put.content_hash else now
                files[put.path] = {"hash": put.content_hash, "edited": edited, "chunks": recs}
            for path in removes:
                files.pop(path, None)
            # live entries now plus those written is an upper bound: skip the walk under the cap
            over = self._truth.live + rows > self.options.cap_tokens
            hashes = {p: f["hash"] for p, f in files.items()} if over else {}
            evicted = self._evict(files, protect={p.path for p in puts}) if over else []
            if evicted:
                log.info("memory over %d tokens: evicted %d file(s)", self.options.cap_tokens, len(evicted))
            # remembered so that a refresh does not encode them again only to evict others
            out = {p: h for p, h in old.get("evicted", {}).items() if p not in files and p not in removes}
            out.update((p, hashes[p]) for p in evicted)
            new = self._next_manifest(old, files, seg if rows else None, rows, evicted=out)
            if evicted:
                new["evicted_cap"] = self.options.cap_tokens
            fresh = {}
            if rows:
                fresh[seg] = Entries.concat(parts, self.dim)
                write_segment(self.dir, seg, fresh[seg])
            write_manifest(self.dir, new)
            self._sync_to(new, fresh)
            self._retire_segments(old, new)
            self._maybe_auto_compact()
            return new["generation"]

    def _check_put(self, put: FileUpdate) -> None:
        if not isinstance(put.path, str) or not put.path or put.path.startswith("/") or "\\" in put.path:
            raise StoreError(f"file paths must be relative and '/'-separated, got {put.path!r}")
        total = 0
        for ch in put.chunks:
            if not (0 <= ch.start <= ch.end):
                raise StoreError(f"{put.path}: chunk byte range {ch.start}..{ch.end} is invalid")
            if isinstance(ch, NewChunk):
                if ch.entries.dim != self.dim:
                    raise StoreError(f"{put.path}: entries of {ch.entries.dim} dims, the store holds {self.dim}")
                total += len(ch.entries)
        if total > self.options.cap_tokens:
            raise StoreError(f"{put.path}: {total} tokens exceed the memory cap of {self.options.cap_tokens}")

    def _catch_up(self) -> None:
        """Under the writer lock: adopt whatever generation another writer committed."""
        manifest = read_manifest(self.dir)
        if manifest is not None and manifest["generation"] > self._m["generation"]:
            if not self._ours(manifest):
                raise StoreError(f"memory store {self.dir} was rebuilt by another model ({manifest.get('fingerprint')})")
            self._sync_from_disk(manifest, locked=True)
        if not self._orphans_checked:
            self._remove_orphans(self._m)
            self._orphans_checked = True

    def _next_manifest(self, old: dict, files: dict, new_seg: int | None, rows: int,
                       evicted: dict[str, str] | None = None) -> dict:
        diff = _diff(old["files"], files)
        live = Counter(self._seg_live)
        for cid, (_p, rec) in diff.removed.items():
            live[cid[0]] -= rec[5]
        for cid, (_p, rec) in diff.added.items():
            live[cid[0]] += rec[5]
        segments = {s: n for s, n in old["segments"].items() if live[s] > 0}
        if new_seg is not None and live[new_seg] > 0:
            segments[new_seg] = rows
        return dict(
            old,
            generation=old["generation"] + 1,
            next_segment=old["next_segment"] + (new_seg is not None),
            files=files,
            segments=segments,
            evicted=old.get("evicted", {}) if evicted is None else evicted,
        )

    def _evict(self, files: dict, protect: set[str]) -> list[str]:
        sizes = {p: sum(rec[5] for rec in f["chunks"]) for p, f in files.items()}
        total = sum(sizes.values())
        if total <= self.options.cap_tokens:
            return []
        order = sorted(files, key=lambda p: (p in protect, p in self.open_files, files[p]["edited"], p))
        evicted = []
        for path in order:
            if total <= self.options.cap_tokens:
                break
            total -= sizes[path]
            del files[path]
            evicted.append(path)
        return evicted

    def _retire_segments(self, old: dict, new: dict) -> None:
        for seg in old["segments"].keys() - new["segments"].keys():
            (self.dir / segment_name(seg)).unlink(missing_ok=True)

    def _remove_orphans(self, manifest: dict) -> None:
        """Under the writer lock: delete segments and temp files no manifest will ever name."""
        for entry in os.scandir(self.dir):
            seg = segment_id(entry.name)
            if (seg is not None and seg not in manifest["segments"]) or entry.name.endswith(".tmp"):
                os.unlink(entry.path)

    def remove_files(self, paths: Iterable[str]) -> int:
        return self.update(removes=paths)

    def clear(self) -> int:
        """Drop every entry (a new, empty generation); the store itself stays."""
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            self._catch_up()
            old = self._m
            new = self._next_manifest(old, {}, None, 0, evicted={})
            write_manifest(self.dir, new)
            self._sync_to(new)
            self._retire_segments(old, new)
            with self._lock:
                self._maybe_purge(force=True)
            return new["generation"]

    def _garbage_rows(self) -> int:
        return sum(n - self._seg_live.get(s, 0) for s, n in self._m["segments"].items())

    def _maybe_auto_compact(self) -> None:
        if self._garbage_rows() > max(65_536, self._truth.live // 4):
            self._compact_locked()

    def compact(self) -> int:
        """Rewrite segments that hold dead rows, purge tombstones, retrain a stale IVF index."""
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            self._catch_up()
            generation = self._compact_locked()
            self._remove_orphans(self._m)
        self._maybe_build_ann(force=True)
        return generation

    def _compact_locked(self) -> int:
        old = self._m
        holey = {s for s, n in old["segments"].items() if self._seg_live.get(s, 0) < n}
        files = {p: dict(f, chunks=[list(r) for r in f["chunks"]]) for p, f in old["files"].items()}
        seg = old["next_segment"]
        relocated: dict[ChunkId, ChunkId] = {}
        written: dict[int, int] = {}
        parts: list[Entries] = []
        rows = 0

        def flush() -> None:  # relocated chunks keep their slots: nothing is read back
            nonlocal seg, parts, rows
            if rows:
                write_segment(self.dir, seg, Entries.concat(parts, self.dim))
                written[seg] = rows
                seg, parts, rows = seg + 1, [], 0

        with self._lock:
            for f in files.values():
                for rec in f["chunks"]:
                    if rec[3] not in holey:
                        continue
                    s = self._chunk_slots[(rec[3], rec[4])]
                    parts.append(Entries(self._keys[s], self._values[s], self._scales[s],
                                         (self._pos[s] - rec[0]).astype(np.uint32)))
                    relocated[(seg, rows)] = (rec[3], rec[4])
                    rec[3], rec[4] = seg, rows
                    rows += rec[5]
                    if rows >= self.options.segment_rows:
                        flush()
        flush()
        segments = {s: n for s, n in old["segments"].items() if s not in holey}
        segments.update(written)
        new = dict(old, generation=old["generation"] + 1, next_segment=seg, files=files, segments=segments)
        write_manifest(self.dir, new)
        self._sync_to(new, None, relocated)
        self._retire_segments(old, new)
        with self._lock:
            self._maybe_purge(force=True)
        return new["generation"]

    # ------------------------------------------------------------------ approximate index

    @contextlib.contextmanager
    def bulk(self):
        """Hold IVF (re)builds during a bulk load (a full index): each would snapshot the store
        and briefly hold two indexes; one build at the end does the job."""
        self._bulk += 1
        try:
            yield self
        finally:
            self._bulk -= 1
            if not self._bulk:
                self._maybe_build_ann()

    def _maybe_build_ann(self, force: bool = False) -> None:
        """Start an IVF build when the store is large and has none, or has changed a lot."""
        if self._mirror is not None or self._ann_thread is not None or self._bulk:
            return
        if self._truth.live < max(self.options.ann_threshold, _MIN_IVF_ENTRIES):
            return
        stale = self._ann is None or self._ann_changes >= self.options.ann_rebuild_fraction * self._ann.built_size
        if not (stale or force):
            return
        if self.options.ann_background:
            self._ann_thread = threading.Thread(target=self._build_ann, name="mtlsp-ivf", daemon=True)
            self._ann_thread.start()
        else:
            self._build_ann()

    def _build_ann(self) -> None:
        """Train an IVF index on a snapshot, tune nprobe by measured recall, then catch up."""
        try:
            with self._lock:
                slots = self._live_slots()
                keys16 = self._keys[slots].copy()
                self._ann_log = []
                queries, source = self._probe_queries(keys16)
            ann = knn.IvfMirror(slots, keys16)
            k = 32
            exact = _exact_ids(queries, keys16, slots, k)
            ann.tune(queries, exact, k, self.options.ann_recall)
            del keys16
            with self._lock:
                for change in self._ann_log:
                    if change[0] == "add":
                        ann.add(change[1], change[2])
                    elif change[0] == "remove":
                        ann.remove(change[1])
                    else:
                        ann.purge()
                self._ann, self._ann_log, self._ann_changes = ann, None, 0
                self._ann_query_source = source
            log.info("IVF index over %d entries: nlist %d, nprobe %d, recall@%d %.3f (%s), %.1f s",
                     ann.built_size, ann.nlist, ann.nprobe, k, ann.recall, source, ann.build_seconds)
        finally:
            self._ann_log = None
            self._ann_thread = None

    def _probe_queries(self, keys16: np.ndarray) -> tuple[np.ndarray, str]:
        """Real recent queries if enough were seen, else a sample of stored keys."""
        if self._n_recent >= 64:
            n = min(self._n_recent, len(self._recent_queries))
            return self._recent_queries[:n].copy(), f"{n} recent queries"
        rng = np.random.default_rng(0)
        pick = rng.choice(len(keys16), size=min(256, len(keys16)), replace=False)
        return keys16[pick].astype(np.float32), f"{len(pick)} stored keys"

    def wait_for_index(self, timeout: float | None = None) -> None:
        """Block until a background IVF build (if any) has finished."""
        thread = self._ann_thread
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------------ searching

    def search(self, queries: np.ndarray, k: int, hide: Collection[str] = ()) -> Hits:
        """Top-k entries by inner product for each of ``queries`` (nq, D).

        ``hide``: files left out of this search only.  Evaluation uses it to score a file
        against the memory of the rest of its repository without rebuilding the store; such
        searches go to the CPU indexes (exact or IVF), whose faiss selectors can skip slots.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        if time.monotonic() - self._last_check > self.options.refresh_interval:
            self.refresh()
        with self._lock:
            self._remember(q)
            hidden = self._slots_of(hide) if hide else None
            if hidden is not None and hidden.size:
                scores, slots = self._cpu_searcher().search(q, k, hidden=hidden)
            else:
                scores, slots = self._searcher().search(q, k)
            ok = slots >= 0
            safe = np.where(ok, slots, 0)
            keys = np.where(ok[..., None], self._keys[safe].astype(np.float32), 0.0)
            values = np.where(ok[..., None], dequantize(self._values[safe], self._scales[safe]), 0.0)
            fids = np.where(ok, self._file[safe], -1)
            offsets = np.where(ok, self._pos[safe], -1)
        scores = np.where(ok, scores, -np.inf).astype(np.float32)
        return Hits(scores, slots, keys.astype(np.float32), values.astype(np.float32), fids, offsets, self._paths)

    def _slots_of(self, paths: Collection[str]) -> np.ndarray:
        parts = [
            self._chunk_slots[(rec[3], rec[4])]
            for path in paths
            for rec in self._m["files"].get(path, {}).get("chunks", ())
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _searcher(self):
        if self._mirror is not None:
            if isinstance(self._mirror, knn.FlatMirror) and self._mirror.needs_rebuild:
                live = self._live_slots()
                self._mirror.rebuild(live, self._keys[live].astype(np.float32))
            return self._mirror
        return self._cpu_searcher()

    def _cpu_searcher(self):
        """The IVF index once the store is large and it is built, else exact search."""
        if self._ann is not None and self._truth.live >= self.options.ann_threshold:
            return self._ann
        return self._truth

    def _remember(self, q: np.ndarray) -> None:
        """Keep the latest queries: the IVF recall is measured on real ones when it can be."""
        n = len(self._recent_queries)
        q = q[-n:]
        self._recent_queries[(self._n_recent + np.arange(len(q))) % n] = q
        self._n_recent += len(q)

    # ------------------------------------------------------------------ inspecting

    @property
    def generation(self) -> int:
        return self._m["generation"]

    def files(self) -> dict[str, FileInfo]:
        with self._lock:
            return {p: _file_info(f) for p, f in self._m["files"].items()}

    def evicted(self) -> dict[str, str]:
        """Files evicted for capacity and not stored since: path -> content hash at eviction.

        Empty once the cap is raised above the one they were evicted under: they may fit now,
        and a refresh should bring them back rather than leave them out for good.
        """
        with self._lock:
            if self.options.cap_tokens > self._m.get("evicted_cap", self.options.cap_tokens):
                return {}
            return dict(self._m.get("evicted", {}))

    def file_info(self, path: str) -> FileInfo | None:
        with self._lock:
            f = self._m["files"].get(path)
            return _file_info(f) if f else None

    def entries_of(self, path: str) -> Entries | None:
        """A file's stored entries in chunk order (offsets relative to each chunk's start)."""
        with self._lock:
            f = self._m["files"].get(path)
            if f is None:
                return None
            parts = []
            for rec in f["chunks"]:
                s = self._chunk_slots[(rec[3], rec[4])]
                rel = (self._pos[s] - rec[0]).astype(np.uint32)
                parts.append(Entries(self._keys[s].copy(), self._values[s].copy(), self._scales[s].copy(), rel))
            return Entries.concat(parts, self.dim)

    def stats(self) -> dict:
        with self._lock:
            live = self._truth.live
            disk = _disk_bytes(self.dir)
            ann = self._ann
            searcher = self._searcher()
            return {
                "directory": str(self.dir),
                "workspace": self._m.get("workspace"),
                "generation": self._m["generation"],
                "fingerprint": self.fingerprint,
                "files": len(self._m["files"]),
                "chunks": len(self._chunk_slots),
                "entries": live,
                "cap_tokens": self.options.cap_tokens,
                "tombstones": len(self._truth.dead),
                "segments": len(self._m["segments"]),
                "garbage_rows": self._garbage_rows(),
                "disk_bytes": disk,
                "bytes_per_entry": disk / live if live else None,
                "backend": searcher.name,
                "truth": self._truth.name,
                "ann": None if ann is None else {
                    "nlist": ann.nlist, "nprobe": ann.nprobe, "recall_at_32": ann.recall,
                    "measured_on": self._ann_query_source, "built_size": ann.built_size,
                    "build_seconds": ann.build_seconds, "in_use": searcher is ann,
                },
                "ann_building": self._ann_thread is not None,
                "reset_reason": self.reset_reason,
            }


def _disk_bytes(directory: Path) -> int:
    """Bytes of the files in ``directory``; a file another writer retires meanwhile counts 0."""
    total = 0
    for e in os.scandir(directory):
        try:
            if e.is_file():
                total += e.stat().st_size
        except FileNotFoundError:
            continue
    return total


def _file_info(f: dict) -> FileInfo:
    return FileInfo(f["hash"], f["edited"], [ChunkInfo(r[0], r[1], r[2], r[5]) for r in f["chunks"]])


def _exact_ids(queries: np.ndarray, keys: np.ndarray, slots: np.ndarray, k: int, block: int = 131_072) -> np.ndarray:
    """Exact top-k slots by brute force over fp16 ``keys`` in blocks (bounded extra memory)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(keys), block):
        part = keys[start : start + block].astype(np.float32)
        s, i = faiss.knn(queries, part, min(k, len(part)), metric=faiss.METRIC_INNER_PRODUCT)
        s = np.concatenate([best_s, s], axis=1)
        i = np.concatenate([best_i, np.where(i >= 0, slots[start:][np.clip(i, 0, None)], -1)], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i

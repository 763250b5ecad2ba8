"""The persistent per-project kNN memory: what the memorizing transformer reads at inference.

One ``MemoryStore`` per workspace folder.  It maps each indexed file to its chunks and each
chunk to memory entries: one per token, holding a key and a value for each of the model's H
memory heads, the token's id and its byte offset.  It keeps them on disk in the format of
``files`` and in RAM in numbered slots, which a ``knn.Searcher`` searches.  It also
keeps the identifiers each chunk defines (``names``).

Guarantees, and how they are kept:

- **Atomic replacement.**  All changes of one ``update`` become one generation: one manifest
  rename on disk, one critical section in RAM.  A searcher sees the old entries of a file or the
  new ones, never a mix.
- **One writer, many readers.**  Writers (an indexing daemon, a language server) take the
  store's file lock, first catch up with the newest generation, then commit theirs.  Readers
  notice a new manifest (checked at most every ``refresh_interval`` seconds when searching)
  and apply only the difference.
- **Nothing silently mixed.**  A store built by another model fingerprint or entry shape
  (heads, dims), or whose manifest is corrupt, is refused with a message (``reset_reason``) and
  started afresh, so the indexer rebuilds it from the files.  A corrupt segment drops only the
  files whose entries it held.
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
from collections.abc import Collection, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import knn
from .cells import CELLS, Stamp, read_cells, write_cells
from .files import (
    FORMAT,
    MANIFEST,
    ChunkRecord,
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

ChunkId = tuple[int, int]  # (segment, first row): where a chunk's entries live, until compaction


@dataclass
class StoreOptions:
    """Settings a user or the language server may change; defaults suit a laptop."""

    cap_tokens: int = 1_000_000
    backend: str = "auto"  # auto | faiss-cpu | faiss-gpu | torch
    device: str = "auto"  # torch backend device: auto | cpu | cuda
    # Live entries from which a CPU store searches IVF indexes: an exact scan of 4 heads' int8
    # keys at 200k entries takes tens of ms on a 2-core VM, IVF ~1 ms at recall@32 >= 0.95.
    ann_threshold: int = 65_536
    ann_recall: float = 0.95  # recall@k each head's IVF nprobe is tuned to (the paper's floor is 0.9)
    ann_k: int = 32  # the k of that recall: how many entries the model reads per query
    ann_rebuild_fraction: float = 0.25  # retrain once this share of entries changed since
    ann_background: bool = True
    refresh_interval: float = 0.5
    lock_timeout: float = 30.0
    on_invalid: str = "rebuild"  # rebuild | raise
    segment_rows: int = 262_144  # updates and compaction write segments of about this many entries


@dataclass(frozen=True)
class NewChunk:
    """A chunk of a file with freshly encoded entries (offsets relative to ``start``) and the
    identifiers it defines (completion candidates)."""

    start: int
    end: int
    hash: str
    entries: Entries
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeptChunk:
    """A chunk whose content hash the file already holds: its entries and names are reused,
    maybe moved."""

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
    names: tuple[str, ...] = ()


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
    """Top-k results of each memory head's ``nq`` queries; ``slots`` is -1 where there are
    fewer than k hits.  Hit ``[h, i, j]`` is an entry's head-h key and value (h counts the
    heads searched: all of them unless ``search`` was given ``heads``).

    ``source(h, i, j)`` says where that hit came from (file and byte offset of its token):
    the provenance a completion can show.  Resolved from ids gathered with the hits, so it
    stays right even if the store changes afterwards.
    """

    scores: np.ndarray  # (H, nq, k) float32, -inf where no hit
    slots: np.ndarray  # (H, nq, k) int64; one slot is one token, the same in every head
    keys: np.ndarray  # (H, nq, k, D) float32, dequantised
    values: np.ndarray  # (H, nq, k, D) float32, dequantised
    tokens: np.ndarray  # (H, nq, k) int64 token ids, -1 where no hit
    file_ids: np.ndarray  # (H, nq, k) int32, -1 where no hit
    offsets: np.ndarray  # (H, nq, k) int64
    path_table: list[str]  # append-only: ids never change meaning

    @property
    def mask(self) -> np.ndarray:
        return self.slots >= 0

    def source(self, h: int, i: int, j: int) -> tuple[str, int] | None:
        f = int(self.file_ids[h, i, j])
        return None if f < 0 else (self.path_table[f], int(self.offsets[h, i, j]))


@dataclass
class _Diff:
    removed: dict[ChunkId, tuple[str, ChunkRecord]] = field(default_factory=dict)
    added: dict[ChunkId, tuple[str, ChunkRecord]] = field(default_factory=dict)
    moved: dict[ChunkId, tuple[str, ChunkRecord, int]] = field(default_factory=dict)  # + old start


def _diff(old: dict, new: dict) -> _Diff:
    """Chunks that left, arrived or moved between two manifests' ``files`` maps.

    Only files whose records differ are walked, so a one-file update is cheap in a big store.
    """
    d = _Diff()
    before: dict[ChunkId, tuple[str, ChunkRecord]] = {}
    after: dict[ChunkId, tuple[str, ChunkRecord]] = {}
    for path in old.keys() | new.keys():
        o, n = old.get(path), new.get(path)
        if o == n:
            continue
        for rec in o["chunks"] if o else ():
            before[rec.id] = (path, rec)
        for rec in n["chunks"] if n else ():
            after[rec.id] = (path, rec)
    for cid, (path, rec) in before.items():
        if cid not in after:
            d.removed[cid] = (path, rec)
    for cid, (path, rec) in after.items():
        if cid not in before:
            d.added[cid] = (path, rec)
        elif before[cid][0] != path or before[cid][1].start != rec.start:
            d.moved[cid] = (path, rec, before[cid][1].start)
    return d


def _empty_manifest(fingerprint: str, heads: int, dim: int, workspace: str | None) -> dict:
    return {
        "format": FORMAT,
        "generation": 0,
        "fingerprint": fingerprint,
        "heads": heads,
        "dim": dim,
        "workspace": workspace,
        "next_segment": 0,
        "files": {},
        "segments": {},
    }


class _NewSegments:
    """Chunks' entries placed into new segments of about ``max_rows`` rows, then written.

    Placing first and writing later lets an update check all its input before any file is
    written; ``write(all=False)`` lets compaction write each segment as soon as it is full.
    """

    def __init__(self, first: int, max_rows: int) -> None:
        self.next = first  # the segment being filled
        self.max_rows = max_rows
        self.parts: list[Entries] = []
        self.rows = 0
        self.full: list[tuple[int, list[Entries], int]] = []

    def place(self, entries: Entries) -> ChunkId:
        at = (self.next, self.rows)
        self.parts.append(entries)
        self.rows += len(entries)
        if self.rows >= self.max_rows:
            self._close()
        return at

    def _close(self) -> None:
        if self.rows:
            self.full.append((self.next, self.parts, self.rows))
            self.next, self.parts, self.rows = self.next + 1, [], 0

    def sizes(self) -> dict[int, int]:
        """Rows of every segment placed so far."""
        out = {seg: rows for seg, _parts, rows in self.full}
        if self.rows:
            out[self.next] = self.rows
        return out

    @property
    def end(self) -> int:
        """The first segment number after those placed."""
        return self.next + (self.rows > 0)

    def write(self, directory: Path, heads: int, dim: int, keep: Container[int] | None = None,
              all: bool = True) -> dict[int, int]:
        """Write the full segments (and the open one if ``all``) that ``keep`` names."""
        if all:
            self._close()
        written = {}
        for seg, parts, rows in self.full:
            if keep is None or seg in keep:
                write_segment(directory, seg, parts, heads, dim)
                written[seg] = rows
        self.full = []
        return written


class MemoryStore:
    """A workspace's memory entries: on disk, in RAM, searchable.  Thread-safe."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fingerprint: str,
        heads: int,
        dim: int,
        options: StoreOptions | None = None,
        workspace: str | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.heads = heads
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
        self._m = _empty_manifest(fingerprint, heads, dim, workspace)
        self._manifest_stat: tuple | None = None
        self._orphans_checked = False  # leftovers of crashed writers are swept once per process
        self._last_check = 0.0
        self._names: tuple[int, dict[str, list[str]]] | None = None  # (generation, names())
        self._chunk_slots: dict[ChunkId, np.ndarray] = {}
        self._seg_live: Counter[int] = Counter()
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._hi = 0  # slots below this have been handed out
        self._free: list[np.ndarray] = []  # purged slots, reusable
        # Per slot, all but the keys (the searcher's key table holds those).
        self._values = np.zeros((0, heads, dim), np.int8)
        self._value_scales = np.zeros((0, heads), np.float16)
        self._tokens = np.zeros(0, np.uint32)
        self._pos = np.zeros(0, np.int64)
        self._file = np.zeros(0, np.int32)
        mirror = knn.make_mirror(self.options.backend, self.options.device, heads, dim)
        self._search = knn.Searcher(heads, dim, self.options, self._lock, mirror)
        self._search.on_built = self._save_cells

        with self._search.bulk():  # an IVF build waits for the saved cells on offer
            self._load()
            self._offer_cells()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        workspace: str | os.PathLike,
        *,
        fingerprint: str,
        heads: int,
        dim: int,
        cache_root: str | os.PathLike | None = None,
        directory: str | os.PathLike | None = None,
        options: StoreOptions | None = None,
    ) -> MemoryStore:
        """The store of ``workspace``: ``directory`` if given, else under the cache root."""
        where = Path(directory) if directory is not None else store_dir_for(workspace, cache_root)
        return cls(where, fingerprint=fingerprint, heads=heads, dim=dim, options=options,
                   workspace=str(Path(workspace).resolve()))

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
                f"(entries of {manifest.get('heads')} heads x {manifest.get('dim')} dims), not by "
                f"{self.fingerprint} ({self.heads} heads x {self.dim} dims); rebuilding it from the files"
            )
            return
        self._sync_from_disk(manifest, at_open=True)

    def _ours(self, manifest: dict) -> bool:
        """Was this manifest written for our model (fingerprint) and entry shape?"""
        return (manifest.get("fingerprint"), manifest.get("heads"), manifest.get("dim")) == (
            self.fingerprint, self.heads, self.dim)

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
            (self.dir / CELLS).unlink(missing_ok=True)
            manifest = self.dir / MANIFEST
            if manifest.exists():  # kept for a bug report; only the latest one
                for old in self.dir.glob("manifest.refused-*"):
                    old.unlink()
                manifest.rename(self.dir / f"manifest.refused-{int(time.time())}")
            fresh = _empty_manifest(self.fingerprint, self.heads, self.dim, self.workspace)
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

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._last_check > self.options.refresh_interval:
            self.refresh()

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
        manifest = read_manifest(self.dir) or _empty_manifest(self.fingerprint, self.heads, self.dim, self.workspace)
        bad = set()
        for seg in manifest["segments"]:
            try:
                read_segment(self.dir, seg, self.heads, self.dim)
            except (CorruptStore, FileNotFoundError):
                bad.add(seg)
        if not bad:
            self._sync_to(manifest)
            return
        files = {
            p: f for p, f in manifest["files"].items() if not any(rec.segment in bad for rec in f["chunks"])
        }
        lost = sorted(set(manifest["files"]) - set(files))
        log.warning("%s; dropping the entries of %d file(s) to re-index: %s", error, len(lost), ", ".join(lost[:10]))
        self.dropped_files.update(lost)
        fixed = dict(manifest, files=files, generation=manifest["generation"] + 1,
                     segments={s: n for s, n in manifest["segments"].items() if s not in bad})
        write_manifest(self.dir, fixed)
        self._sync_to(fixed)
        self._remove_orphans(fixed)

    def _sync_to(self, manifest: dict, fresh: dict[ChunkId, Entries] | None = None,
                 relocated: dict[ChunkId, ChunkId] | None = None) -> None:
        """Make RAM hold exactly ``manifest``'s entries; chunks in ``fresh`` need no read.

        Serialised by ``_sync_lock`` (a searcher's refresh may race its own process's writer
        to the same new manifest; whoever comes second finds nothing left to do).  New entries
        are written into slots no search sees yet before ``_lock`` is taken, so searches wait
        only for the in-RAM swap.
        """
        with self._sync_lock:
            if manifest["generation"] <= self._m["generation"]:
                return
            self._sync_locked(manifest, fresh or {}, relocated or {})

    def _sync_locked(self, manifest: dict, fresh: dict[ChunkId, Entries], relocated: dict[ChunkId, ChunkId]) -> None:
        diff = _diff(self._m["files"], manifest["files"])
        for new_id, old_id in relocated.items():
            diff.removed.pop(old_id, None)
            diff.added.pop(new_id, None)
        added = list(diff.added.values())
        with self._lock:
            slots = self._alloc(sum(rec.tokens for _path, rec in added))
        try:
            at = self._fill(slots, added, fresh)
        except BaseException:
            with self._lock:
                self._free.append(slots)
            raise
        with self._lock:
            for new_id, old_id in relocated.items():
                self._chunk_slots[new_id] = self._chunk_slots.pop(old_id)
                self._seg_live[old_id[0]] -= len(self._chunk_slots[new_id])
                self._seg_live[new_id[0]] += len(self._chunk_slots[new_id])
            gone = [self._chunk_slots.pop(cid) for cid in diff.removed]
            for cid, (_path, rec) in diff.removed.items():
                self._seg_live[cid[0]] -= rec.tokens
            if gone:
                self._search.remove(np.concatenate(gone))
                self._file[np.concatenate(gone)] = -1
            for (_path, rec), a, b in zip(added, at, at[1:]):
                self._chunk_slots[rec.id] = slots[a:b]
                self._seg_live[rec.segment] += rec.tokens
            self._search.add(slots)
            for cid, (path, rec, old_start) in diff.moved.items():
                s = self._chunk_slots[cid]
                self._pos[s] += rec.start - old_start
                self._file[s] = self._path_id(path)
            for seg in [s for s, n in self._seg_live.items() if n <= 0]:
                del self._seg_live[seg]
            self._m = manifest
            self._maybe_purge()
        self._note_manifest()
        self._search.maybe_build()

    def _fill(self, slots: np.ndarray, added: list[tuple[str, ChunkRecord]],
              fresh: dict[ChunkId, Entries]) -> list[int]:
        """Write the ``added`` chunks' entries into ``slots``, which no search sees yet.

        Fresh chunks come from RAM.  The others are read one segment at a time, so reading a
        store costs one segment's bytes on top of its RAM tables, not a copy of them all.
        Returns where each chunk starts in ``slots`` (and the end).
        """
        at = np.cumsum([0] + [rec.tokens for _path, rec in added]).tolist()
        by_segment: dict[int, list[int]] = {}
        for j, (path, rec) in enumerate(added):
            if rec.id in fresh:
                self._put(slots[at[j] : at[j + 1]], path, rec, fresh[rec.id])
            else:
                by_segment.setdefault(rec.segment, []).append(j)
        for seg, chunks in by_segment.items():
            entries = read_segment(self.dir, seg, self.heads, self.dim)
            for j in chunks:
                path, rec = added[j]
                if rec.row + rec.tokens > len(entries):
                    raise CorruptStore(f"{self.dir / segment_name(seg)}: the manifest names rows it does not have")
                self._put(slots[at[j] : at[j + 1]], path, rec, entries.take(rec.row, rec.row + rec.tokens))
        return at

    def _put(self, slots: np.ndarray, path: str, rec: ChunkRecord, e: Entries) -> None:
        self._search.keys.put(slots, e.keys, e.key_scales)
        self._values[slots] = e.values
        self._value_scales[slots] = e.value_scales
        self._tokens[slots] = e.tokens
        self._pos[slots] = rec.start + e.offsets.astype(np.int64)
        self._file[slots] = self._path_id(path)

    def _gather(self, slots: np.ndarray, start: int) -> Entries:
        """The stored entries in ``slots``, with offsets relative to ``start``."""
        keys = self._search.keys
        return Entries(
            np.ascontiguousarray(keys.codes[:, slots].transpose(1, 0, 2)),
            np.ascontiguousarray(keys.scales[:, slots].T),
            self._values[slots], self._value_scales[slots], self._tokens[slots],
            (self._pos[slots] - start).astype(np.uint32),
        )

    def _path_id(self, path: str) -> int:
        pid = self._path_ids.get(path)
        if pid is None:
            pid = self._path_ids[path] = len(self._paths)
            self._paths.append(path)
        return pid

    # ------------------------------------------------------------------ slots

    def _alloc(self, n: int) -> np.ndarray:
        got: list[np.ndarray] = [np.zeros(0, np.int64)]
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
        """Room for ``n`` slots and some to spare, one array at a time: the peak is one array's
        copy, not all.

        A full store grows by a quarter (a doubling overshoots by 100s of MB).  A store read
        from disk is sized by its entries, and without room to spare the first edit after
        opening it would copy every array: 113 ms of the first new-function trial's 242 ms
        write on flask's 315k entries.  The spare slots cost no memory until they are written
        (large zeroed arrays come from fresh pages)."""
        if n <= self._tokens.shape[0]:
            return
        cap = max(n + max(4096, n // 16), self._tokens.shape[0] * 5 // 4)
        for name in ("_values", "_value_scales", "_tokens", "_pos", "_file"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)
            del old, new
        self._search.keys.reserve(cap)

    def _maybe_purge(self, force: bool = False) -> None:
        freed = self._search.purge(force)
        if freed.size:
            self._free.append(freed)

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
            segments = _NewSegments(old["next_segment"], self.options.segment_rows)
            fresh: dict[ChunkId, Entries] = {}
            now = time.time()
            for put in puts:
                prev = files.get(put.path)
                have = {rec.hash: rec for rec in prev["chunks"]} if prev else {}
                recs = []
                for ch in put.chunks:
                    if isinstance(ch, KeptChunk):
                        if ch.hash not in have:
                            raise StoreError(f"{put.path}: no stored chunk with hash {ch.hash} to keep")
                        recs.append(have[ch.hash]._replace(start=ch.start, end=ch.end))
                    else:
                        seg, row = segments.place(ch.entries)
                        recs.append(ChunkRecord(ch.start, ch.end, ch.hash, seg, row, len(ch.entries), tuple(ch.names)))
                        fresh[(seg, row)] = ch.entries
                edited = prev["edited"] if prev and prev["hash"] == put.content_hash else now
                files[put.path] = {"hash": put.content_hash, "edited": edited, "chunks": recs}
            for path in removes:
                files.pop(path, None)
            # live entries now plus those written is an upper bound: skip the walk under the cap
            over = self._search.live + sum(len(e) for e in fresh.values()) > self.options.cap_tokens
            hashes = {p: f["hash"] for p, f in files.items()} if over else {}
            evicted = self._evict(files, protect={p.path for p in puts}) if over else []
            if evicted:
                log.info("memory over %d tokens: evicted %d file(s)", self.options.cap_tokens, len(evicted))
            # remembered so that a refresh does not encode them again only to evict others
            out = {p: h for p, h in old.get("evicted", {}).items() if p not in files and p not in removes}
            out.update((p, hashes[p]) for p in evicted)
            new = self._next_manifest(old, files, segments.sizes(), segments.end, evicted=out)
            if evicted:
                new["evicted_cap"] = self.options.cap_tokens
            segments.write(self.dir, self.heads, self.dim, keep=new["segments"])  # before the manifest names them
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
                if (ch.entries.heads, ch.entries.dim) != (self.heads, self.dim):
                    raise StoreError(f"{put.path}: entries of {ch.entries.heads} heads x {ch.entries.dim} dims, "
                                     f"the store holds {self.heads} heads x {self.dim} dims")
                if not all(isinstance(n, str) for n in ch.names):
                    raise StoreError(f"{put.path}: chunk names must be strings")
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

    def _next_manifest(self, old: dict, files: dict, new_segments: dict[int, int] | None = None,
                       next_segment: int | None = None, evicted: dict[str, str] | None = None) -> dict:
        """The generation after ``old`` holding ``files``: segments no chunk uses are dropped."""
        diff = _diff(old["files"], files)
        live = Counter(self._seg_live)
        for cid, (_p, rec) in diff.removed.items():
            live[cid[0]] -= rec.tokens
        for cid, (_p, rec) in diff.added.items():
            live[cid[0]] += rec.tokens
        segments = {s: n for s, n in old["segments"].items() if live[s] > 0}
        segments.update((s, n) for s, n in (new_segments or {}).items() if live[s] > 0)
        return dict(
            old,
            generation=old["generation"] + 1,
            next_segment=old["next_segment"] if next_segment is None else next_segment,
            files=files,
            segments=segments,
            evicted=old.get("evicted", {}) if evicted is None else evicted,
        )

    def _evict(self, files: dict, protect: set[str]) -> list[str]:
        sizes = {p: sum(rec.tokens for rec in f["chunks"]) for p, f in files.items()}
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
        ours = f".{CELLS}.{os.getpid()}."  # this process's cells being written (``_save_cells``)
        for entry in os.scandir(self.dir):
            seg = segment_id(entry.name)
            if (seg is not None and seg not in manifest["segments"]) or (
                    entry.name.endswith(".tmp") and not entry.name.startswith(ours)):
                with contextlib.suppress(FileNotFoundError):  # another process's temp file, renamed meanwhile
                    os.unlink(entry.path)

    def remove_files(self, paths: Iterable[str]) -> int:
        return self.update(removes=paths)

    def clear(self) -> int:
        """Drop every entry (a new, empty generation); the store itself stays."""
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            self._catch_up()
            old = self._m
            new = self._next_manifest(old, {}, evicted={})
            write_manifest(self.dir, new)
            self._sync_to(new)
            self._retire_segments(old, new)
            with self._lock:
                self._maybe_purge(force=True)
            return new["generation"]

    def _garbage_rows(self) -> int:
        return sum(n - self._seg_live.get(s, 0) for s, n in self._m["segments"].items())

    def _maybe_auto_compact(self) -> None:
        if self._garbage_rows() > max(65_536, self._search.live // 4):
            self._compact_locked()

    def compact(self) -> int:
        """Rewrite segments that hold dead rows, purge tombstones, retrain stale IVF indexes."""
        with self._write_lock, WriterLock(self.dir, self.options.lock_timeout):
            self._catch_up()
            generation = self._compact_locked()
            self._remove_orphans(self._m)
        self._search.maybe_build(force=True)
        return generation

    def _compact_locked(self) -> int:
        """Copy the live chunks of partly dead segments into new segments, written as they fill.

        Relocated chunks keep their slots: nothing is read back.
        """
        old = self._m
        holey = {s for s, n in old["segments"].items() if self._seg_live.get(s, 0) < n}
        segments = _NewSegments(old["next_segment"], self.options.segment_rows)
        relocated: dict[ChunkId, ChunkId] = {}
        written: dict[int, int] = {}
        files = {}
        for path, f in old["files"].items():
            recs = list(f["chunks"])
            for i, rec in enumerate(recs):
                if rec.segment in holey:
                    with self._lock:
                        entries = self._gather(self._chunk_slots[rec.id], rec.start)
                    seg, row = segments.place(entries)
                    recs[i] = rec._replace(segment=seg, row=row)
                    relocated[(seg, row)] = rec.id
                    written.update(segments.write(self.dir, self.heads, self.dim, all=False))
            files[path] = dict(f, chunks=recs)
        written.update(segments.write(self.dir, self.heads, self.dim))
        kept = {s: n for s, n in old["segments"].items() if s not in holey}
        new = dict(old, generation=old["generation"] + 1, next_segment=segments.end, files=files,
                   segments=kept | written)
        write_manifest(self.dir, new)
        self._sync_to(new, None, relocated)
        self._retire_segments(old, new)
        with self._lock:
            self._maybe_purge(force=True)
        return new["generation"]

    # ------------------------------------------------------------------ approximate index

    @contextlib.contextmanager
    def bulk(self) -> Iterator[MemoryStore]:
        """Hold IVF (re)builds during a bulk load (a full index): each would snapshot the store
        and briefly hold two indexes of a head; one build at the end does the job."""
        with self._search.bulk():
            yield self

    def _offer_cells(self) -> None:
        """Offer the IVF cells saved by an earlier build (``cells.py``) to the first build."""
        try:
            saved = read_cells(self.dir, Stamp(self.fingerprint, self.heads, self.dim))
        except CorruptStore as e:
            log.warning("%s; the IVF indexes will be trained again", e)
            return
        if saved is None:
            return
        with self._lock:
            chunks = {rec.id: rec for f in self._m["files"].values() for rec in f["chunks"]}
            slots, lists, missing, at = [], [], 0, 0
            for segment, row, tokens, content in saved.chunks:
                rec = chunks.get((segment, row))
                if rec is not None and (rec.tokens, rec.hash) == (tokens, content):
                    slots.append(self._chunk_slots[rec.id])
                    lists.append(saved.lists[:, at : at + tokens])
                else:
                    missing += tokens
                at += tokens
            if slots:
                self._search.offer(saved, np.concatenate(slots), np.concatenate(lists, axis=1), missing)

    def _save_cells(self) -> None:
        """After an IVF build: save its cells, so that the next process to open the store need
        not train them (``cells.py``).  A cache: failing to write it loses nothing."""
        with self._lock:
            recs = [rec for f in self._m["files"].values() for rec in f["chunks"]]
            slots = [self._chunk_slots[rec.id] for rec in recs]
            saved = self._search.saved_cells([(r.segment, r.row, r.tokens, r.hash) for r in recs],
                                             np.concatenate(slots) if slots else np.zeros(0, np.int64))
        if saved is None:
            return
        try:
            write_cells(self.dir, Stamp(self.fingerprint, self.heads, self.dim), saved)
        except OSError as e:
            log.warning("could not save the IVF cells in %s (%s); the next start trains them again", self.dir, e)

    def wait_for_index(self, timeout: float | None = None) -> None:
        """Block until a background IVF build (if any) has finished."""
        self._search.wait(timeout)

    # ------------------------------------------------------------------ searching

    def search(self, queries: np.ndarray, k: int, hide: Collection[str] = (),
               heads: Sequence[int] | None = None) -> Hits:
        """Top-k entries by inner product for each head's queries, ``queries`` (H, nq, D).

        Query set h searches head h's keys only, and its hits carry head h's keys and values.
        ``heads``: search only these heads, ``queries`` then (len(heads), nq, D) and the hits'
        leading axis follows ``heads``.  ``hide``: files left out of this search only.
        Evaluation uses it to score a file against the memory of the rest of its repository
        without rebuilding the store.
        """
        heads = list(range(self.heads)) if heads is None else [int(h) for h in heads]
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[0] != len(heads) or q.shape[2] != self.dim:
            raise StoreError(f"queries must be shaped ({len(heads)}, nq, {self.dim}), got {q.shape}")
        if not all(0 <= h < self.heads for h in heads):
            raise StoreError(f"heads {heads} out of range: the store holds {self.heads}")
        self._maybe_refresh()
        head = np.asarray(heads, dtype=np.int64)[:, None, None]
        with self._lock:
            hidden = self._slots_of(hide) if hide else None
            scores, slots = self._search.search(q, k, heads, hidden)
            ok = slots >= 0
            safe = np.where(ok, slots, 0)
            keys = dequantize(self._search.keys.codes[head, safe], self._search.keys.scales[head, safe])
            values = dequantize(self._values[safe, head], self._value_scales[safe, head])
            tokens = np.where(ok, self._tokens[safe], -1)
            fids = np.where(ok, self._file[safe], -1)
            offsets = np.where(ok, self._pos[safe], -1)
        keys[~ok] = 0.0
        values[~ok] = 0.0
        scores = np.where(ok, scores, -np.inf).astype(np.float32)
        return Hits(scores, slots, keys, values, tokens.astype(np.int64), fids, offsets, self._paths)

    def search_head(self, head: int, queries: np.ndarray, k: int, hide: Collection[str] = ()) -> Hits:
        """``search`` of one head, ``queries`` (nq, D); the hits keep a leading axis of 1."""
        return self.search(np.asarray(queries)[None], k, hide, heads=(head,))

    def path_of(self, file_id: int) -> str:
        """The path behind a hit's file id (``Hits.file_ids``); ids never change meaning."""
        return self._paths[file_id]

    def _slots_of(self, paths: Collection[str]) -> np.ndarray:
        files = self._m["files"]
        parts = [self._chunk_slots[rec.id] for path in paths for rec in files.get(path, {}).get("chunks", ())]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # ------------------------------------------------------------------ inspecting

    @property
    def generation(self) -> int:
        return self._m["generation"]

    def names(self) -> dict[str, list[str]]:
        """The identifiers each file's chunks define: path -> names in chunk order, each once.

        Built once per generation and shared by every caller until the next: do not modify.
        """
        self._maybe_refresh()
        with self._lock:
            generation = self._m["generation"]
            if self._names is None or self._names[0] != generation:
                self._names = (generation, {
                    path: list(dict.fromkeys(name for rec in f["chunks"] for name in rec.names))
                    for path, f in self._m["files"].items()
                })
            return self._names[1]

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
            parts = [self._gather(self._chunk_slots[rec.id], rec.start) for rec in f["chunks"]]
            return Entries.concat(parts, self.heads, self.dim)

    def stats(self) -> dict:
        with self._lock:
            live = self._search.live
            disk = _disk_bytes(self.dir)
            return {
                "directory": str(self.dir),
                "workspace": self._m.get("workspace"),
                "generation": self._m["generation"],
                "fingerprint": self.fingerprint,
                "heads": self.heads,
                "dim": self.dim,
                "files": len(self._m["files"]),
                "chunks": len(self._chunk_slots),
                "entries": live,
                "cap_tokens": self.options.cap_tokens,
                "segments": len(self._m["segments"]),
                "garbage_rows": self._garbage_rows(),
                "disk_bytes": disk,
                "bytes_per_entry": disk / live if live else None,
                **self._search.stats(),
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
    return FileInfo(f["hash"], f["edited"], [ChunkInfo(r.start, r.end, r.hash, r.tokens, r.names) for r in f["chunks"]])

"""A workspace kept in memory: scan → read → chunk → encode what changed → store.

One ``Indexer`` per workspace folder, over that folder's ``MemoryStore``.  ``refresh`` brings
the whole folder up to date (the daemon's job, and the language server's at start);
``sync_paths`` and ``update_text`` do the same for a few paths, which is what file watchers and
editor events call.  The store decides nothing here; this module decides *what* to store:

- a file whose content hash the store already holds is not read further;
- within a changed file, chunks whose hash (path, context, bytes) the store holds are kept, not
  re-encoded, also across restarts (the hashes live in the store's manifest);
- work is committed every ``commit_tokens`` tokens, so an interrupted run loses at most that
  much, and the next run resumes by skipping what is already stored.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..store.memory_store import FileUpdate, KeptChunk, MemoryStore, NewChunk
from .chunks import chunk_file, defined_names
from .encode import Encoder, Job, chunk_hashes, preamble
from .scan import Rules, ScanOptions, content_problem, read_text, rules_file, walk

log = logging.getLogger("mtlsp.indexer")
_BUFFER_CONTEXTS = 64


@dataclass
class Progress:
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    tokens: int = 0  # tokens encoded so far
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.started)

    @property
    def eta_s(self) -> float | None:
        if not self.bytes_done:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done


@dataclass
class Report:
    files: int = 0  # files the scan accepted
    indexed: int = 0  # files whose entries changed
    unchanged: int = 0
    removed: int = 0
    evicted: int = 0  # left out: evicted for capacity earlier and unchanged since
    skipped: int = 0  # unreadable, binary, not UTF-8, generated...
    chunks_encoded: int = 0
    chunks_kept: int = 0
    tokens_encoded: int = 0
    seconds: float = 0.0
    rescanned: bool = False  # the whole folder was read again (``refresh``): buffers were overwritten


@dataclass
class _Plan:
    path: str
    digest: str
    data: bytes
    chunks: list  # KeptChunk | Job, in file order
    context: list[int]  # what its chunks but the first are read after (``Encoder.context``)


class Indexer:
    def __init__(
        self,
        root: str | Path,
        store: MemoryStore,
        encoder: Encoder,
        *,
        scan: ScanOptions | None = None,
        commit_tokens: int = 16_384,
        recent_s: float = 600.0,
    ) -> None:
        """``recent_s``: how long a name that an editor's edit added counts as new (``gained``)."""
        self.root = Path(root).resolve()
        self.store = store
        self.encoder = encoder
        self.scan = scan or ScanOptions()
        self.rules = Rules(self.root, self.scan)
        self.commit_tokens = commit_tokens
        self._lock = threading.Lock()  # one plan or commit at a time (the encoder is not reentrant)
        self.recent_s = recent_s
        self._gained: dict[str, dict[str, float]] = {}  # rel -> top-level name an edit added -> when
        # rel -> (content digest, context) of the buffers ``update_text`` and ``prepare`` were given
        self._buffer_contexts: dict[str, tuple[str, list[int]]] = {}

    # ------------------------------------------------------------------ whole folder

    def refresh(
        self,
        progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Report:
        """Bring the store up to date with the folder; ``stop`` ends it early (consistently).

        The indexing lock is taken per file and per commit, not for the whole pass, so that
        ``update_text`` and ``sync_paths`` (an editor's edits) get through during a long first
        pass.  A file edited meanwhile may be stored from disk once more by this pass; callers
        that feed unsaved buffers feed them again when it ends.
        """
        with self.store.bulk():
            t0 = time.monotonic()
            report = Report(rescanned=True)
            with self._lock:
                self.rules = Rules(self.root, self.scan)  # ignore files may have changed
                found = list(walk(self.root, self.scan))
                report.files = len(found)
                stored = self.store.files()
                evicted = self.store.evicted()
                gone = sorted((stored.keys() | evicted.keys()) - {f.path for f in found})
                if gone:
                    self.store.remove_files(gone)
                    report.removed = len(gone)
            prog = Progress(files_total=len(found), bytes_total=sum(f.size for f in found))
            pending: list[_Plan] = []
            pending_tokens = 0
            for f in found:
                if stop is not None and stop.is_set():
                    break
                with self._lock:
                    plan = self._plan(f.path, None, report, evicted)
                prog.files_done += 1
                prog.bytes_done += f.size
                if plan is not None:
                    pending.append(plan)
                    pending_tokens += sum(len(c.ids) for c in plan.chunks if isinstance(c, Job))
                    if pending_tokens >= self.commit_tokens:
                        with self._lock:
                            prog.tokens += self._commit(pending, report)
                        pending, pending_tokens = [], 0
                if progress is not None:
                    progress(prog)
            if pending:
                with self._lock:
                    prog.tokens += self._commit(pending, report)
                if progress is not None:
                    progress(prog)
            report.seconds = time.monotonic() - t0
            return report

    # ------------------------------------------------------------------ a few paths

    def sync_paths(self, paths: Iterable[str], stop: threading.Event | None = None) -> Report:
        """Re-read these workspace-relative paths: changed ones re-indexed, missing ones dropped.

        What file watchers, didSave and didChangeWatchedFiles call.  A changed ``.gitignore`` or
        ``.mtlspignore`` among them changes which files belong in the memory, so the whole
        folder is refreshed instead (``stop`` ends that early): ``Report.rescanned`` tells a
        caller holding unsaved buffers to feed them again.
        """
        paths = list(dict.fromkeys(paths))
        if any(rules_file(p) for p in paths):
            return self.refresh(stop=stop)
        with self._lock:
            t0 = time.monotonic()
            report = Report()
            plans, gone = [], []
            stored = self.store.files()
            for rel in paths:
                path = self.root / rel
                if not path.is_file() or self.rules.ignored_path(rel, False):
                    if rel in stored:
                        gone.append(rel)
                    continue
                skipped = report.skipped
                plan = self._plan(rel, None, report)
                if plan is not None:
                    plans.append(plan)
                elif rel in stored and report.skipped > skipped:
                    gone.append(rel)  # now binary / generated / too big: forget the old entries
            if gone:
                self.store.remove_files(gone)
                report.removed = len(gone)
            if plans:
                self._commit(plans, report)
            report.seconds = time.monotonic() - t0
            return report

    def update_text(self, rel: str, text: str) -> Report:
        """Index an editor buffer's text (unsaved edits too) under its workspace path."""
        with self._lock:
            t0 = time.monotonic()
            report = Report()
            if self.rules.ignored_path(rel, False):
                return report
            plan = self._plan(rel, text.encode("utf-8"), report)
            if plan is not None:
                # the file's own stored record, not ``store.names()``: that map of every file is
                # rebuilt at each generation, and every buffer write makes one
                held = self.store.file_info(rel)
                self._commit([plan], report)
                self._note_context(rel, plan.digest, plan.context)
                if held is not None:  # a file the memory held: what did the edit add?
                    self._note_gained(rel, plan.data, {n for c in held.chunks for n in c.names})
            report.seconds = time.monotonic() - t0
            return report

    def prepare(self, rel: str, text: str) -> None:
        """Read the context that ``rel``'s chunks are encoded after (its header and imports),
        so that the first edit of a file just opened reaches the memory as fast as the next
        ones (``Encoder.kept_contexts``).  Nothing for a file the memory would not hold."""
        data = text.encode("utf-8")
        if self.rules.ignored_path(rel, False) or content_problem(data, self.scan.max_bytes):
            return
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        with self._lock:
            got = self._buffer_contexts.get(rel)
            if got is None or got[0] != digest:  # not the text ``update_text`` just planned: parse it
                got = (digest, self.encoder.context(rel, preamble(data, chunk_file(rel, data))))
                self._note_context(rel, *got)
            self.encoder.prepare(got[1])

    def _note_context(self, rel: str, digest: str, context: list[int]) -> None:
        """Remember a buffer's context, the last ``_BUFFER_CONTEXTS`` buffers' (editors open few)."""
        self._buffer_contexts.pop(rel, None)
        self._buffer_contexts[rel] = (digest, context)
        while len(self._buffer_contexts) > _BUFFER_CONTEXTS:
            del self._buffer_contexts[next(iter(self._buffer_contexts))]

    def gained(self, rel: str) -> frozenset[str]:
        """The top-level names that editors' edits added to ``rel`` in the last ``recent_s``
        seconds: functions typed a moment ago.  The model has never seen them written after
        ``module.``, and a 135M model finds an unseen 8-token name 15-20 nats less likely than a
        short name the module already had (``testapp`` over ``tally_orphaned_ribbons`` after
        ``importerrorapp.t``), so completions after ``module.`` list them first."""
        got = self._gained.get(rel)
        if not got:
            return frozenset()
        now = time.monotonic()
        # a copy: the indexing thread may be noting an edit meanwhile (dict.copy holds the GIL)
        return frozenset(n for n, t in got.copy().items() if now - t <= self.recent_s)

    def _note_gained(self, rel: str, data: bytes, known: set[str]) -> None:
        """Remember the top-level names ``data`` defines that the stored file did not (names
        the file no longer defines, or that are older than ``recent_s``, are forgotten)."""
        now = time.monotonic()
        top = {n for _, n in defined_names(rel, data, depth=0)}
        got = self._gained.setdefault(rel, {})
        for n in top - known:
            got.setdefault(n, now)
        for n in [n for n, t in got.items() if n not in top or now - t > self.recent_s]:
            del got[n]
        if not got:
            del self._gained[rel]

    def relative(self, path: str | Path) -> str | None:
        """``path`` relative to the workspace, or None if it lies outside."""
        p = Path(path)
        try:
            return (p if p.is_absolute() else self.root / p).relative_to(self.root).as_posix()
        except ValueError:
            return None

    # ------------------------------------------------------------------ internals

    def _plan(self, rel: str, data: bytes | None, report: Report, evicted: dict[str, str] | None = None) -> _Plan | None:
        """What storing ``rel`` takes, or None if it is unchanged or unreadable.

        ``evicted`` (a refresh's): files the memory dropped for capacity, left out while their
        content is the same; an editor's edit or a changed file brings them back.
        """
        if data is None:
            got = read_text(self.root, rel, self.scan.max_bytes)
            if got is None:
                report.skipped += 1
                return None
            data = got[0]
        else:
            problem = content_problem(data, self.scan.max_bytes)
            if problem:
                log.info("not indexing %s: %s", rel, problem)
                report.skipped += 1
                return None
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        if evicted is not None and evicted.get(rel) == digest:
            report.evicted += 1
            return None
        info = self.store.file_info(rel)
        if info is not None and info.content_hash == digest:
            report.unchanged += 1
            return None
        have = {c.hash for c in info.chunks} if info else set()
        chunks = chunk_file(rel, data)
        context = self.encoder.context(rel, preamble(data, chunks))
        names = defined_names(rel, data)
        planned: list = []
        for c, h in zip(chunks, chunk_hashes(rel, data, chunks), strict=True):
            if h in have:
                planned.append(KeptChunk(c.start, c.end, h))
            else:
                inside = tuple(dict.fromkeys(n for at, n in names if c.start <= at < c.end))
                planned.append(self.encoder.job(rel, data, c, h, context, inside))
        return _Plan(rel, digest, data, planned, context)

    def _commit(self, plans: list[_Plan], report: Report) -> int:
        """Encode the plans' new chunks and store all plans in one generation."""
        plans = [q for p in plans if (q := self._current(p)) is not None]
        jobs = [c for p in plans for c in p.chunks if isinstance(c, Job)]
        entries = dict(zip(map(id, jobs), self.encoder.encode(jobs), strict=True))
        updates = []
        for p in plans:
            chunks = []
            for c in p.chunks:
                if isinstance(c, Job):
                    chunks.append(NewChunk(c.chunk.start, c.chunk.end, c.hash, entries[id(c)], c.names))
                    report.chunks_encoded += 1
                else:
                    chunks.append(c)
                    report.chunks_kept += 1
            updates.append(FileUpdate(p.path, p.digest, chunks))
        self.store.update(updates)
        tokens = sum(len(j.ids) for j in jobs)
        report.indexed += len(plans)
        report.tokens_encoded += tokens
        return tokens

    def _current(self, plan: _Plan) -> _Plan | None:
        """``plan`` again if the file's stored chunks changed since it was made (an editor's
        buffer committed in between): the chunks it meant to keep may be gone."""
        info = self.store.file_info(plan.path)
        held = {c.hash for c in info.chunks} if info else set()
        if all(c.hash in held for c in plan.chunks if isinstance(c, KeptChunk)):
            return plan
        return self._plan(plan.path, plan.data, Report())

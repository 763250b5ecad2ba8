"""What the server holds per workspace: the model once (``Engine``) and a ``Folder`` per root.

A ``Folder`` owns a workspace folder's store, indexer and file watching, and two threads:

- the *indexing* thread runs the first full pass (and re-index commands) with progress;
- the *writer* thread applies editor events: open buffers' text after ``debounce`` seconds of
  quiet (unsaved edits included, so a function typed in one buffer reaches the memory without a
  save) and paths reported changed on disk.  The indexer's lock is per file and per commit, so
  these get through while a long first pass runs; when the pass ends, the open buffers are fed
  again, because the pass stores files as they are on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from mtlsp_model.runtime import for_inference, int8_encoding
from mtlsp_model.weights import Loaded, load_weights

from .complete.candidates import ModuleNames, Sources
from .complete.completer import Completer, Recall
from .complete.decode import Decoder
from .complete.retrieval import StoreMemory
from .complete.static import Jedi
from .gate import ModelGate
from .index.chunks import defined_names
from .index.encode import Encoder
from .index.indexer import Indexer, Progress, Report
from .index.scan import ScanOptions, read_text
from .index.watch import Watcher
from .lsp.settings import Settings
from .store.memory_store import MemoryStore, StoreOptions

log = logging.getLogger("mtlsp.workspace")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where torch sees it, else the CPU; ``cuda`` without CUDA warns and uses
    the CPU (a settings file shared between machines must not stop the server)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        log.warning("device 'cuda' asked for, but torch sees no CUDA device: using the CPU")
        name = "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r} (auto, cpu or cuda)")
    return torch.device(name)


class Engine:
    """The model on its device, with its decoder, completer and encoder: shared by all folders."""

    def __init__(self, loaded: Loaded, device: torch.device, weights: Path | None) -> None:
        self.loaded = loaded
        self.device = device
        self.weights = weights
        self.decoder = Decoder(loaded.model, loaded.tokenizer)
        self.gate = ModelGate()  # completions before memory writes (the server holds it for completions)
        self.encoder = Encoder(loaded.model, loaded.tokenizer, gate=self.gate)

    def completer(self, context_tokens: int) -> Completer:
        return Completer(self.decoder, prefix_tokens=context_tokens)

    @classmethod
    def load(cls, weights: Path | None, device: str, base: str | None = None) -> Engine:
        """Raises ``WeightsError`` (a clear message) for missing or corrupt weights or base.

        The base is fetched and converted on first use; its messages go to the log, never to
        stdout (the language server's channel).
        """
        dev = resolve_device(device)
        loaded = load_weights(weights, base=base, echo=log.warning)
        for_inference(loaded.model, dev)
        int8_encoding(loaded.model, loaded.tokenizer, loaded.info.get("base_folder"))  # where it pays (``runtime.py``)
        engine = cls(loaded, dev, weights)
        engine.encoder.warm_up()
        return engine

    def open_memory(self, root: Path, *, cap_tokens: int, cache_root: str | Path | None = None,
                    scan: ScanOptions | None = None, ann_background: bool = True) -> tuple[MemoryStore, Indexer]:
        """A folder's store (refused and rebuilt if another model wrote it) and its indexer."""
        cfg = self.loaded.config
        options = StoreOptions(cap_tokens=cap_tokens, device=self.device.type, ann_background=ann_background,
                               ann_k=cfg.knn_k)
        store = MemoryStore.open(root, fingerprint=self.loaded.store_fingerprint, heads=len(cfg.memory_kv_heads),
                                 dim=cfg.head_dim, cache_root=cache_root, options=options)
        return store, Indexer(root, store, self.encoder, scan=scan)


@dataclass
class IndexState:
    phase: str = "starting"  # starting | indexing | ready | cancelled | failed
    progress: Progress | None = None
    report: Report | None = None
    error: str | None = None


class Folder:
    """The server's one handle on a workspace folder: buffers, file events, settings, status.

    The server never reaches the store, indexer or watcher itself, so a setting or an event
    that concerns several of them (a debounce, an open buffer) is applied in one place.
    """

    def __init__(self, root: Path, engine: Engine, settings: Settings, *, texts: Callable[[str], str | None]) -> None:
        """``texts(rel)`` returns an open buffer's current text (None if not open)."""
        self.root = root.resolve()
        self.engine = engine
        self.texts = texts
        self.store, self.indexer = engine.open_memory(self.root, cap_tokens=settings.memory_cap,
                                                      cache_root=settings.store_path)
        self.jedi = Jedi(self.root)
        self.recall = Recall(StoreMemory(self.store), self.line_of,
                             Sources(self.names, self.jedi.names_at,
                                     ModuleNames(self.current_text, self.indexer.gained)))
        self._buffer_names: dict[str, tuple[str, list[str]]] = {}  # rel -> (text, names it defines)
        self._disk_texts: dict[str, tuple[tuple[int, int], str | None]] = {}  # rel -> ((mtime, size), text)
        self.state = IndexState()
        self.debounce = settings.debounce_ms / 1000
        self.watcher: Watcher | None = None
        self._pending_text: dict[str, float] = {}  # rel -> when its buffer may be written
        self._pending_paths: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._index_stop = threading.Event()
        self._index_thread: threading.Thread | None = None
        self._writer = threading.Thread(target=self._write_loop, name=f"mtlsp-writer-{self.root.name}", daemon=True)
        self._writer.start()
        # rel -> (mtime_ns or buffer text, bytes): a completion asks for many lines of few files
        self._bytes: dict[str, tuple[object, bytes]] = {}

    # ------------------------------------------------------------------ indexing

    def index(self, on_progress: Callable[[Progress], None], on_done: Callable[[IndexState], None]) -> threading.Event:
        """Start a full pass in the background; the returned event cancels it."""
        if self._index_thread is not None and self._index_thread.is_alive():
            self._index_stop.set()
            self._index_thread.join()
        self._index_stop = stop = threading.Event()

        def run() -> None:
            self.state = IndexState("indexing")
            try:
                report = self.indexer.refresh(progress=self._progress(on_progress), stop=stop)
                self.state = IndexState("cancelled" if stop.is_set() else "ready", self.state.progress, report)
            except Exception as e:  # a broken store or model must not take the server down
                log.exception("indexing %s failed", self.root)
                self.state = IndexState("failed", self.state.progress, error=str(e))
            self.refeed_open_buffers()
            on_done(self.state)

        self._index_thread = threading.Thread(target=run, name=f"mtlsp-index-{self.root.name}", daemon=True)
        self._index_thread.start()
        return stop

    def _progress(self, on_progress: Callable[[Progress], None]) -> Callable[[Progress], None]:
        def report(p: Progress) -> None:
            self.state.progress = p
            on_progress(p)
        return report

    def watch_disk(self) -> None:
        """Watch the folder with watchdog (for clients that do not report file changes)."""
        if self.watcher is None:
            self.watcher = Watcher(self.indexer, debounce=self.debounce, after_rescan=self.refeed_open_buffers)
            self.watcher.start()

    @property
    def polling(self) -> bool:
        """Whether the watcher fell back to periodic rescans (inotify limits reached)."""
        return self.watcher is not None and self.watcher.polling

    def stats(self) -> dict:
        """The memory's size and where it lives (``MemoryStore.stats``)."""
        return self.store.stats()

    def apply(self, settings: Settings) -> None:
        """Changed settings that take effect without reopening the store: the memory cap (at
        the store's next commit) and the debounce of buffer edits and of disk events."""
        self.store.options.cap_tokens = settings.memory_cap
        self.debounce = settings.debounce_ms / 1000
        if self.watcher is not None:
            self.watcher.set_debounce(self.debounce)

    # ------------------------------------------------------------------ editor events

    def open_buffer(self, rel: str) -> None:
        """Mark ``rel`` open: its buffer's text is what the memory should hold, and eviction
        spares it.  Its text is fed on its next change or when the indexing pass ends."""
        self.store.open_files.add(rel)

    def close_buffer(self, rel: str) -> None:
        """The buffer of ``rel`` was closed: the file on disk is the truth again."""
        self.store.open_files.discard(rel)
        self.paths_changed([rel])

    def is_ignored(self, rel: str) -> bool:
        """Whether the scan rules (``.gitignore``, ``.mtlspignore``, secrets, generated files) keep ``rel`` out."""
        return self.indexer.rules.ignored_path(rel, False)

    def buffer_changed(self, rel: str) -> None:
        """An open buffer's text changed: it is written into the memory after ``debounce``."""
        self.open_buffer(rel)
        with self._cond:
            self._pending_text[rel] = time.monotonic() + self.debounce
            self._cond.notify_all()

    def paths_changed(self, rels: list[str]) -> None:
        with self._cond:
            self._pending_paths.update(rels)
            self._cond.notify_all()

    def refeed_open_buffers(self) -> None:
        with self._cond:
            self._pending_text.update({rel: 0.0 for rel in self._open_rels()})
            self._cond.notify_all()

    def _open_rels(self) -> list[str]:
        return [rel for rel in self.store.open_files if self.texts(rel) is not None]

    def _write_loop(self) -> None:
        """Apply editor events until ``close``; what is pending then is applied before exiting."""
        while True:
            with self._cond:
                now = time.monotonic()
                stopping = self._stop.is_set()
                due = [rel for rel, t in self._pending_text.items() if t <= now or stopping]
                paths = sorted(self._pending_paths)
                if not due and not paths:
                    if stopping:
                        return
                    wait = min(self._pending_text.values(), default=now + 3600) - now
                    self._cond.wait(timeout=max(0.0, wait))
                    continue
                for rel in due:
                    del self._pending_text[rel]
                self._pending_paths.clear()
            try:
                for rel in due:
                    text = self.texts(rel)
                    if text is not None:
                        self.indexer.update_text(rel, text)
                        self.indexer.prepare(rel, text)  # for its next edit (a file just opened too)
                if paths and self.indexer.sync_paths(paths, stop=self._stop).rescanned:
                    self.refeed_open_buffers()  # the rules changed: the rescan stored them as they are on disk
            except Exception:  # one bad file or a busy store must not stop later updates
                log.exception("updating the memory of %s failed; the next change retries", self.root)

    # ------------------------------------------------------------------ candidates

    def names(self) -> list[str]:
        """Names the memory's chunks define, then those of the open buffers as they are now:
        a function typed a moment ago is a candidate before the debounce has even written it."""
        out = [n for names in self.store.names().values() for n in names]
        for rel in self._open_rels():
            text = self.texts(rel)
            if text is None:
                continue
            cached = self._buffer_names.get(rel)
            if cached is None or cached[0] is not text:
                cached = self._buffer_names[rel] = (text, [n for _, n in defined_names(rel, text.encode("utf-8"))])
            out += cached[1]
        return out

    def current_text(self, rel: str) -> str | None:
        """A file's text as the user sees it: its open buffer, else the file on disk (None for a
        file that is missing, too big for the memory, or not text)."""
        text = self.texts(rel)
        if text is not None:
            return text
        try:
            st = (self.root / rel).stat()
        except OSError:
            return None
        version = (st.st_mtime_ns, st.st_size)
        cached = self._disk_texts.get(rel)
        if cached is None or cached[0] != version:  # read once per change, not per keystroke
            got = read_text(self.root, rel, self.indexer.scan.max_bytes) if (self.root / rel).is_file() else None
            cached = self._disk_texts[rel] = (version, got[1] if got is not None else None)
        return cached[1]

    # ------------------------------------------------------------------ provenance

    def line_of(self, rel: str, offset: int) -> int:
        """1-based line of a byte offset in ``rel`` as the memory holds it (buffer, else disk)."""
        text = self.texts(rel)
        cached = self._bytes.get(rel)
        try:
            version: object = text if text is not None else (self.root / rel).stat().st_mtime_ns
            if cached is None or cached[0] is not version and cached[0] != version:
                data = text.encode("utf-8") if text is not None else (self.root / rel).read_bytes()
                cached = self._bytes[rel] = (version, data)
        except OSError:
            return 0
        return cached[1].count(b"\n", 0, offset) + 1

    def close(self) -> None:
        self._stop.set()
        self._index_stop.set()
        with self._cond:
            self._cond.notify_all()
        if self.watcher is not None:
            self.watcher.stop()
        if self._index_thread is not None:
            self._index_thread.join()
        self._writer.join()

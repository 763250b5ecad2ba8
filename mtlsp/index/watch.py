"""Workspace changes → the indexer, debounced.

A watchdog observer collects created / modified / deleted / moved paths; once the workspace has
been quiet for ``debounce`` seconds, the batch goes to ``Indexer.sync_paths`` (a burst such as a
``git checkout`` becomes one update; a directory event, or a changed ignore file, a rescan of
the whole folder).  When the kernel refuses more inotify watches (ENOSPC,
EMFILE), the watcher says so once and falls back to rescanning the folder every
``rescan_interval`` seconds: slower to notice, never silent.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .indexer import Indexer

log = logging.getLogger("mtlsp.watch")


class _Collect(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type == "modified":
            return  # its files' own events follow
        paths = [event.src_path, getattr(event, "dest_path", "")]
        self.watcher.notice([p if isinstance(p, str) else p.decode() for p in paths if p], event.is_directory)


class Watcher:
    """Keeps one indexer's store fresh until ``stop``."""

    def __init__(self, indexer: Indexer, *, debounce: float = 0.3, rescan_interval: float = 60.0,
                 after_rescan: Callable[[], None] | None = None) -> None:
        """``after_rescan``: called once a rescan has stored the files from disk (the server
        writes its unsaved buffers over them again)."""
        self.indexer = indexer
        self.after_rescan = after_rescan
        self.debounce = debounce
        self.rescan_interval = rescan_interval
        self.polling = False  # True once inotify limits forced periodic rescans
        self._pending: set[str] = set()
        self._rescan = False
        self._last_event = 0.0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._observer = Observer()
        self._thread = threading.Thread(target=self._run, name="mtlsp-watch", daemon=True)

    def start(self) -> None:
        try:
            self._observer.schedule(_Collect(self), str(self.indexer.root), recursive=True)
            self._observer.start()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.warning(
                "cannot watch %s (%s: the inotify watch limit, fs.inotify.max_user_watches, is reached); "
                "rescanning it every %.0f s instead",
                self.indexer.root, e.strerror, self.rescan_interval,
            )
            self.polling = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join()
        self._thread.join()

    def set_debounce(self, seconds: float) -> None:
        """Change the quiet time before queued changes are applied; a wait already under way
        is recomputed, so the new value holds for changes queued before it too."""
        with self._cond:
            self.debounce = seconds
            self._cond.notify_all()

    def notice(self, paths: list[str], is_directory: bool) -> None:
        """Queue changed absolute paths (a directory event rescans the whole folder)."""
        rels = [
            r for r in (self.indexer.relative(p) for p in paths)
            if r and not self.indexer.rules.ignored_path(r, is_directory)
        ]
        if not rels:
            return
        with self._cond:
            if is_directory:
                self._rescan = True
            self._pending.update(rels)
            self._last_event = time.monotonic()
            self._cond.notify_all()

    def _run(self) -> None:
        next_poll = time.monotonic() + self.rescan_interval
        while not self._stop.is_set():
            with self._cond:
                wait = self._last_event + self.debounce - time.monotonic() if self._pending else None
                if self.polling:
                    until_poll = max(0.0, next_poll - time.monotonic())
                    wait = until_poll if wait is None else min(wait, until_poll)
                if wait is None or wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                paths, rescan = sorted(self._pending), self._rescan
                self._pending, self._rescan = set(), False
            try:
                if rescan or (self.polling and time.monotonic() >= next_poll):
                    next_poll = time.monotonic() + self.rescan_interval
                    report = self.indexer.refresh(stop=self._stop)
                else:
                    report = self.indexer.sync_paths(paths, stop=self._stop)
                if report.rescanned and self.after_rescan is not None:
                    self.after_rescan()
                if report.indexed or report.removed:
                    log.info("updated %d file(s), removed %d, %d tokens encoded",
                             report.indexed, report.removed, report.tokens_encoded)
            except Exception:  # a bad file or a busy store must not end the watch
                log.exception("updating the memory of %s failed; will retry on the next change", self.indexer.root)

"""``mtlsp serve``: the language server.  Thin LSP handlers; the work lives in the modules below.

- ``mtlsp/workspace.py``: the model (``Engine``) and one ``Folder`` per workspace folder (store,
  indexer, watching, debounced feeding of open buffers into the memory);
- ``mtlsp/complete/completer.py``: ghost text and popup completions with their provenance;
- ``mtlsp/lsp/settings.py``: configuration from the client.

Model work runs on one worker thread.  Completion handlers are ``async`` and wait for that
worker, so a ``$/cancelRequest`` (or a newer request for the same document) sets the request's
flag and generation stops at the next token.  Notifications from background threads (progress,
log messages) are handed to the event loop, which alone writes to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lsprotocol import types as t
from mtlsp_model.weights import WeightsError
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument

from .. import __version__
from ..complete.completer import Completer, Support
from ..complete.decode import Cancelled
from ..index.indexer import Progress
from ..store.files import StoreError
from ..workspace import Engine, Folder, IndexState
from .settings import Settings, parse
from .wire import Protocol, quiet_pygls, report_undecodable

log = logging.getLogger("mtlsp.server")

MAX_LINE_CHARS = 10_000  # a longer line (minified code, data) gets no completion
EXPLAIN = "mtlsp/explain"
STATUS = "mtlsp/status"
REINDEX = "mtlsp.reindex"


class MtlspServer(LanguageServer):
    def __init__(self, weights: Path | None, device: str | None, cache_dir: str | None,
                 base: str | None = None) -> None:
        super().__init__("mtlsp", __version__, text_document_sync_kind=t.TextDocumentSyncKind.Incremental,
                         protocol_cls=Protocol)
        quiet_pygls()
        self.weights = weights
        self.base = base
        self.settings = Settings(device=device or "auto", store_path=cache_dir)
        self.engine: Engine | None = None
        self.engine_error: str | None = None
        self.completer: Completer | None = None
        self.folders: dict[Path, Folder] = {}
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="mtlsp-model")
        # (uri, kind) -> the running request's cancel flag; kind is "inline" or "popup"
        self.inflight: dict[tuple[str, str], threading.Event] = {}
        self.explained: dict[str, dict] = {}  # uri -> provenance of the last completion shown
        self.client_watches = False
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self._index_cancels: dict[Path, threading.Event] = {}

    def report_server_error(self, error: Exception, source: Any) -> None:
        """A body that is not JSON is the client's mistake: one log line, no error popup."""
        if not report_undecodable(error):
            super().report_server_error(error, source)

    # ------------------------------------------------------------------ thread-safe notifications

    def from_thread(self, fn, *args) -> None:
        if self.event_loop is not None and not self.event_loop.is_closed():
            self.event_loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ documents

    def document(self, uri: str) -> TextDocument:
        doc = self.workspace.text_documents.get(unquote(uri))  # pygls keys documents unquoted
        if doc is None:
            raise JsonRpcInvalidParams(f"unknown document {uri}: open it (textDocument/didOpen) first")
        return doc

    def folder_of(self, uri: str) -> tuple[Folder, str] | None:
        path = to_fs_path(uri)
        if path is None:
            return None
        p = Path(path)
        for root in sorted(self.folders, key=lambda r: -len(r.parts)):  # innermost folder wins
            try:
                return self.folders[root], p.resolve().relative_to(root).as_posix()
            except ValueError:
                continue
        return None

    def buffer_text(self, root: Path, rel: str) -> str | None:
        doc = self.workspace.text_documents.get(unquote((root / rel).as_uri()))
        return None if doc is None else doc.source

    # ------------------------------------------------------------------ start-up and folders

    def start(self) -> None:
        """Load the model and open every folder's store; runs off the event loop."""
        try:
            self.engine = Engine.load(self.weights, self.settings.device, self.base)
            self.engine_error = None
        except WeightsError as e:
            self.engine, self.engine_error = None, str(e)
            self.from_thread(self.window_show_message, t.ShowMessageParams(
                t.MessageType.Error,
                f"mtlsp: cannot load the model weights ({e}). Completions are off; the server keeps running."))
            log.error("cannot load the model weights: %s", e)
            return
        self.completer = self.engine.completer(self.settings.context_tokens)
        info = self.engine.loaded
        log.info("model %s (%d parameters) on %s", info.fingerprint[:12], info.model.num_params(), self.engine.device)
        for root in self.workspace_roots():
            self.add_folder(root)

    def workspace_roots(self) -> list[Path]:
        roots = []
        for folder in self.workspace.folders.values():
            path = to_fs_path(folder.uri)
            if path:
                roots.append(Path(path).resolve())
        if not roots and self.workspace.root_path:
            roots.append(Path(self.workspace.root_path).resolve())
        return roots

    def add_folder(self, root: Path) -> None:
        if self.engine is None or root in self.folders or not root.is_dir():
            return
        try:
            folder = Folder(root, self.engine, self.settings, texts=lambda rel, r=root: self.buffer_text(r, rel))
        except (StoreError, OSError) as e:
            self.from_thread(self.window_show_message, t.ShowMessageParams(
                t.MessageType.Warning, f"mtlsp: no memory for {root}: {e}"))
            return
        self.folders[root] = folder
        for uri in list(self.workspace.text_documents):
            got = self.folder_of(uri)
            if got is not None and got[0] is folder:
                folder.open_buffer(got[1])
        if not self.client_watches:
            folder.watch_disk()
        self.from_thread(lambda: asyncio.ensure_future(self.index_with_progress(folder)))

    def remove_folder(self, root: Path) -> None:
        folder = self.folders.pop(root, None)
        if folder is not None:
            folder.close()

    async def index_with_progress(self, folder: Folder) -> None:
        """Index ``folder`` in the background, reporting LSP work-done progress (cancellable)."""
        token = f"mtlsp-index-{folder.root.name}-{time.monotonic_ns()}"
        progress = self.work_done_progress
        supported = bool(self.client_capabilities.window and self.client_capabilities.window.work_done_progress)
        if supported:
            try:
                await progress.create_async(token)
            except Exception as e:  # the client refused the token: index without progress
                log.info("no progress reporting: %s", e)
                supported = False
        last = [0.0]

        def on_progress(p: Progress) -> None:
            now = time.monotonic()
            if supported and (now - last[0] > 0.2 or p.files_done == p.files_total):
                last[0] = now
                pct = int(100 * p.bytes_done / p.bytes_total) if p.bytes_total else 100
                self.from_thread(progress.report, token, t.WorkDoneProgressReport(
                    message=f"{p.files_done}/{p.files_total} files, {p.tokens:,} tokens encoded",
                    percentage=min(100, pct), cancellable=True))

        def on_done(state: IndexState) -> None:
            r = state.report
            msg = (f"{state.phase}: {r.files} files, {r.tokens_encoded:,} tokens encoded, "
                   f"{folder.stats()['entries']:,} in memory" if r else f"{state.phase}: {state.error}")
            log.info("indexing %s %s", folder.root, msg)
            if supported:
                self.from_thread(progress.end, token, t.WorkDoneProgressEnd(message=msg))

        if supported:
            progress.begin(token, t.WorkDoneProgressBegin(
                title=f"mtlsp: indexing {folder.root.name}", cancellable=True, percentage=0))
        stop = folder.index(on_progress, on_done)
        self._index_cancels[folder.root] = stop
        if supported:
            progress.tokens[token].add_done_callback(lambda f: f.cancelled() and stop.set())

    def restart(self) -> None:
        """Reload the model and reopen the stores (device or store path changed)."""
        for root in list(self.folders):
            self.remove_folder(root)
        self.start()

    # ------------------------------------------------------------------ completion plumbing

    def cursor(self, doc: TextDocument, position: t.Position) -> int:
        lines = doc.lines
        if position.line < 0 or position.character < 0 or position.line > len(lines) or (
            position.line == len(lines) and position.character > 0
        ):
            raise JsonRpcInvalidParams(f"position {position.line}:{position.character} is outside {doc.uri}")
        if position.line < len(lines):
            line = lines[position.line].rstrip("\r\n")
            if doc.position_codec.client_num_units(line) < position.character:
                raise JsonRpcInvalidParams(f"position {position.line}:{position.character} is past the end of its line")
        return doc.offset_at_position(position)

    def completable(self, doc: TextDocument, offset: int) -> str | None:
        """Why no completion is offered here, or None if one is."""
        if self.completer is None:
            return f"no model: {self.engine_error or 'still loading'}"
        if not self.settings.enabled_for(doc.language_id):
            return f"completion is disabled for {doc.language_id}"
        text = doc.source
        start, end = text.rfind("\n", 0, offset) + 1, text.find("\n", offset)
        if (end if end >= 0 else len(text)) - start > MAX_LINE_CHARS:
            return "the line is too long"
        if "\x00" in text:
            return "the document is binary"
        return None

    async def run_model(self, uri: str, kind: str, work) -> Any:
        """Run ``work(cancel)`` on the model thread; a newer request of the same ``kind`` for ``uri``
        cancels it. The popup and the ghost text of one keystroke (editors send both) do not."""
        cancel = threading.Event()
        key = (uri, kind)
        stale = self.inflight.get(key)
        if stale is not None:
            stale.set()
        self.inflight[key] = cancel
        loop = asyncio.get_running_loop()
        gate = self.engine.gate if self.engine is not None else None

        def first(cancel: threading.Event) -> Any:  # memory writes pause meanwhile (gate.py)
            with gate.completion() if gate is not None else contextlib.nullcontext():
                return work(cancel)

        try:
            return await loop.run_in_executor(self.model_pool, first, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except Cancelled:
            return None
        finally:
            if self.inflight.get(key) is cancel:
                del self.inflight[key]

    def explain(self, uri: str, kind: str, ms: float, support: list[Support], shown: Any) -> None:
        got = self.folder_of(uri)
        root = got[0].root if got else None
        self.explained[uri] = {
            "uri": uri, "kind": kind, "completion": shown, "latencyMs": round(ms, 1),
            "support": [
                {"path": s.path, "line": s.line, "weight": round(s.weight, 4),
                 "uri": (root / s.path).as_uri() if root else None}
                for s in support
            ],
        }

    def status(self) -> dict:
        folders = []
        for root, f in self.folders.items():
            stats = f.stats()
            p = f.state.progress
            folders.append({
                "root": str(root), "store": stats["directory"], "entries": stats["entries"],
                "files": stats["files"], "backend": stats["backend"], "capTokens": stats["cap_tokens"],
                "indexing": {"phase": f.state.phase, "error": f.state.error,
                             "filesDone": p.files_done if p else 0, "filesTotal": p.files_total if p else 0,
                             "tokensEncoded": p.tokens if p else 0},
                "watching": "client" if self.client_watches else ("polling" if f.polling else "watchdog"),
            })
        e = self.engine
        return {
            "version": __version__,
            "model": None if e is None else {
                "fingerprint": e.loaded.fingerprint, "parameters": e.loaded.model.num_params(),
                "trainedParameters": e.loaded.model.num_params(trained_only=True),
                "weights": str(e.weights) if e.weights else "shipped", "base": e.loaded.info["base_source"],
                "memoryTrained": e.loaded.trained, "config": e.loaded.config.to_dict()},
            "modelError": self.engine_error,
            "device": str(e.device) if e else None,
            "folders": folders,
            "settings": asdict(self.settings),
        }


def point(doc: TextDocument, offset: int) -> t.Position:
    return doc.client_position_at_offset(offset)


def markdown_support(support: list[Support]) -> str:
    if not support:
        return "No memory entry supported this completion."
    rows = "\n".join(f"- `{s.path}:{s.line}` ({100 * s.weight:.0f}% of memory attention)" for s in support)
    return f"Supported by the project memory:\n{rows}"


def build_server(weights: Path | None = None, device: str | None = None, cache_dir: str | None = None,
                 base: str | None = None) -> MtlspServer:
    server = MtlspServer(weights, device, cache_dir, base)

    @server.feature(t.INITIALIZE)
    def initialize(ls: MtlspServer, params: t.InitializeParams) -> None:
        ls.settings, problems = parse(params.initialization_options, ls.settings)
        for p in problems:
            log.warning("initializationOptions: %s", p)
        caps = params.capabilities.workspace
        ls.client_watches = bool(caps and caps.did_change_watched_files and caps.did_change_watched_files.dynamic_registration)

    @server.feature(t.INITIALIZED)
    async def initialized(ls: MtlspServer, params: t.InitializedParams) -> None:
        ls.event_loop = asyncio.get_running_loop()
        _forward_logs(ls)
        if ls.client_watches:
            try:
                await ls.client_register_capability_async(t.RegistrationParams([t.Registration(
                    "mtlsp-watch", t.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                    t.DidChangeWatchedFilesRegistrationOptions([t.FileSystemWatcher(glob_pattern="**/*")]))]))
            except Exception as e:
                log.info("the client did not accept file watching (%s): using watchdog", e)
                ls.client_watches = False
        await ls.event_loop.run_in_executor(ls.model_pool, ls.start)

    @server.feature(t.SHUTDOWN)
    def shutdown(ls: MtlspServer, params: None) -> None:
        for root in list(ls.folders):
            ls.remove_folder(root)

    @server.feature(t.TEXT_DOCUMENT_DID_OPEN)
    @server.feature(t.TEXT_DOCUMENT_DID_CHANGE)
    def changed(ls: MtlspServer, params) -> None:
        for kind in ("inline", "popup"):  # answers computed for the old text are of no use now
            stale = ls.inflight.get((params.text_document.uri, kind))
            if stale is not None:
                stale.set()
        got = ls.folder_of(params.text_document.uri)
        if got is not None:
            folder, rel = got
            folder.buffer_changed(rel)

    @server.feature(t.TEXT_DOCUMENT_DID_CLOSE)
    def closed(ls: MtlspServer, params: t.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        if ls.completer is not None:
            ls.completer.forget(uri)
        ls.explained.pop(uri, None)
        got = ls.folder_of(uri)
        if got is not None:
            folder, rel = got
            folder.close_buffer(rel)

    @server.feature(t.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def watched(ls: MtlspServer, params: t.DidChangeWatchedFilesParams) -> None:
        by_folder: dict[Folder, list[str]] = {}
        for change in params.changes:
            got = ls.folder_of(change.uri)
            if got is not None and not got[0].is_ignored(got[1]):
                by_folder.setdefault(got[0], []).append(got[1])
        for folder, rels in by_folder.items():
            folder.paths_changed(rels)

    @server.feature(t.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    async def folders_changed(ls: MtlspServer, params: t.DidChangeWorkspaceFoldersParams) -> None:
        loop = asyncio.get_running_loop()
        for f in params.event.removed:
            if (p := to_fs_path(f.uri)) is not None:
                await loop.run_in_executor(None, ls.remove_folder, Path(p).resolve())
        for f in params.event.added:
            if (p := to_fs_path(f.uri)) is not None:
                await loop.run_in_executor(ls.model_pool, ls.add_folder, Path(p).resolve())

    @server.feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def configuration(ls: MtlspServer, params: t.DidChangeConfigurationParams) -> None:
        new, problems = parse(params.settings, ls.settings)
        for p in problems:
            ls.window_show_message(t.ShowMessageParams(t.MessageType.Warning, f"mtlsp: {p}"))
        old, ls.settings = ls.settings, new
        for f in ls.folders.values():
            f.apply(new)
        if ls.engine is not None and new.context_tokens != old.context_tokens:
            ls.completer = ls.engine.completer(new.context_tokens)
        if (new.device, new.store_path) != (old.device, old.store_path) or ls.engine_error is not None:
            await asyncio.get_running_loop().run_in_executor(ls.model_pool, ls.restart)

    @server.feature(t.TEXT_DOCUMENT_INLINE_COMPLETION, t.InlineCompletionOptions())
    async def inline_completion(ls: MtlspServer, params: t.InlineCompletionParams) -> t.InlineCompletionList | None:
        doc = ls.document(params.text_document.uri)
        offset = ls.cursor(doc, params.position)
        why = ls.completable(doc, offset)
        if why is not None:
            log.debug("no inline completion at %s: %s", doc.uri, why)
            return t.InlineCompletionList(items=[])
        got = ls.folder_of(doc.uri)
        folder, rel = got if got else (None, Path(to_fs_path(doc.uri) or doc.uri).name)
        completer, text, settings = ls.completer, doc.source, ls.settings
        assert completer is not None

        def work(cancel: threading.Event):
            return completer.inline(doc.uri, rel, text, offset, folder.recall if folder else None,
                                    max_tokens=settings.max_tokens, cancel=cancel)

        res = await ls.run_model(doc.uri, "inline", work)
        if res is None or not res.text:
            return t.InlineCompletionList(items=[])
        ls.explain(doc.uri, "inline", res.ms, res.support, res.text)
        here = point(doc, offset)
        return t.InlineCompletionList(items=[t.InlineCompletionItem(
            insert_text=res.text, range=t.Range(here, here))])

    @server.feature(t.TEXT_DOCUMENT_COMPLETION, t.CompletionOptions(trigger_characters=["."]))
    async def completion(ls: MtlspServer, params: t.CompletionParams) -> t.CompletionList:
        doc = ls.document(params.text_document.uri)
        offset = ls.cursor(doc, params.position)
        why = ls.completable(doc, offset)
        if why is not None:
            log.debug("no completion at %s: %s", doc.uri, why)
            return t.CompletionList(is_incomplete=False, items=[])
        got = ls.folder_of(doc.uri)
        folder, rel = got if got else (None, Path(to_fs_path(doc.uri) or doc.uri).name)
        completer, text = ls.completer, doc.source
        assert completer is not None
        t0 = time.perf_counter()

        def work(cancel: threading.Event):
            return completer.popup(doc.uri, rel, text, offset, folder.recall if folder else None, cancel=cancel)

        res = await ls.run_model(doc.uri, "popup", work)
        if res is None:
            return t.CompletionList(is_incomplete=True, items=[])
        typed, candidates = res
        start, end = point(doc, offset - len(typed)), point(doc, offset)
        items = []
        for rank, c in enumerate(candidates):
            where = ", ".join(f"{s.path}:{s.line}" for s in c.support[:2])
            items.append(t.CompletionItem(
                label=c.word, kind=t.CompletionItemKind.Text, sort_text=f"{rank:04d}", filter_text=c.word,
                detail=f"mtlsp {100 * 2.718281828 ** c.logprob:.1f}%" + (f" · {where}" if where else ""),
                documentation=t.MarkupContent(t.MarkupKind.Markdown, markdown_support(c.support)),
                text_edit=t.TextEdit(t.Range(start, end), c.word)))
        if candidates:
            ls.explain(doc.uri, "completion", (time.perf_counter() - t0) * 1000, candidates[0].support,
                       [c.word for c in candidates])
        return t.CompletionList(is_incomplete=True, items=items)

    @server.feature(EXPLAIN)
    def explain(ls: MtlspServer, params: Any) -> dict | None:
        uri = _uri_param(params)
        if uri is None:
            return None
        return ls.explained.get(uri)

    @server.feature(STATUS)
    def status(ls: MtlspServer, params: Any) -> dict:
        return ls.status()

    @server.command(REINDEX)
    def reindex(ls: MtlspServer, *args: Any) -> dict:
        for folder in ls.folders.values():
            asyncio.ensure_future(ls.index_with_progress(folder))
        return {"folders": [str(r) for r in ls.folders]}

    return server


def _uri_param(params: Any) -> str | None:
    """The ``textDocument.uri`` of a custom request's params (a dict or pygls' object)."""
    doc = params.get("textDocument") if isinstance(params, dict) else getattr(params, "textDocument", None)
    if doc is None:
        raise JsonRpcInvalidParams('expected {"textDocument": {"uri": ...}}')
    uri = doc.get("uri") if isinstance(doc, dict) else getattr(doc, "uri", None)
    if not isinstance(uri, str):
        raise JsonRpcInvalidParams('expected {"textDocument": {"uri": ...}}')
    return uri


class _ClientLog(logging.Handler):
    """Log records to the client's ``window/logMessage`` (stdout belongs to the protocol)."""

    LEVELS = {logging.ERROR: t.MessageType.Error, logging.WARNING: t.MessageType.Warning,
              logging.INFO: t.MessageType.Info}

    def __init__(self, server: MtlspServer) -> None:
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        kind = self.LEVELS.get(record.levelno, t.MessageType.Log)
        self.server.from_thread(self.server.window_log_message, t.LogMessageParams(kind, self.format(record)))


def _forward_logs(server: MtlspServer) -> None:
    logger = logging.getLogger("mtlsp")
    if not any(isinstance(h, _ClientLog) for h in logger.handlers):
        logger.addHandler(_ClientLog(server))

"""The language server, driven over stdio by a real LSP client (pytest-lsp), as editors do.

Most tests run the server with a tiny random-initialised model saved as a real weights
directory; the last one runs the shipped weights end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

from mtlsp.lsp.client import plain
from mtlsp.lsp.settings import Settings
from mtlsp.workspace import Engine, Folder

pytestmark = pytest.mark.asyncio(loop_scope="function")

PRICING = '''"""Prices."""


def line_total(price: int, quantity: int) -> int:
    return price * quantity


def apply_discount(total: int) -> int:
    return total * 9 // 10
'''

REPORT = '''from app import pricing


def report(lines):
    total = pricing.line_total(2, 3)
    return total
'''


@pytest.fixture()
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    (root / "app").mkdir(parents=True)
    (root / "app" / "__init__.py").write_text("")
    (root / "app" / "pricing.py").write_text(PRICING)
    (root / "app" / "report.py").write_text(REPORT)
    return root


def capabilities(*, progress: bool = True, watch_registration: bool = False,
                 encodings: tuple[str, ...] = ("utf-16",)) -> t.ClientCapabilities:
    return t.ClientCapabilities(
        window=t.WindowClientCapabilities(work_done_progress=progress),
        general=t.GeneralClientCapabilities(position_encodings=list(encodings)),
        workspace=t.WorkspaceClientCapabilities(
            did_change_watched_files=t.DidChangeWatchedFilesClientCapabilities(dynamic_registration=watch_registration)),
        text_document=t.TextDocumentClientCapabilities(
            completion=t.CompletionClientCapabilities(completion_item=t.ClientCompletionItemOptions(
                documentation_format=[t.MarkupKind.Markdown, t.MarkupKind.PlainText])),
            inline_completion=t.InlineCompletionClientCapabilities()),
    )


async def start(weights: Path | None, cache: Path, *extra: str) -> LanguageClient:
    cmd = [sys.executable, "-m", "mtlsp", "serve", "--cache-dir", str(cache), *extra]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    client = await ClientServerConfig(cmd, server_env={**os.environ, "OMP_NUM_THREADS": "1"}).start()

    @client.feature(t.CLIENT_REGISTER_CAPABILITY)
    def register(params: t.RegistrationParams) -> None:
        client.registrations = [r.method for r in params.registrations]

    client.registrations = []
    return client


async def initialize(client: LanguageClient, folders: list[Path], caps: t.ClientCapabilities | None = None,
                     options: dict | None = None) -> t.InitializeResult:
    return await client.initialize_session(t.InitializeParams(
        capabilities=caps or capabilities(), initialization_options=options,
        workspace_folders=[t.WorkspaceFolder(f.as_uri(), f.name) for f in folders]))


async def status(client: LanguageClient) -> dict:
    return plain(await client.protocol.send_request_async("mtlsp/status", {}))


async def wait_ready(client: LanguageClient, n_folders: int = 1, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = await status(client)
        if len(st["folders"]) == n_folders and all(f["indexing"]["phase"] == "ready" for f in st["folders"]):
            return st
        await asyncio.sleep(0.1)
    raise AssertionError(f"folders not indexed in {timeout}s: {st}")


def replace_text(client: LanguageClient, uri: str, text: str, version: int = 2) -> None:
    """The editor sends a buffer's whole new text (unsaved)."""
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(version=version, uri=uri), [t.TextDocumentContentChangeWholeDocument(text)]))


async def memory_grows(client: LanguageClient, beyond: int, timeout: float = 10) -> None:
    """Wait until the memory holds more than ``beyond`` entries: an edit has reached it."""
    t0 = time.monotonic()
    while (await status(client))["folders"][0]["entries"] <= beyond:
        assert time.monotonic() - t0 < timeout, "the edit never reached the memory"
        await asyncio.sleep(0.02)


def open_doc(client: LanguageClient, path: Path, text: str | None = None, language: str = "python") -> str:
    uri = path.as_uri()
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri, language, 1, path.read_text() if text is None else text)))
    return uri


def position_after(text: str, needle: str) -> t.Position:
    """UTF-16 position right after the first ``needle``."""
    cut = text.index(needle) + len(needle)
    line = text.count("\n", 0, cut)
    col = cut - (text.rfind("\n", 0, cut) + 1)
    return t.Position(line, len(text[cut - col:cut].encode("utf-16-le")) // 2)


async def inline(client: LanguageClient, uri: str, pos: t.Position) -> t.InlineCompletionList:
    return await client.text_document_inline_completion_async(t.InlineCompletionParams(
        t.InlineCompletionContext(t.InlineCompletionTriggerKind.Automatic), t.TextDocumentIdentifier(uri), pos))


async def popup(client: LanguageClient, uri: str, pos: t.Position) -> t.CompletionList:
    return await client.text_document_completion_async(t.CompletionParams(t.TextDocumentIdentifier(uri), pos))


@pytest_asyncio.fixture()
async def client(tiny_weights, tmp_path):
    c = await start(tiny_weights, tmp_path / "cache")
    yield c
    await c.shutdown_session()
    await c.stop()


async def test_initialize_indexes_every_folder_with_progress(client, workspace, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "util.py").write_text("def helper(x):\n    return x + 1\n")
    result = await initialize(client, [workspace, other])
    caps = result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    st = await wait_ready(client, 2)
    by_root = {Path(f["root"]).name: f for f in st["folders"]}
    assert by_root["ws"]["files"] == 3 and by_root["other"]["files"] == 1
    assert by_root["ws"]["entries"] > 50 and by_root["other"]["entries"] > 5
    assert by_root["ws"]["store"] != by_root["other"]["store"]  # one store per folder
    assert st["device"] == "cpu" and st["model"]["parameters"] > 0
    for _ in range(50):  # the end notification follows the status change
        kinds = [[type(v).__name__ for v in vs] for vs in client.progress_reports.values()]
        if len(kinds) == 2 and all(k[-1] == "WorkDoneProgressEnd" for k in kinds):
            break
        await asyncio.sleep(0.1)
    assert len(kinds) == 2
    for k in kinds:
        assert k[0] == "WorkDoneProgressBegin" and k[-1] == "WorkDoneProgressEnd"
        assert "WorkDoneProgressReport" in k
    assert any("indexing" in m.message for m in client.log_messages)  # logs reach window/logMessage


async def test_popup_completion_heals_the_typed_word_and_replaces_it(client, workspace):
    await initialize(client, [workspace])
    await wait_ready(client)
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.app")
    uri = open_doc(client, workspace / "app" / "report.py", text)
    pos = position_after(text, "pricing.app")
    result = await popup(client, uri, pos)
    assert result.items
    for item in result.items:
        assert item.label.startswith("app")  # decoding was constrained to the typed characters
        assert item.text_edit.range == t.Range(t.Position(pos.line, pos.character - 3), pos)
        assert item.text_edit.new_text == item.label
        assert "memory" in item.documentation.value
    explained = plain(await client.protocol.send_request_async("mtlsp/explain", {"textDocument": {"uri": uri}}))
    assert explained["kind"] == "completion" and explained["completion"][0] == result.items[0].label
    for s in explained["support"]:
        assert (workspace / s["path"]).is_file() and s["line"] >= 1 and 0 < s["weight"] <= 1


async def test_inline_completion_is_one_line_and_reused_while_typing_it(client, workspace):
    await initialize(client, [workspace])
    await wait_ready(client)
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.")
    uri = open_doc(client, workspace / "app" / "report.py", text)
    pos = position_after(text, "pricing.")
    result = await inline(client, uri, pos)
    assert len(result.items) <= 1
    if not result.items:
        pytest.fail("the tiny model wrote nothing at a call site")
    item = result.items[0]
    assert "\n" not in item.insert_text and item.insert_text
    assert item.range == t.Range(pos, pos)
    first = plain(await client.protocol.send_request_async("mtlsp/explain", {"textDocument": {"uri": uri}}))
    # type the completion's first character: the server answers from the shown completion
    typed = item.insert_text[0]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(version=2, uri=uri),
        [t.TextDocumentContentChangePartial(t.Range(pos, pos), typed)]))
    again = await inline(client, uri, t.Position(pos.line, pos.character + 1))
    assert again.items and again.items[0].insert_text == item.insert_text[1:]
    assert first["kind"] == "inline"


async def test_popup_and_ghost_text_for_the_same_keystroke_do_not_cancel_each_other(client, workspace):
    # VS Code sends textDocument/completion and textDocument/inlineCompletion together after a
    # trigger character; each must get its answer (only a newer request of its own kind supersedes it).
    await initialize(client, [workspace], options={"maxTokens": 64})
    await wait_ready(client)
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.")
    uri = open_doc(client, workspace / "app" / "report.py", text)
    pos = position_after(text, "pricing.")
    for _ in range(3):
        got_popup, got_ghost = await asyncio.gather(popup(client, uri, pos), inline(client, uri, pos))
        assert got_popup.items, "the popup was cancelled by the ghost-text request"
        assert got_ghost.items, "the ghost text was cancelled by the popup request"
        got_ghost, got_popup = await asyncio.gather(inline(client, uri, pos), popup(client, uri, pos))
        assert got_popup.items and got_ghost.items


async def test_block_completion_after_a_def_line(client, workspace):
    await initialize(client, [workspace])
    await wait_ready(client)
    text = PRICING + "\n\ndef shipping(weight: int) -> int:\n"
    uri = open_doc(client, workspace / "app" / "pricing.py", text)
    result = await inline(client, uri, t.Position(text.count("\n"), 0))
    for item in result.items:  # a body: every non-blank line indented under the def
        assert all(not line.strip() or line.startswith((" ", "\t")) for line in item.insert_text.split("\n"))


async def test_positions_in_utf16_and_utf8_on_non_ascii_lines(tiny_weights, workspace, tmp_path):
    text = REPORT.replace("total = pricing.line_total(2, 3)", 'naïve = "😀"; total = pricing.app')
    for encoding in ("utf-16", "utf-8"):
        client = await start(tiny_weights, tmp_path / f"cache-{encoding}")
        try:
            result = await initialize(client, [workspace], capabilities(encodings=(encoding,)))
            assert result.capabilities.position_encoding == encoding
            await wait_ready(client)
            uri = open_doc(client, workspace / "app" / "report.py", text)
            line = text.split("\n")[text[:text.index("pricing.app")].count("\n")]
            before = line[: line.index("pricing.app") + len("pricing.app")]
            units = len(before.encode("utf-16-le")) // 2 if encoding == "utf-16" else len(before.encode("utf-8"))
            pos = t.Position(text[:text.index("pricing.app")].count("\n"), units)
            items = (await popup(client, uri, pos)).items
            assert items
            assert items[0].text_edit.range.start.character == units - 3
            assert items[0].label.startswith("app")
        finally:
            await client.shutdown_session()
            await client.stop()


async def test_cancel_request_stops_it_and_the_server_goes_on(client, workspace):
    await initialize(client, [workspace], options={"maxTokens": 512})
    await wait_ready(client)
    uri = open_doc(client, workspace / "app" / "report.py", REPORT)
    pos = position_after(REPORT, "def report(lines):")
    params = t.InlineCompletionParams(t.InlineCompletionContext(t.InlineCompletionTriggerKind.Invoked),
                                      t.TextDocumentIdentifier(uri), pos)
    fut = client.protocol.send_request(t.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="to-cancel")
    client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id="to-cancel"))
    with pytest.raises(JsonRpcException) as err:
        await asyncio.wrap_future(fut)
    assert err.value.code == t.LSPErrorCodes.RequestCancelled
    assert (await status(client))["folders"]  # still serving
    # and completing: after ``pricing.li`` the module's one name that fits
    at = position_after(REPORT, "pricing.li")
    assert [i.label for i in (await popup(client, uri, at)).items] == ["line_total"]
    ghost = (await inline(client, uri, at)).items
    assert ghost and ghost[0].insert_text.startswith("ne_total")


async def test_unsaved_new_function_reaches_the_memory_within_a_second(client, workspace):
    await initialize(client, [workspace], options={"debounceMs": 100})
    before = (await wait_ready(client))["folders"][0]["entries"]
    path = workspace / "app" / "pricing.py"
    uri = open_doc(client, path)
    new = PRICING + "\n\ndef qzx_fold_ledger(rows: list[int]) -> int:\n    return sum(rows) * 3\n"
    replace_text(client, uri, new)
    await memory_grows(client, before)
    assert path.read_text() == PRICING  # nothing was saved
    # the other file's completion reads a memory that now holds the new function
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.qzx")
    other = open_doc(client, workspace / "app" / "report.py", text)
    items = (await popup(client, other, position_after(text, "pricing.qzx"))).items
    assert [i.label for i in items] == ["qzx_fold_ledger"]  # the one existing name it can become
    # closing the unsaved buffer returns the memory to the file on disk
    client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri)))
    t0 = time.monotonic()
    while (await status(client))["folders"][0]["entries"] > before + len(REPORT):  # report.py is open too
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(0.05)


async def test_a_place_completed_before_a_function_was_written_offers_it_afterwards(client, workspace):
    """The caller's text does not change, so its prompt state and popup list are kept; the new
    function must still come in (the memory's version and the candidate names changed)."""
    await initialize(client, [workspace], options={"debounceMs": 50})
    before = (await wait_ready(client))["folders"][0]["entries"]
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.zq")
    other = open_doc(client, workspace / "app" / "report.py", text)
    pos = position_after(text, "pricing.zq")
    first = [i.label for i in (await popup(client, other, pos)).items]
    assert first and "zqx_merge_rows" not in first  # the model's own words: no name starts so
    uri = open_doc(client, workspace / "app" / "pricing.py")
    new = PRICING + "\n\ndef zqx_merge_rows(rows: list[int]) -> int:\n    return max(rows)\n"
    replace_text(client, uri, new)
    await memory_grows(client, before)
    assert [i.label for i in (await popup(client, other, pos)).items] == ["zqx_merge_rows"]


async def test_a_name_typed_a_moment_ago_is_a_candidate_before_the_memory_has_it(client, workspace):
    """Within the debounce the memory still holds the file on disk, but the popup already offers
    the function typed into the other buffer: open buffers are read for the names they define."""
    await initialize(client, [workspace], options={"debounceMs": 10_000})
    before = (await wait_ready(client))["folders"][0]["entries"]
    uri = open_doc(client, workspace / "app" / "pricing.py")
    new = PRICING + "\n\ndef vqk_tally_rows(rows: list[int]) -> int:\n    return len(rows)\n"
    replace_text(client, uri, new)
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.vq")
    other = open_doc(client, workspace / "app" / "report.py", text)
    items = (await popup(client, other, position_after(text, "pricing.vq"))).items
    assert "vqk_tally_rows" in [i.label for i in items]
    assert (await status(client))["folders"][0]["entries"] == before  # not yet in the memory


async def test_configuration_by_init_options_and_did_change(client, workspace):
    await initialize(client, [workspace], options={"mtlsp": {"languages": {"python": False}}})
    await wait_ready(client)
    text = REPORT.replace("pricing.line_total(2, 3)", "pricing.app")
    uri = open_doc(client, workspace / "app" / "report.py", text)
    pos = position_after(text, "pricing.app")
    assert not (await popup(client, uri, pos)).items
    assert not (await inline(client, uri, pos)).items
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
        {"mtlsp": {"languages": {"python": True}, "maxTokens": 3, "memoryCap": 50_000, "debounceMs": "soon"}}))
    for _ in range(100):
        st = await status(client)
        if st["settings"]["languages"] == {"python": True}:
            break
        await asyncio.sleep(0.05)
    assert st["settings"]["max_tokens"] == 3 and st["folders"][0]["capTokens"] == 50_000
    assert st["settings"]["debounce_ms"] == 250  # the bad value was refused, the old one kept
    assert any("debounceMs" in m.message for m in client.messages)
    assert [i.label for i in (await popup(client, uri, pos)).items] == ["apply_discount"]
    result = await inline(client, uri, pos)
    assert result.items and result.items[0].insert_text.startswith("ly_discount")
    assert len(result.items[0].insert_text) <= len("ly_discount") + 3 * 16  # the name, then three tokens


async def test_a_settings_change_reaches_the_store_and_the_running_watcher(tiny_weights, workspace, tmp_path):
    """``Folder.apply`` is how the server passes changed settings on: the memory cap reaches the
    store, and the debounce reaches the watcher that was started with the old value."""
    settings = Settings(store_path=str(tmp_path / "stores"))
    folder = Folder(workspace, Engine.load(tiny_weights, "cpu"), settings, texts=lambda rel: None)
    try:
        folder.watch_disk()
        assert folder.watcher.debounce == 0.25
        folder.apply(replace(settings, debounce_ms=40, memory_cap=50_000))
        assert folder.watcher.debounce == folder.debounce == 0.04
        assert folder.stats()["cap_tokens"] == 50_000
    finally:
        folder.close()


async def test_an_opened_buffer_has_its_context_read_before_its_first_edit(tiny_weights, workspace, tmp_path):
    """After writing a buffer (also one just opened, which stores nothing) the server reads the
    file's context (``Indexer.prepare``), so that its first edit encodes only its own chunk."""
    engine = Engine.load(tiny_weights, "cpu")
    reads: list[int] = []  # contexts per read of the model's context path
    read_prefix = engine.loaded.model.read_prefix
    engine.loaded.model.read_prefix = lambda contexts, **kw: reads.append(len(contexts)) or read_prefix(contexts, **kw)
    buffers: dict[str, str] = {}
    folder = Folder(workspace, engine, Settings(store_path=str(tmp_path / "stores"), debounce_ms=10), texts=buffers.get)

    async def until(done, what: str) -> None:
        t0 = time.monotonic()
        while not done():
            assert time.monotonic() - t0 < 30, what
            await asyncio.sleep(0.02)

    try:
        folder.index(lambda p: None, lambda state: None)
        await until(lambda: folder.state.phase == "ready", "indexing never ended")
        assert reads and all(n > 1 for n in reads)  # the files' contexts read together: none kept
        n = len(reads)
        buffers["app/pricing.py"] = PRICING
        folder.buffer_changed("app/pricing.py")  # didOpen
        await until(lambda: len(reads) == n + 1, "the opened buffer's context was never read")
        assert reads[-1] == 1
        entries = folder.stats()["entries"]
        buffers["app/pricing.py"] = PRICING + "\n\ndef surcharge(total: int) -> int:\n    return total + 5\n"
        folder.buffer_changed("app/pricing.py")
        await until(lambda: folder.stats()["entries"] > entries, "the edit never reached the memory")
        assert len(reads) == n + 1  # the edit read no context
    finally:
        folder.close()


async def test_device_and_store_path_changes_reopen_the_memory(client, workspace, tmp_path):
    await initialize(client, [workspace])
    first = (await wait_ready(client))["folders"][0]["store"]
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(
        {"storePath": str(tmp_path / "elsewhere"), "device": "cpu"}))
    for _ in range(200):
        st = await status(client)
        if st["folders"] and st["folders"][0]["store"] != first and st["folders"][0]["indexing"]["phase"] == "ready":
            break
        await asyncio.sleep(0.05)
    assert st["folders"][0]["store"].startswith(str(tmp_path / "elsewhere"))
    assert st["folders"][0]["entries"] > 50


async def test_bad_input_gets_an_error_or_nothing_and_the_server_goes_on(client, workspace):
    await initialize(client, [workspace])
    await wait_ready(client)
    uri = open_doc(client, workspace / "app" / "report.py", REPORT)
    with pytest.raises(JsonRpcException):  # unknown document
        await popup(client, (workspace / "nope.py").as_uri(), t.Position(0, 0))
    with pytest.raises(JsonRpcException):  # position past the end of the document
        await inline(client, uri, t.Position(400, 0))
    with pytest.raises(JsonRpcException):  # past the end of its line
        await popup(client, uri, t.Position(0, 500))
    with pytest.raises(JsonRpcException):
        await client.protocol.send_request_async("mtlsp/explain", {"nothing": 1})
    huge = "x = [" + "1, " * 20_000 + "\n"
    huge_uri = open_doc(client, workspace / "app" / "huge.py", huge)
    assert not (await inline(client, huge_uri, t.Position(0, 30_000))).items
    binary = "abc\x00def\n"
    bin_uri = open_doc(client, workspace / "app" / "blob.py", binary)
    assert not (await popup(client, bin_uri, t.Position(0, 3))).items
    assert (await status(client))["folders"][0]["indexing"]["phase"] == "ready"
    assert (await popup(client, uri, position_after(REPORT, "pricing.li"))).items


async def test_corrupt_weights_give_one_clear_message_and_a_server_that_answers(tiny_weights, workspace, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    client = await start(broken, tmp_path / "cache")
    try:
        await initialize(client, [workspace])
        for _ in range(100):
            if client.messages:
                break
            await asyncio.sleep(0.05)
        errors = [m for m in client.messages if m.type == t.MessageType.Error]
        assert len(errors) == 1 and "weights" in errors[0].message and "checksum" in errors[0].message
        st = await status(client)
        assert st["model"] is None and "checksum" in st["modelError"]
        uri = open_doc(client, workspace / "app" / "report.py")
        assert not (await popup(client, uri, position_after(REPORT, "pricing.li"))).items
        assert not (await inline(client, uri, position_after(REPORT, "pricing.li"))).items
    finally:
        await client.shutdown_session()
        await client.stop()


async def test_file_and_ignore_rule_changes_on_disk_via_client_watching_or_watchdog(tiny_weights, workspace, tmp_path):
    for registration in (True, False):
        root = tmp_path / f"ws-{registration}"
        shutil.copytree(workspace, root)
        client = await start(tiny_weights, tmp_path / f"cache-{registration}")
        try:
            await initialize(client, [root], capabilities(watch_registration=registration))
            st = await wait_ready(client)
            assert st["folders"][0]["watching"] == ("client" if registration else "watchdog")
            assert (t.WORKSPACE_DID_CHANGE_WATCHED_FILES in client.registrations) == registration
            new = root / "app" / "taxes.py"
            new.write_text("def tax(cents: int) -> int:\n    return cents // 5\n")
            if registration:  # the editor reports the change
                client.workspace_did_change_watched_files(t.DidChangeWatchedFilesParams(
                    [t.FileEvent(new.as_uri(), t.FileChangeType.Created)]))
            t0 = time.monotonic()
            while (await status(client))["folders"][0]["files"] < 4:
                assert time.monotonic() - t0 < 15, "the new file never reached the memory"
                await asyncio.sleep(0.05)
            # a new .mtlspignore takes two files out (and is itself a file of the memory)
            rules = root / ".mtlspignore"
            rules.write_text("app/taxes.py\napp/report.py\n")
            if registration:
                client.workspace_did_change_watched_files(t.DidChangeWatchedFilesParams(
                    [t.FileEvent(rules.as_uri(), t.FileChangeType.Created)]))
            t0 = time.monotonic()
            while (await status(client))["folders"][0]["files"] != 3:
                assert time.monotonic() - t0 < 15, "the ignored files stayed in the memory"
                await asyncio.sleep(0.05)
        finally:
            await client.shutdown_session()
            await client.stop()


class RawPeer:
    """A JSON-RPC peer that writes frames byte for byte, so a test can send what no LSP client
    library would (a body that is not JSON, an array, a request without params)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.replies: dict[int, dict] = {}  # answers read while waiting for another one

    async def frame(self, body: bytes) -> None:
        self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await self.writer.drain()

    async def send(self, message: dict) -> None:
        await self.frame(json.dumps({"jsonrpc": "2.0", **message}).encode())

    async def reply(self, id_: int, timeout: float = 30) -> dict:
        """The server's answer to request ``id_`` (notifications and requests from it are skipped)."""
        async def read() -> dict:
            while id_ not in self.replies:
                headers = {}
                while (line := (await self.reader.readline()).strip()):
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                msg = json.loads(await self.reader.readexactly(int(headers[b"content-length"])))
                if "id" in msg and "method" not in msg:
                    self.replies[msg["id"]] = msg
            return self.replies.pop(id_)
        return await asyncio.wait_for(read(), timeout)

    async def call(self, id_: int, method: str, params) -> dict:
        await self.send({"id": id_, "method": method, "params": params})
        return await self.reply(id_)

    async def start_session(self, workspace: Path) -> dict:
        """initialize, initialized, then wait until the folder is indexed; the status."""
        init = await self.call(1, "initialize", {"processId": None, "capabilities": {},
                                                 "workspaceFolders": [{"uri": workspace.as_uri(), "name": "ws"}]})
        assert "inlineCompletionProvider" in init["result"]["capabilities"]
        await self.send({"method": "initialized", "params": {}})
        for i in range(300):
            st = (await self.call(100 + i, "mtlsp/status", {}))["result"]
            if st["folders"] and st["folders"][0]["indexing"]["phase"] == "ready":
                return st
            await asyncio.sleep(0.05)
        raise AssertionError(f"the folder was not indexed: {st}")


async def test_reindex_command_malformed_request_and_tcp_transport(tiny_weights, workspace, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mtlsp", "serve", "--tcp", f"127.0.0.1:{port}", "--weights", str(tiny_weights),
        "--cache-dir", str(tmp_path / "cache"), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(200):
            try:
                peer = RawPeer(*await asyncio.open_connection("127.0.0.1", port))
                break
            except OSError:
                await asyncio.sleep(0.1)
        st = await peer.start_session(workspace)
        assert st["folders"][0]["entries"] > 50
        done = await peer.call(2, "workspace/executeCommand", {"command": "mtlsp.reindex", "arguments": []})
        assert done["result"]["folders"] == [str(workspace.resolve())]
        bad = await peer.call(3, "textDocument/completion", {"position": {"line": 0}})  # malformed params
        assert bad["error"]["code"] == -32602
        assert (await peer.call(4, "mtlsp/status", {}))["result"]["folders"]  # still serving
        assert (await peer.call(5, "shutdown", None))["result"] is None
    finally:
        proc.kill()
        await proc.wait()


async def test_malformed_input_costs_one_log_line_and_the_server_goes_on(tiny_weights, workspace, tmp_path):
    """Over stdio, as editors run it: each malformed message is named in one stderr line, never a
    traceback; a request among them is answered InvalidParams at once; completion still works."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mtlsp", "serve", "--weights", str(tiny_weights), "--cache-dir", str(tmp_path / "cache"),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stderr: list[str] = []

    async def drain() -> None:
        while line := await proc.stderr.readline():
            stderr.append(line.decode(errors="replace").rstrip("\n"))

    draining = asyncio.ensure_future(drain())
    peer = RawPeer(proc.stdout, proc.stdin)
    try:
        await peer.start_session(workspace)
        text = REPORT.replace("pricing.line_total(2, 3)", "pricing.li")
        uri = (workspace / "app" / "report.py").as_uri()
        await peer.send({"method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": text}}})
        pos = position_after(text, "pricing.li")
        where = {"textDocument": {"uri": uri}, "position": {"line": pos.line, "character": pos.character}}
        sync = iter(range(1000, 2000))

        async def one_line_for(body: bytes, *names: str) -> str:
            """Send ``body``; the one warning it caused (a request after it proves it was read)."""
            before = len(stderr)
            await peer.frame(body)
            assert "result" in await peer.call(next(sync), "mtlsp/status", {})
            for _ in range(100):
                warned = [ln for ln in stderr[before:] if " WARNING " in ln or " ERROR " in ln]
                if warned:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # anything else it logged was written before the status reply
            warned = [ln for ln in stderr[before:] if " WARNING " in ln or " ERROR " in ln]
            assert len(warned) == 1, stderr[before:]
            assert all(n in warned[0] for n in names), warned[0]
            return warned[0]

        await one_line_for(b'{"jsonrpc": "2.0", "id": 7, "method": "textDocument/completion", "par', "not JSON")
        await one_line_for(b"\xff\xfe{}", "not JSON")
        await one_line_for(b'[{"jsonrpc": "2.0", "id": 8, "method": "mtlsp/status", "params": {}}]', "JSON array")
        await one_line_for(b'{"jsonrpc": "2.0", "method": "textDocument/didOpen"}', "textDocument/didOpen", "no params")

        t0 = time.monotonic()
        await one_line_for(b'{"jsonrpc": "2.0", "id": 9, "method": "textDocument/completion"}',
                           "textDocument/completion", "no params")
        no_params = await peer.reply(9)
        assert no_params["error"]["code"] == -32602 and "no params" in no_params["error"]["message"]
        # a text document where the context belongs
        swapped = {**where, "context": {"uri": uri, "languageId": "python", "version": 1, "text": text}}
        await one_line_for(json.dumps({"jsonrpc": "2.0", "id": 10, "method": "textDocument/inlineCompletion",
                                       "params": swapped}).encode(), "textDocument/inlineCompletion", "context")
        wrong = await peer.reply(10, timeout=5)
        assert wrong["error"]["code"] == -32602 and "context" in wrong["error"]["message"]
        assert time.monotonic() - t0 < 10, "the malformed requests were not answered at once"
        # an error the handler raises on purpose: its line, without the stack
        gone = {**where, "textDocument": {"uri": (workspace / "nope.py").as_uri()}}
        unknown = await peer.call(11, "textDocument/completion", gone)
        assert unknown["error"]["code"] == -32602 and "unknown document" in unknown["error"]["message"]

        items = (await peer.call(12, "textDocument/completion", where))["result"]["items"]
        assert "line_total" in [i["label"] for i in items]  # still serving, and completing
        assert not any("Traceback" in ln for ln in stderr), "\n".join(stderr)
        assert (await peer.call(13, "shutdown", None))["result"] is None
    finally:
        proc.kill()
        await proc.wait()
        draining.cancel()


async def test_shipped_weights_new_function_typed_in_one_buffer_is_read_in_another(workspace, tmp_path):
    """End to end with the shipped model on the bundled sample workspace."""
    from mtlsp.demo import NEW_FUNCTION, SAMPLE

    root = tmp_path / "sample"
    shutil.copytree(SAMPLE, root)
    client = await start(None, tmp_path / "cache")
    try:
        await initialize(client, [root], options={"debounceMs": 100})
        before = (await wait_ready(client, timeout=120))["folders"][0]["entries"]
        definer = root / "app" / "pricing.py"
        old = definer.read_text()
        uri = open_doc(client, definer)
        end = t.Position(old.count("\n"), 0)
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            t.VersionedTextDocumentIdentifier(version=2, uri=uri), [t.TextDocumentContentChangePartial(t.Range(end, end), NEW_FUNCTION)]))
        await memory_grows(client, before)
        caller = root / "app" / "report.py"
        source = caller.read_text()
        at = source.index("total = pricing.") + len("total = pricing.")
        cited = set()
        report = open_doc(client, caller, source)
        for typed in ("", "s", "su"):
            text = source[:at] + typed + source[source.index("\n", at):]
            replace_text(client, report, text, version=len(typed) + 1)
            pos = position_after(text, "total = pricing." + typed)
            items = (await popup(client, report, pos)).items
            assert items and all(i.label.startswith(typed) for i in items)
            ghost = (await inline(client, report, pos)).items
            assert all("\n" not in g.insert_text for g in ghost)
            why = plain(await client.protocol.send_request_async("mtlsp/explain", {"textDocument": {"uri": report}}))
            cited |= {(s["path"], s["line"]) for s in why["support"]}
        new_lines = range(old.count("\n") + 1, old.count("\n") + NEW_FUNCTION.count("\n") + 1)
        # the unsaved function's entries are among what the completions attended to
        assert any(path == "app/pricing.py" and line in new_lines for path, line in cited), cited
    finally:
        await client.shutdown_session()
        await client.stop()


async def test_paths_with_spaces_and_non_ascii(client, tmp_path):
    root = tmp_path / "my wörk space"
    (root / "app").mkdir(parents=True)
    (root / "app" / "prix €.py").write_text(PRICING)
    await initialize(client, [root], options={"debounceMs": 50})
    before = (await wait_ready(client))["folders"][0]["entries"]
    path = root / "app" / "prix €.py"
    uri = open_doc(client, path)  # a percent-encoded URI
    assert "%20" in uri
    new = PRICING + "\n\ndef qzx(rows):\n    return rows.app\n"
    replace_text(client, uri, new)
    await memory_grows(client, before)  # the buffer was found and fed
    items = (await popup(client, uri, position_after(new, "rows.app"))).items
    assert items and all(i.label.startswith("app") for i in items)

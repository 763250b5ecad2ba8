"""Benchmark of ``mtlsp serve`` over stdio, as an editor sees it: shipped model, a ~200k-token memory.

A real repository is indexed by the server (memory cap 200k tokens, so the store holds about
that many).  Then, at call sites ``obj.name(`` sampled from its files (seeded), the benchmark
opens the file cut just after ``obj.`` and types the true name character by character, as a
user would, sending ``didChange`` and then an inline-completion and a popup-completion request
per keystroke.  Latencies are client-side round trips (JSON-RPC included):

- *keystroke*: every request after the first at a site (the server reuses the prompt's model
  state, or the ghost text it showed when the typed character matches it);
- *first at a site*: the first request after jumping to a new place (the whole prompt is read),
  right after the file is opened, or ``--think-ms`` later (a user reading before typing; the
  server prepares a file it is told is open, ``docs/server.md``).

The two requests of a keystroke are sent one after the other (the popup once the ghost text has
come back), or with ``--together`` at once, ghost text first, as an editor that shows both may
send them; each is then timed from that moment, so the second includes any wait for the first.

The server's resident memory (VmRSS and peak VmHWM from /proc) is read at the end.

    python benchmarks/server.py --repo /work/evalrepos/flask --out /tmp/server.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types as t
from pygls.lsp.client import LanguageClient

from mtlsp.lsp.client import close, request

CALL = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w{2,})\(")


def sites(repo: Path, n: int, seed: int) -> list[tuple[Path, int, str]]:
    """(file, offset just after ``obj.``, the true name) for ``n`` seeded call sites."""
    found = []
    for f in sorted(repo.rglob("*.py")):
        if any(p.startswith(".") for p in f.relative_to(repo).parts):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in CALL.finditer(text):
            found.append((f, m.start(2), m.group(2)))
    random.Random(seed).shuffle(found)
    return found[:n]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(statistics.median(xs), 1), "p95_ms": round(pct(xs, 0.95), 1),
            "mean_ms": round(statistics.fmean(xs), 1)} if xs else {"n": 0}


def proc_memory(pid: int) -> dict:
    got = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) / 1024
    return got


async def run(a: argparse.Namespace) -> dict:
    repo = a.repo.resolve()
    cache = a.cache_dir or tempfile.mkdtemp(prefix="mtlsp-bench-")
    client = LanguageClient("mtlsp-bench", "1")
    await client.start_io(sys.executable, "-m", "mtlsp", "serve", "--cache-dir", cache, "--log-level", "WARNING")
    pid = client._server.pid
    result: dict = {}
    try:
        await client.initialize_async(t.InitializeParams(
            capabilities=t.ClientCapabilities(), initialization_options={"memoryCap": a.memory_tokens},
            workspace_folders=[t.WorkspaceFolder(repo.as_uri(), repo.name)]))
        client.initialized(t.InitializedParams())
        t0 = time.monotonic()
        while True:
            st = await request(client, "mtlsp/status", {})
            if st["folders"] and st["folders"][0]["indexing"]["phase"] in ("ready", "failed"):
                break
            await asyncio.sleep(0.5)
        indexed_s = time.monotonic() - t0
        while st["folders"][0]["entries"] >= 65_536 and st["folders"][0]["backend"] != "faiss-cpu ivf":
            await asyncio.sleep(0.5)  # warm: every head's IVF index is built (in the background)
            st = await request(client, "mtlsp/status", {})
        result["index"] = {"seconds": round(indexed_s, 1), "ivf_ready_s": round(time.monotonic() - t0, 1),
                           "tokens_encoded": st["folders"][0]["indexing"]["tokensEncoded"],
                           **{k: st["folders"][0][k] for k in ("entries", "files", "backend")}}
        print(f"indexed: {result['index']}", flush=True)
        rss_indexed = proc_memory(pid)
        first_inline, first_popup, key_inline, key_popup = [], [], [], []
        samples = []  # every request, so that a percentile's outliers can be traced to their site
        for i, (path, at, name) in enumerate(sites(repo, a.sites, a.seed)):
            text = path.read_text(encoding="utf-8", errors="replace")
            line_end = text.find("\n", at)
            line_end = len(text) if line_end < 0 else line_end
            uri = path.as_uri()
            base = text[:at] + text[line_end:]
            client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(uri, "python", 1, base)))
            await asyncio.sleep(a.think_ms / 1000)
            line = text.count("\n", 0, at)
            col = len(text[text.rfind("\n", 0, at) + 1:at].encode("utf-16-le")) // 2
            for k in range(min(a.keystrokes, len(name)) + 1):  # never past the name's end
                typed = name[:k]
                if k:
                    client.text_document_did_change(t.DidChangeTextDocumentParams(
                        t.VersionedTextDocumentIdentifier(version=k + 1, uri=uri),
                        [t.TextDocumentContentChangePartial(
                            t.Range(t.Position(line, col + k - 1), t.Position(line, col + k - 1)), typed[-1])]))
                pos = t.Position(line, col + k)
                s = time.perf_counter()

                async def ghost() -> float:
                    await client.text_document_inline_completion_async(t.InlineCompletionParams(
                        t.InlineCompletionContext(t.InlineCompletionTriggerKind.Automatic),
                        t.TextDocumentIdentifier(uri), pos))
                    return (time.perf_counter() - s) * 1000

                async def popup() -> float:
                    await client.text_document_completion_async(t.CompletionParams(t.TextDocumentIdentifier(uri), pos))
                    return (time.perf_counter() - s) * 1000

                if a.together:  # both sent at once, ghost text first; each timed from the sending
                    inline_ms, popup_ms = await asyncio.gather(ghost(), popup())
                else:
                    inline_ms = await ghost()
                    s = time.perf_counter()  # the popup's clock starts when it is sent
                    popup_ms = await popup()
                (key_inline if k else first_inline).append(inline_ms)
                (key_popup if k else first_popup).append(popup_ms)
                samples.append({"site": f"{path.relative_to(repo)}:{line + 1}", "name": name, "typed": k,
                                "inline_ms": round(inline_ms, 1), "popup_ms": round(popup_ms, 1)})
            client.text_document_did_close(t.DidCloseTextDocumentParams(t.TextDocumentIdentifier(uri)))
            if i % 10 == 9:
                print(f"  {i + 1} sites", flush=True)
        result["inline_keystroke"] = summary(key_inline)
        result["popup_keystroke"] = summary(key_popup)
        result["inline_first_at_site"] = summary(first_inline)
        result["popup_first_at_site"] = summary(first_popup)
        result["server_memory_mb"] = {"after_indexing": rss_indexed, "end": proc_memory(pid)}
        result["samples"] = samples
    finally:
        await close(client)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--memory-tokens", type=int, default=200_000)
    ap.add_argument("--sites", type=int, default=40)
    ap.add_argument("--keystrokes", type=int, default=3, help="characters of the name typed per site")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="reuse a cache (default: a fresh temporary one)")
    ap.add_argument("--together", action="store_true", help="send ghost text and popup requests at once")
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="wait this long after opening a file before the first request (a user reading it)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()}), CPU",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
        **asyncio.run(run(a)),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

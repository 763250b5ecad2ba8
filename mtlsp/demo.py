"""``mtlsp demo``: the product pipeline end to end on a workspace (by default the bundled sample).

Indexes the workspace into its persistent memory store (the file being completed left out, so
that what the model knows of the rest comes from the memory alone), completes a line of that
file with and without the memory, and shows which files and lines the memory retrieved.  A
second run finds the store up to date and encodes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from mtlsp_model.generate import complete_line
from mtlsp_model.weights import SHIPPED, WeightsError, load_weights

from .encode import Encoder, bound_heap_retention
from .indexer import Indexer
from .memory import MemoryStore
from .memory_files import StoreError
from .retrieval import StoreMemory
from .scan import ScanOptions

SAMPLE = SHIPPED.parent / "sample_workspace"


def line_of(root: Path, path: str, offset: int) -> int:
    return (root / path).read_bytes()[:offset].count(b"\n") + 1


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mtlsp demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=SAMPLE)
    ap.add_argument("--file", default="app/report.py", help="the file to complete, relative to the workspace")
    ap.add_argument("--cursor-after", default="total = pricing.",
                    help="complete the line after the first occurrence of this text")
    ap.add_argument("--weights", help="weights directory (default: the shipped weights)")
    ap.add_argument("--cache-dir", help="where stores live (default: $XDG_CACHE_HOME/mtlsp)")
    a = ap.parse_args(argv)
    root = a.workspace.resolve()
    target = root / a.file
    try:
        text = target.read_text(encoding="utf-8")
        if a.cursor_after not in text:
            sys.exit(f"mtlsp demo: error: {a.cursor_after!r} does not occur in {target}")
        cut = text.index(a.cursor_after) + len(a.cursor_after)
        loaded = load_weights(Path(a.weights) if a.weights else SHIPPED)
        bound_heap_retention()
        store = MemoryStore.open(root, fingerprint=loaded.fingerprint, dim=loaded.config.head_dim,
                                 cache_root=a.cache_dir)
    except (OSError, UnicodeDecodeError, WeightsError, StoreError) as e:
        sys.exit(f"mtlsp demo: error: {e}")
    model, tok = loaded.model, loaded.tokenizer
    indexer = Indexer(root, store, Encoder(model, tok), scan=ScanOptions(exclude=(f"/{a.file}",)))
    report = indexer.refresh()
    print(f"indexed {root}: {report.files} files ({report.indexed} changed, {report.unchanged} unchanged), "
          f"{report.tokens_encoded} tokens encoded in {report.seconds:.2f}s; "
          f"the store ({store.dir}) holds {store.stats()['entries']} tokens")
    prefix = tok.file_header(a.file) + tok.encode(text[:cut])
    memory = StoreMemory(store)
    print(f"prompt: ...{text[max(0, cut - 80):cut]!r}")
    print(f"  without memory: {complete_line(model, tok, prefix, None)!r}")
    print(f"  with memory:    {complete_line(model, tok, prefix, memory)!r}")
    with torch.no_grad():  # what the memory layer retrieves for the cursor position
        model(torch.tensor([prefix]), memory=memory)
    hits, T, H = memory.last, len(prefix), model.cfg.n_head
    where: Counter[tuple[str, int]] = Counter()
    for h in range(H):
        row = h * T + T - 1
        for j in range(hits.slots.shape[1]):
            src = hits.source(row, j)
            if src is not None:
                where[(src[0], line_of(root, *src))] += 1
    print("  retrieved from: " + ", ".join(f"{p}:{line} ({n})" for (p, line), n in where.most_common(5)))

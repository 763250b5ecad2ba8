"""Bits per token of a repository's files, with the memory holding the rest of the repository.

Leave one out: each file is scored (its path header, then its text, in sliding windows) while
the memory layer reads the repository's store with that file hidden (``StoreMemory.hide``), so
the memory never holds the very tokens being predicted.  The same windows are scored without
memory for the comparison.

The memory-size curve scores a few files against stores holding growing, nested sets of the
other files' entries, copied from the repository's store (no re-encoding), so the bits per
token it shows differ only in how much of the repository the memory holds.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from mtlsp_model.evaluate import LN2, score_file
from mtlsp_model.model import MemorizingTransformer
from mtlsp_model.projects import SourceFile, cross_file_mask, defined_names
from mtlsp_model.tokenizer import Tokenizer

from ..complete.retrieval import StoreMemory
from ..store.memory_store import FileUpdate, MemoryStore, NewChunk, StoreOptions

Tick = Callable[[], None]


@dataclass
class FileBits:
    path: str
    tokens: int
    bits_memory: float  # total bits, memory = the repository minus this file
    bits_plain: float  # total bits, no memory
    cross_tokens: int  # tokens of names defined in another file and not in this one
    cross_bits_memory: float
    cross_bits_plain: float


def source_file(tok: Tokenizer, path: str, text: str) -> SourceFile:
    header = tok.file_header(path)
    return SourceFile(path, text, header + tok.encode(text), len(header))


def leave_one_out(
    model: MemorizingTransformer,
    tok: Tokenizer,
    store: MemoryStore,
    texts: dict[str, str],
    files: Sequence[str],
    tick: Tick = lambda: None,
) -> list[FileBits]:
    defined = {p: defined_names(t) for p, t in texts.items() if p.endswith(".py")}
    out = []
    for path in files:
        f = source_file(tok, path, texts[path])
        if len(f.ids) - f.first < 1:
            tick()
            continue
        foreign = set().union(*(d for p, d in defined.items() if p != path))
        cross = cross_file_mask(tok, f, foreign)
        with_memory = score_file(model, f, StoreMemory(store, hide=(path,)))
        plain = score_file(model, f, None)
        ok = ~np.isnan(plain)
        out.append(FileBits(path, int(ok.sum()), float(with_memory[ok].sum() / LN2), float(plain[ok].sum() / LN2),
                            int((ok & cross).sum()), float(with_memory[ok & cross].sum() / LN2),
                            float(plain[ok & cross].sum() / LN2)))
        tick()
    return out


def summarize(rows: list[FileBits]) -> dict:
    tokens = sum(r.tokens for r in rows)
    cross = sum(r.cross_tokens for r in rows)
    memory = sum(r.bits_memory for r in rows) / max(1, tokens)
    plain = sum(r.bits_plain for r in rows) / max(1, tokens)
    cross_memory = sum(r.cross_bits_memory for r in rows) / max(1, cross)
    cross_plain = sum(r.cross_bits_plain for r in rows) / max(1, cross)
    return {
        "files": len(rows),
        "tokens": tokens,
        "bits_per_token_memory": memory,
        "bits_per_token_plain": plain,
        "reduction": 1 - memory / plain if plain else None,
        "cross_tokens": cross,
        "cross_bits_per_token_memory": cross_memory,
        "cross_bits_per_token_plain": cross_plain,
        "cross_reduction": 1 - cross_memory / cross_plain if cross_plain else None,
        "per_file": [asdict(r) for r in rows],
    }


def copy_files(src: MemoryStore, dst: MemoryStore, paths: Sequence[str]) -> int:
    """Put ``paths``' stored entries into ``dst`` as they are; returns the tokens copied."""
    updates, tokens = [], 0
    for path in paths:
        info, entries = src.file_info(path), src.entries_of(path)
        if info is None or entries is None:
            continue
        chunks, row = [], 0
        for c in info.chunks:
            chunks.append(NewChunk(c.start, c.end, c.hash, entries.take(row, row + c.tokens), c.names))
            row += c.tokens
        updates.append(FileUpdate(path, info.content_hash, chunks))
        tokens += row
    if updates:
        dst.update(updates)
    return tokens


def memory_curve(
    model: MemorizingTransformer,
    tok: Tokenizer,
    store: MemoryStore,
    texts: dict[str, str],
    files: Sequence[str],
    sizes: Sequence[int],
    seed: int,
    tick: Tick = lambda: None,
) -> list[dict]:
    """Bits per token of ``files`` with 0, then ``sizes`` tokens of other files in the memory.

    The last point is the whole store (``files`` hidden one at a time), as in ``leave_one_out``.
    """
    prepared = [source_file(tok, p, texts[p]) for p in files]

    def score(memory_of) -> tuple[float, int]:
        bits = tokens = 0
        for f in prepared:
            nll = score_file(model, f, memory_of(f.path))
            ok = ~np.isnan(nll)
            bits, tokens = bits + float(nll[ok].sum()) / LN2, tokens + int(ok.sum())
            tick()
        return bits / max(1, tokens), tokens

    others = sorted(set(store.files()) - set(files))
    random.Random(seed).shuffle(others)
    points = []
    bpt, _ = score(lambda path: None)
    points.append({"memory_tokens": 0, "bits_per_token": bpt})
    with tempfile.TemporaryDirectory(prefix="mtlsp-eval-") as tmp:
        part = MemoryStore(tmp, fingerprint=store.fingerprint, heads=store.heads, dim=store.dim,
                           options=StoreOptions(cap_tokens=10**9, ann_background=False))
        stored = store.files()
        held, taken = 0, 0
        for size in sorted(sizes):
            batch, pending = [], held
            while taken < len(others) and pending < size:
                batch.append(others[taken])
                pending += stored[others[taken]].tokens
                taken += 1
            held += copy_files(store, part, batch)
            if held == 0:
                continue
            bpt, _ = score(lambda path: StoreMemory(part))
            points.append({"memory_tokens": held, "bits_per_token": bpt})
            if taken >= len(others):
                break
    total = sum(f.tokens for f in store.files().values())
    bpt, _ = score(lambda path: StoreMemory(store, hide=(path,)))
    points.append({"memory_tokens": total, "bits_per_token": bpt, "whole_repository": True})
    return points

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

from mtlsp_model.evaluate import byte_lengths, score_ids
from mtlsp_model.model import MemorizingTransformer
from mtlsp_model.tokenizer import CodeTokenizer

from ..memory import FileUpdate, MemoryStore, NewChunk, StoreOptions
from ..memory_files import Entries
from ..retrieval import StoreMemory

Tick = Callable[[], None]


@dataclass
class FileBits:
    path: str
    tokens: int
    bits_memory: float  # total bits, memory = the repository minus this file
    bits_plain: float  # total bits, no memory


def file_ids(tok: CodeTokenizer, path: str, text: str) -> tuple[list[int], int]:
    header = tok.file_header(path)
    return header + tok.encode(text), len(header)


def leave_one_out(
    model: MemorizingTransformer,
    tok: CodeTokenizer,
    store: MemoryStore,
    texts: dict[str, str],
    files: Sequence[str],
    tick: Tick = lambda: None,
) -> list[FileBits]:
    nbytes = byte_lengths(tok)
    out = []
    for path in files:
        ids, first = file_ids(tok, path, texts[path])
        if len(ids) - first < 1:
            tick()
            continue
        with_memory = score_ids(model, ids, first, nbytes, memory=StoreMemory(store, hide=(path,)))
        plain = score_ids(model, ids, first, nbytes)
        out.append(FileBits(path, with_memory.tokens, with_memory.bits, plain.bits))
        tick()
    return out


def summarize(rows: list[FileBits]) -> dict:
    tokens = sum(r.tokens for r in rows)
    memory = sum(r.bits_memory for r in rows) / max(1, tokens)
    plain = sum(r.bits_plain for r in rows) / max(1, tokens)
    return {
        "files": len(rows),
        "tokens": tokens,
        "bits_per_token_memory": memory,
        "bits_per_token_plain": plain,
        "reduction": 1 - memory / plain if plain else None,
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
            part = slice(row, row + c.tokens)
            chunks.append(NewChunk(c.start, c.end, c.hash, Entries(
                entries.keys[part], entries.values[part], entries.scales[part], entries.offsets[part])))
            row += c.tokens
        updates.append(FileUpdate(path, info.content_hash, chunks))
        tokens += row
    if updates:
        dst.update(updates)
    return tokens


def memory_curve(
    model: MemorizingTransformer,
    tok: CodeTokenizer,
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
    nbytes = byte_lengths(tok)
    prepared = [(p, *file_ids(tok, p, texts[p])) for p in files]

    def score(memory_of) -> tuple[float, int]:
        bits = tokens = 0
        for path, ids, first in prepared:
            s = score_ids(model, ids, first, nbytes, memory=memory_of(path))
            bits, tokens = bits + s.bits, tokens + s.tokens
            tick()
        return bits / max(1, tokens), tokens

    others = sorted(set(store.files()) - set(files))
    random.Random(seed).shuffle(others)
    points = []
    bpt, _ = score(lambda path: None)
    points.append({"memory_tokens": 0, "bits_per_token": bpt})
    with tempfile.TemporaryDirectory(prefix="mtlsp-eval-") as tmp:
        part = MemoryStore(tmp, fingerprint=store.fingerprint, dim=store.dim,
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

"""Chunks → tokens → memory entries, through the model's encode path in batches.

Each chunk is read after a short context that edits elsewhere in the file rarely change: the
file's path header and its leading non-definition lines (imports, mostly).  Only the chunk's own tokens become
entries.  A stable context is what lets an unchanged chunk keep its entries when a function is
added above it; the previous lines would change with every such edit.

Chunks that fit one model segment are padded on the right and encoded together (attention is
causal, so padding after a sequence changes nothing in it); longer ones go segment by segment
with the Transformer-XL cache, exactly as training read them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from mtlsp_model.generate import encode_entries
from mtlsp_model.model import KV, MemorizingTransformer
from mtlsp_model.runner import autocast
from mtlsp_model.tokenizer import CodeTokenizer

from .chunks import Chunk
from .memory_files import Entries
from .retrieval import entries_from_kv

CONTEXT_BYTES = 384  # the file's first lines every chunk is read after


def bound_heap_retention(threshold: int = 2 << 20) -> bool:
    """Make glibc return large freed blocks to the system at once (``M_MMAP_THRESHOLD``).

    Why: encoding allocates activations of ever-changing shapes; glibc's adaptive threshold
    then serves them from the heap and keeps the freed memory.  Measured while encoding 450k
    tokens of pydantic on the dev machine: peak RSS 943 MB by default, 474 MB with a fixed
    2 MB threshold (427 MB at 256 KB, but 1.9x slower).  Process-wide, so the long-running
    commands (``mtlsp index``, the server) call it; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Job:
    """One chunk ready for the model: its context, its tokens, each token's byte offset."""

    chunk: Chunk
    hash: str
    context: list[int]
    ids: list[int]
    offsets: np.ndarray


def preamble(data: bytes, chunks: list[Chunk]) -> bytes:
    """The file's leading non-definition lines (imports, mostly), cut at a line end, up to
    ``CONTEXT_BYTES``: empty when the file opens with a definition or has no grammar."""
    if not chunks or chunks[0].kind != "preamble":
        return b""
    head = data[: min(chunks[0].end, CONTEXT_BYTES)]
    if len(head) < chunks[0].end:
        head = head[: head.rfind(b"\n") + 1]
    return head


def chunk_hashes(path: str, data: bytes, chunks: list[Chunk]) -> list[str]:
    """What determines each chunk's entries: path, context and bytes (repeats numbered)."""
    pre = preamble(data, chunks)
    seen: dict[str, int] = {}
    out = []
    for c in chunks:
        context = b"" if c.start == 0 else pre
        h = hashlib.blake2b(b"\0".join([path.encode(), context, data[c.start : c.end]]), digest_size=16).hexdigest()
        seen[h] = seen.get(h, 0) + 1
        out.append(h if seen[h] == 1 else f"{h}:{seen[h]}")
    return out


class Encoder:
    """Turns jobs into storage entries with one model; thread-compatible, not thread-safe."""

    def __init__(self, model: MemorizingTransformer, tok: CodeTokenizer, *, batch_tokens: int = 8192) -> None:
        self.model = model
        self.tok = tok
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device
        # bytes per token id; special ids (file headers) stand for no bytes of the file
        self._lengths = np.array([len(tok.token_bytes[i]) for i in range(tok.base)] + [0] * (tok.vocab_size - tok.base))

    def token_offsets(self, ids: list[int]) -> np.ndarray:
        """Each token's first byte in the text ``ids`` encode (relative to its start)."""
        if not ids:
            return np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(self._lengths[ids])[:-1]])

    def job(self, path: str, data: bytes, chunk: Chunk, chunk_hash: str, pre: bytes) -> Job:
        """``pre``: the file's ``preamble``, read before every chunk but the first."""
        context = self.tok.file_header(path)
        if chunk.start > 0 and pre:
            context = context + self.tok.encode(pre.decode("utf-8"))
        ids = self.tok.encode(data[chunk.start : chunk.end].decode("utf-8"))
        return Job(chunk, chunk_hash, context, ids, self.token_offsets(ids))

    @torch.no_grad()
    def encode(self, jobs: list[Job]) -> list[Entries]:
        out: list[Entries | None] = [None] * len(jobs)
        T = self.model.cfg.seq_len
        short = sorted((i for i, j in enumerate(jobs) if len(j.context) + len(j.ids) <= T),
                       key=lambda i: len(jobs[i].context) + len(jobs[i].ids))
        batch: list[int] = []
        for i in short:
            n = len(jobs[i].context) + len(jobs[i].ids)
            if batch and n * (len(batch) + 1) > self.batch_tokens:
                self._encode_batch(jobs, batch, out)
                batch = []
            batch.append(i)
        if batch:
            self._encode_batch(jobs, batch, out)
        for i, j in enumerate(jobs):
            if out[i] is None:  # longer than a segment: XL cache, segment by segment
                kv = encode_entries(self.model, j.context + j.ids)
                out[i] = self._entries(kv.keys[:, :, len(j.context) :], kv.values[:, :, len(j.context) :], j)
        return out  # type: ignore[return-value]

    def _encode_batch(self, jobs: list[Job], batch: list[int], out: list) -> None:
        rows = [jobs[i].context + jobs[i].ids for i in batch]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.tok.pad, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, : len(row)] = torch.tensor(row)
        with autocast(self.device):
            kv, _ = self.model.encode(x.to(self.device))
        for r, i in enumerate(batch):
            a, b = len(jobs[i].context), len(rows[r])
            out[i] = self._entries(kv.keys[r : r + 1, :, a:b], kv.values[r : r + 1, :, a:b], jobs[i])

    @staticmethod
    def _entries(keys: torch.Tensor, values: torch.Tensor, job: Job) -> Entries:
        return entries_from_kv(KV(keys, values), job.offsets)

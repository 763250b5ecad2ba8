"""Chunks → tokens → memory entries, through the model's encode path in batches.

Each chunk is read after a short context that edits elsewhere in the file rarely change: the
base's own file header (``<filename>path``, the format it was pretrained on) and the file's
leading non-definition lines (imports, mostly).  Only the chunk's own tokens become entries.
A stable context is what lets an unchanged chunk keep its entries when a function is added
above it; the previous lines would change with every such edit.  The context also keeps the
attention sinks (the first tokens of a sequence, which every query attends to) out of the
memory: they are read, never stored.

Chunks are padded on the right and encoded together (attention is causal, so padding after a
sequence changes nothing in it).  A file's chunks share their context, which is read once per
batch of files and attended to by each chunk (``MemorizingTransformer.read_prefix``): on flask
the contexts are 28% of the tokens read.  A chunk longer than ``piece_tokens`` is encoded in pieces cut
after a line end, each read after the same context.  Only the blocks up to the last memory
layer run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from mtlsp_model.model import MemorizingTransformer, Prefix
from mtlsp_model.runtime import encoding
from mtlsp_model.tokenizer import Tokenizer

from ..gate import ModelGate
from ..store.files import Entries
from .chunks import Chunk

CONTEXT_BYTES = 384  # the file's first lines every chunk is read after


@dataclass(frozen=True)
class Job:
    """One chunk ready for the model: its context, its tokens, each token's byte offset."""

    chunk: Chunk
    hash: str
    context: list[int]
    ids: list[int]
    offsets: np.ndarray
    names: tuple[str, ...] = ()  # what the chunk defines (kept with it in the store)


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

    def __init__(self, model: MemorizingTransformer, tok: Tokenizer, *, batch_tokens: int = 2048,
                 piece_tokens: int = 1024, context_tokens: int = 4096, gate: ModelGate | None = None,
                 kept_contexts: int = 4) -> None:
        """``gate``: the model's, shared with a server's completions, which go first (``gate.py``);
        by default one of its own (nothing else runs this model).

        ``batch_tokens``: measured on flask's largest file with float32 products (an AVX2 CPU),
        4,096 tokens a batch peaked 1.05 GB above the loaded model and 2,048 0.4 GB, and
        2,048 was no slower (44 against 53-63 s for 15k tokens).

        ``kept_contexts``: files whose context (``Prefix``) stays read after an encoding of that
        file alone.  An editor's edit re-encodes one chunk of one file, again and again, and the
        context is most of what that reads: a 64-token function appended to a flask module is
        read after about 100 tokens of header and imports.  A context kept takes 35 KB per token
        (keys and values of 23 blocks in float32): 3.5 MB for 100 tokens."""
        self.model = model
        self.gate = gate or ModelGate()
        self.tok = tok
        self.batch_tokens = batch_tokens
        self.piece_tokens = piece_tokens
        self.context_tokens = context_tokens
        self.device = next(model.parameters()).device
        self.kept_contexts = kept_contexts
        self._contexts: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()  # least recently used first
        # bytes per token id; special ids (file headers) stand for no bytes of the file
        self._lengths = np.array([len(b) for b in tok.token_bytes], dtype=np.int64)
        self._newline = np.array([b.endswith(b"\n") for b in tok.token_bytes])

    def warm_up(self) -> None:
        """Encode a two-line file once.  The first encoding in a process pays about a second of
        one-time set-up in the math libraries (measured: the first 3-line edit of the sample
        workspace took 968 ms to encode, the next 162 ms); paid at start, it does not delay the
        first edit a user makes on its way into the memory."""
        data = b"import os\n\ndef warm_up(x):\n    return x\n"
        chunk = Chunk(data.index(b"def"), len(data), "lines")
        self.encode([self.job("warm_up.py", data, chunk, "", self.context("warm_up.py", data[: chunk.start]))])

    def token_offsets(self, ids: list[int]) -> np.ndarray:
        """Each token's first byte in the text ``ids`` encode (relative to its start)."""
        if not ids:
            return np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(self._lengths[ids])[:-1]])

    def job(self, path: str, data: bytes, chunk: Chunk, chunk_hash: str, context: list[int],
            names: tuple[str, ...] = ()) -> Job:
        """``context``: the file's (``context(path, preamble)``), read before every chunk but the
        first, which follows the file header alone (the preamble is its own text)."""
        if chunk.start == 0:
            context = context[: len(self.tok.file_header(path))]
        ids = self.tok.encode(data[chunk.start : chunk.end].decode("utf-8"))
        return Job(chunk, chunk_hash, context, ids, self.token_offsets(ids), names)

    def context(self, path: str, pre: bytes) -> list[int]:
        """What a chunk of ``path`` is read after: the file header, then ``pre``."""
        header = self.tok.file_header(path)
        return header + self.tok.encode(pre.decode("utf-8")) if pre else header

    def prepare(self, context: list[int]) -> None:
        """Read ``context`` ahead of the edits that will be encoded after it (``kept_contexts``),
        taking the model only when completions leave it free, like a write."""
        if not self.kept_contexts or tuple(context) in self._contexts:
            return
        with self._writing() as pause:
            self._prefix([tuple(context)], pause)

    @contextmanager
    def _writing(self) -> Iterator[Callable[[], None]]:
        """The model, for reading into the memory: once completions leave it free (the gate's
        ``pause`` lets them in between blocks), without gradients, in encoding mode."""
        with torch.no_grad(), self.gate.write() as pause, encoding():
            yield pause

    def _pieces(self, n: int, ids: list[int]) -> list[tuple[int, int]]:
        """Ranges of ``ids`` of at most ``piece_tokens``, cut after a line end where possible."""
        out, a, size = [], 0, self.piece_tokens
        while a < n:
            b = min(n, a + size)
            if b < n:
                ends = np.nonzero(self._newline[ids[a + size // 2 : b]])[0]
                if ends.size:
                    b = a + size // 2 + int(ends[-1]) + 1
            out.append((a, b))
            a = b
        return out

    def encode(self, jobs: list[Job]) -> list[Entries]:
        """Entries for each job, in order.

        Jobs are taken a group of contexts at a time (``context_tokens`` of them, which bounds
        the contexts' keys and values held at once): the group's contexts are read once
        (``read_prefix``), then its pieces, shortest first, in batches of ``batch_tokens``.
        """
        parts: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        group: dict[tuple[int, ...], int] = {}  # context -> its row in the group's prefix
        members: list[tuple[int, int]] = []  # (job, its context's row)
        held = 0  # context tokens in the group
        with self._writing() as pause:
            for j, job in enumerate(jobs):
                key = tuple(job.context)
                if key not in group and group and held + len(key) > self.context_tokens:
                    self._encode_group(jobs, members, list(group), parts, pause)
                    group, members, held = {}, [], 0
                if key not in group:
                    group[key] = len(group)
                    held += len(key)
                members.append((j, group[key]))
            if members:
                self._encode_group(jobs, members, list(group), parts, pause)
        out = []
        S, D = len(self.model.cfg.memory_kv_heads), self.model.cfg.head_dim
        for j, job in enumerate(jobs):
            got = sorted(parts.get(j, []), key=lambda p: p[0])
            keys = np.concatenate([p[1] for p in got]) if got else np.zeros((0, S, D), np.float32)
            values = np.concatenate([p[2] for p in got]) if got else np.zeros((0, S, D), np.float32)
            out.append(Entries.from_float(keys, values, np.asarray(job.ids, dtype=np.int64), job.offsets))
        return out

    def _encode_group(self, jobs: list[Job], members: list[tuple[int, int]], contexts: list[tuple[int, ...]],
                      parts: dict, pause: Callable[[], None]) -> None:
        prefix = self._prefix(contexts, pause)
        rows = [(j, a, b, row) for j, row in members for a, b in self._pieces(len(jobs[j].ids), jobs[j].ids)]
        rows.sort(key=lambda r: r[2] - r[1])
        i = 0
        while i < len(rows):
            k = i + 1
            while k < len(rows) and (k - i + 1) * (rows[k][2] - rows[k][1]) <= self.batch_tokens:
                k += 1
            batch = rows[i:k]
            which = torch.tensor([row for *_, row in batch], device=self.device)
            self._encode_batch(jobs, [(j, a, b) for j, a, b, _ in batch], prefix, which, parts, pause)
            i = k

    def _prefix(self, contexts: list[tuple[int, ...]], pause: Callable[[], None]) -> Prefix:
        """The contexts read, or a single file's context as read last time (see ``__init__``).
        Several files at once (indexing in bulk) are read afresh: they rarely come again."""
        if len(contexts) != 1 or not self.kept_contexts:
            return self.model.read_prefix([list(c) for c in contexts], pad=self.tok.eot, pause=pause)
        key = contexts[0]
        prefix = self._contexts.pop(key, None)
        if prefix is None:
            prefix = self.model.read_prefix([list(key)], pad=self.tok.eot, pause=pause)
        self._contexts[key] = prefix
        while len(self._contexts) > self.kept_contexts:
            self._contexts.popitem(last=False)
        return prefix

    def _encode_batch(self, jobs: list[Job], rows: list[tuple[int, int, int]], prefix: Prefix, which: torch.Tensor,
                      parts: dict, pause: Callable[[], None]) -> None:
        width = max(b - a for _, a, b in rows)
        x = torch.full((len(rows), width), self.tok.eot, dtype=torch.long)
        for r, (j, a, b) in enumerate(rows):
            x[r, : b - a] = torch.tensor(jobs[j].ids[a:b])
        e = self.model.encode(x.to(self.device), prefix=prefix, rows=which, pause=pause)
        keys = e.keys.float().permute(0, 2, 1, 3).cpu().numpy()  # (B, T, S, D)
        values = e.values.float().permute(0, 2, 1, 3).cpu().numpy()
        for r, (j, a, b) in enumerate(rows):
            parts.setdefault(j, []).append((a, keys[r, : b - a], values[r, : b - a]))

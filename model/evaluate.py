"""Bits per token (and per byte) of a model on held-out repositories, at several memory sizes.

The paper's measurement: a repository's files are streamed as one document, segment by
segment, with the XL cache and a memory that holds the most recent ``capacity`` tokens of the
document (0 = memory off, ``None`` = the whole repository).  Comparing the sizes shows how much
the memory buys.  A second mode scores files one at a time in sliding windows, memory off, to
compare with plain language models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import load_document, refuse_trained_on
from .dataset import document_tokens
from .memory import Memory
from .model import MemorizingTransformer
from .runner import SegmentRunner, autocast
from .stream import SegmentStream
from .tokenizer import CodeTokenizer

LN2 = math.log(2)


@dataclass
class Score:
    bits: float = 0.0
    tokens: int = 0
    bytes: int = 0

    @property
    def bits_per_token(self) -> float:
        return self.bits / max(1, self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.bits / max(1, self.bytes)

    def __iadd__(self, other: "Score") -> "Score":
        self.bits += other.bits
        self.tokens += other.tokens
        self.bytes += other.bytes
        return self


@torch.no_grad()
def score_stream(
    model: MemorizingTransformer,
    stream: SegmentStream,
    capacity: int,
    *,
    token_bytes: list[int] | None = None,
    max_batches: int | None = None,
) -> Score:
    """Score every target the stream yields, memorising as it goes (capacity 0 = no memory)."""
    device = next(model.parameters()).device
    runner = SegmentRunner(model, stream.pad_id, stream.batch, capacity)
    score = Score()
    nbytes = torch.tensor(token_bytes, device=device) if token_bytes is not None else None
    batches = 0
    while not stream.exhausted and (max_batches is None or batches < max_batches):
        out, y = runner(model, stream.next_batch(), with_targets=False)
        nll = F.cross_entropy(
            out.logits.float().view(-1, out.logits.shape[-1]), y.view(-1), ignore_index=-1,
            reduction="sum",
        )
        live = y >= 0
        score += Score(
            bits=nll.item() / LN2,
            tokens=int(live.sum()),
            bytes=int(nbytes[y[live]].sum()) if nbytes is not None else 0,
        )
        batches += 1
    return score


def byte_lengths(tok: CodeTokenizer) -> list[int]:
    """Bytes each token stands for (special tokens: 0), to turn bits/token into bits/byte."""
    return [len(b) for b in tok.token_bytes] + [0] * (tok.vocab_size - tok.base)


def repository_tokens(root: Path, tok: CodeTokenizer, max_tokens: int | None) -> np.ndarray:
    doc = load_document(root.resolve().name, root, root, seed=0)
    if not doc.files:
        raise ValueError(f"{root} holds no Python source files")
    ids = np.asarray(document_tokens(doc, tok), dtype=np.int64)
    return ids[:max_tokens] if max_tokens else ids


def evaluate_repository(
    model: MemorizingTransformer,
    tok: CodeTokenizer,
    root: Path,
    memory_sizes: Iterable[int | None],
    *,
    manifest: dict | None,
    max_tokens: int | None = None,
) -> dict:
    """Bits per token/byte of one repository streamed as one document, per memory size.

    ``None`` in ``memory_sizes`` means the whole (possibly ``max_tokens``-capped) repository.
    Refuses a repository the training manifest includes.
    """
    if manifest is not None:
        refuse_trained_on(root, manifest)
    ids = repository_tokens(root, tok, max_tokens)
    nbytes = byte_lengths(tok)
    rows = {}
    for size in memory_sizes:
        capacity = len(ids) if size is None else size
        stream = SegmentStream(ids, [(0, len(ids))], 1, model.cfg.seq_len, pad_id=tok.pad,
                               shuffle=False, loop=False)
        s = score_stream(model, stream, capacity, token_bytes=nbytes)
        rows["all" if size is None else str(size)] = {
            "bits_per_token": s.bits_per_token,
            "bits_per_byte": s.bits_per_byte,
            "tokens": s.tokens,
        }
    return {"repository": str(root), "tokens": int(len(ids)), "by_memory": rows}


@torch.no_grad()
def score_ids(
    model: MemorizingTransformer,
    ids: list[int],
    first_target: int,
    nbytes: list[int],
    *,
    stride: int | None = None,
    memory: Memory | None = None,
) -> Score:
    """Score ``ids[first_target:]`` in sliding windows of seq_len, reading ``memory`` if given.

    Every target is scored once, with at least ``seq_len - stride`` tokens of left context
    beyond the first window (stride: half a segment by default, 256 for 512-token segments): the
    usual protocol for comparing plain language models.  ``first_target`` skips a file header.
    """
    device = next(model.parameters()).device
    T = model.cfg.seq_len
    stride = stride or T // 2
    x_all = torch.tensor(ids, device=device)
    total = Score()
    scored_upto = first_target - 1  # absolute position of the last target already scored
    start = 0
    while scored_upto < len(ids) - 1:
        window = x_all[start : start + T + 1]
        x, y = window[:-1].unsqueeze(0), window[1:].clone()
        y[: max(0, scored_upto - start)] = -1  # target j sits at position start + 1 + j
        with autocast(device):
            logits = model(x, memory=memory).logits[0].float()
        nll = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
        live = y[y >= 0].tolist()
        total += Score(nll.item() / LN2, len(live), sum(nbytes[i] for i in live))
        scored_upto = start + len(window) - 1
        start += stride
    return total


def evaluate_files(
    model: MemorizingTransformer, tok: CodeTokenizer, files: list[Path], base: Path, stride: int | None = None
) -> Score:
    """Each file alone behind its path header, memory off (see ``score_ids``)."""
    nbytes = byte_lengths(tok)
    total = Score()
    for path in files:
        header = tok.file_header(path.relative_to(base).as_posix())
        ids = header + tok.encode(path.read_text(encoding="utf-8"))
        total += score_ids(model, ids, len(header), nbytes, stride=stride)
    return total

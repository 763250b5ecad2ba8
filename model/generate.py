"""Reading files into memory and completing code with the memorizing transformer.

``memorize`` is the write path: a file's tokens pass through the blocks below the memory layer
(``MemorizingTransformer.encode``) and the memory layer's keys/values become memory entries.
``complete`` is the read path: greedy decoding in Transformer-XL fashion (the segment being
written plus the cached previous one), the memory layer retrieving from the memory.

This is the model-level engine; the language server adds cursor handling, caching and
cancellation on top.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .model import KV, MemorizingTransformer
from .memory import Memory, TensorMemory
from .runner import autocast, new_memory
from .tokenizer import CodeTokenizer


def file_tokens(tok: CodeTokenizer, path: str, text: str) -> list[int]:
    return tok.file_header(path) + tok.encode(text)


@torch.no_grad()
def encode_entries(model: MemorizingTransformer, ids: list[int]) -> KV:
    """Memory entries ``(1, Hkv, n, D)`` of one text, segment by segment with the XL cache."""
    device = next(model.parameters()).device
    T = model.cfg.seq_len
    cache = None
    keys, values = [], []
    for start in range(0, len(ids), T):
        x = torch.tensor([ids[start : start + T]], device=device)
        with autocast(device):
            entries, cache = model.encode(x, cache)
        keys.append(entries.keys)
        values.append(entries.values)
    return KV(torch.cat(keys, dim=2), torch.cat(values, dim=2))


def memorize(
    model: MemorizingTransformer, tok: CodeTokenizer, files: Iterable[tuple[str, str]]
) -> TensorMemory:
    """A single-slot memory holding every token of ``files`` ((path, text) pairs)."""
    encoded = [encode_entries(model, file_tokens(tok, p, t)) for p, t in files]
    total = sum(e.keys.shape[2] for e in encoded)
    memory = new_memory(model, 1, max(1, total), next(model.parameters()).device)
    for e in encoded:
        memory.add(e.keys, e.values)
    return memory


@torch.no_grad()
def generate(
    model: MemorizingTransformer,
    ids: list[int],
    *,
    memory: Memory | None,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool],
) -> list[int]:
    """Greedy continuation of ``ids``; ``stop(new_ids)`` ends it early.

    The context is the current segment (up to ``seq_len`` tokens, recomputed per new token)
    plus the XL cache of the segment before it, exactly the view the model was trained with.
    """
    device = next(model.parameters()).device
    T = model.cfg.seq_len
    ids = list(ids)
    new: list[int] = []
    seg_start = max(0, (len(ids) - 1) // T * T)
    cache = None

    def run_cache(start: int) -> list[KV] | None:
        if start == 0 or not model.cfg.xl_cache:
            return None
        x = torch.tensor([ids[start - T : start]], device=device)
        with autocast(device):
            return model(x, memory=memory).cache

    cache = run_cache(seg_start)
    for _ in range(max_new_tokens):
        if len(ids) - seg_start >= T:  # the segment is full: it becomes the cache
            seg_start += T
            cache = run_cache(seg_start)
        x = torch.tensor([ids[seg_start:]], device=device)
        with autocast(device):
            logits = model(x, memory=memory, cache=cache).logits[0, -1]
        nxt = int(logits.argmax())
        ids.append(nxt)
        new.append(nxt)
        if stop(new):
            break
    return new


def complete_line(
    model: MemorizingTransformer,
    tok: CodeTokenizer,
    prefix_ids: list[int],
    memory: Memory | None,
    max_new_tokens: int = 32,
) -> str:
    """The rest of the current line after ``prefix_ids``."""

    def at_line_end(new: list[int]) -> bool:
        return new[-1] >= tok.base or b"\n" in tok.token_bytes[new[-1]]

    out = generate(model, prefix_ids, memory=memory, max_new_tokens=max_new_tokens, stop=at_line_end)
    text = tok.decode_bytes(i for i in out if i < tok.base).decode("utf-8", "replace")
    return text.split("\n", 1)[0]

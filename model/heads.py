"""Which heads should read the memory: induction heads, found by measurement.

An induction head attends from a token to the token that *followed* the previous occurrence of
the same token, and copies it: exactly the lookup a memory of the project needs ("what came
after ``pricing.`` elsewhere?").  Its keys encode the previous token's identity, so the same
keys stored in a memory are found by the same queries.

The score (Olsson et al., 2022): on a sequence of random tokens repeated twice, the mean
attention a head pays, from each token of the second copy, to the token after its first
occurrence.  Chance level is about 1/position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import MemorizingTransformer, rotary


@torch.no_grad()
def induction_scores(model: MemorizingTransformer, *, length: int = 128, batch: int = 4, seed: int = 0,
                     vocab_low: int = 1000) -> torch.Tensor:
    """``(n_layer, n_head)`` induction scores on ``batch`` random sequences repeated twice."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    low = min(vocab_low, cfg.vocab_size // 2)  # ordinary tokens: above the special and byte ids
    half = torch.randint(low, cfg.vocab_size, (batch, length), generator=g).to(device)
    idx = torch.cat((half, half), dim=1)
    T = idx.shape[1]
    x = model.embed(idx)
    cos, sin = model._rope(0, T, x.dtype)
    scores = torch.zeros(cfg.n_layer, cfg.n_head)
    src = torch.arange(length, T, device=device)
    dst = src - length + 1  # the token after the first occurrence
    for i, block in enumerate(model.blocks):
        h = block.ln1(x)
        q, k, v = block.attn.project(h).split([cfg.n_head, cfg.n_kv_head, cfg.n_kv_head], dim=1)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        k = k.repeat_interleave(cfg.group, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=device).tril(), float("-inf"))
        att = att.softmax(-1)  # (B, H, T, T)
        scores[i] = att[:, :, src, dst].mean(dim=(0, 2)).float().cpu()
        a = F.scaled_dot_product_attention(q, k, v.repeat_interleave(cfg.group, dim=1), is_causal=True)
        x = x + block.attn.o_proj(a.transpose(1, 2).reshape(*idx.shape, -1))
        x = x + block.mlp(block.ln2(x))
    return scores


def top_heads(scores: torch.Tensor, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` best (layer, head, score), best first."""
    flat = scores.flatten()
    best = flat.topk(min(n, flat.numel()))
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H, float(s)) for s, i in zip(best.values, best.indices)]


def choose_heads(scores: torch.Tensor, n: int, group: int, max_kv_heads: int = 4) -> tuple[tuple[int, int], ...]:
    """The ``n`` best heads whose key/value heads number at most ``max_kv_heads``.

    The memory stores one (key, value) per token for each key/value head a memory head reads,
    so that count, not the number of memory heads, sets the bytes per token (4 at 64 dims:
    536 bytes).  Heads sharing an already chosen key/value head cost no storage.
    """
    chosen: list[tuple[int, int]] = []
    kv: set[tuple[int, int]] = set()
    for layer, head, _ in top_heads(scores, scores.numel()):
        if len(chosen) == n:
            break
        slot = (layer, head // group)
        if slot in kv or len(kv) < max_kv_heads:
            chosen.append((layer, head))
            kv.add(slot)
    return tuple(sorted(chosen))

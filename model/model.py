"""The memorizing transformer (Wu et al., ICLR 2022) for code, in one file of plain PyTorch.

A decoder-only transformer with pre-norm blocks and rotary positions.  One block, at about 3/4
depth, is kNN-augmented: besides causal attention over the segment (and the cached previous
segment), each of its query heads retrieves the top-k (key, value) pairs from an external memory
and attends to them with a separate softmax; a learned per-head gate mixes the two results.

Choices and why:
- The memory stores exactly the keys and values that the memory layer uses for local attention.
  A separate projection used only for memory would never receive a gradient (nothing flows into
  the memory), so it could not learn.  To keep an entry compact the memory layer uses grouped
  key/value heads (``mem_kv_heads``; 1 by default, i.e. one shared head): 64-dim key + value in
  fp16 is 256 bytes per token, against 2 KiB for eight per-head pairs.
- Queries and keys of the memory layer are L2-normalised with learned per-head scales (one for
  local attention, one for memory attention), so keys written by older parameters stay on the
  same scale as fresh queries.
- Memory keys carry no position, and the memory layer's local attention gets position only from
  an ALiBi-style distance bias (the paper uses T5's relative bias there), not from rotary
  embeddings.  Why: with rotary embeddings the layer learned to copy locally by matching
  *rotated* queries and keys, a match tied to relative offsets that did not carry over to the
  position-free memory (the right entry ranked 355th of 992 on average, measured on the
  synthetic corpus of tests/synthetic.py); with content-only queries and keys it ranked 82nd
  after the same training, and the match carries over.
- Transformer-XL cache: every layer may attend to the previous segment's keys and values (no
  gradient).  A reset flag per batch slot masks the cache out where a new document starts.
- Keys and values of the memory layer depend only on the layers below it, which never read the
  memory; ``encode`` runs just those layers, which is all the indexer needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import Memory


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 16384
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    seq_len: int = 512  # segment length: tokens per forward pass
    mem_layer: int = -1  # index of the kNN-augmented block; -1 picks about 3/4 depth
    mem_kv_heads: int = 1  # key/value heads of the memory layer (1 = compact shared memory)
    knn_k: int = 32
    xl_cache: bool = True
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError("d_model must be a multiple of n_head")
        if self.n_head % self.mem_kv_heads:
            raise ValueError("n_head must be a multiple of mem_kv_heads")
        if not 0 <= self.memory_layer < self.n_layer:
            raise ValueError(f"mem_layer {self.mem_layer} outside 0..{self.n_layer - 1}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def memory_layer(self) -> int:
        """The paper puts memory at layer 9 of 12; we keep that ratio for other depths."""
        return self.mem_layer if self.mem_layer >= 0 else max(0, 3 * self.n_layer // 4 - 1)

    @property
    def bytes_per_memory_token(self) -> int:
        """Stored size of one token's memory entry (key + value, fp16)."""
        return 2 * self.mem_kv_heads * self.head_dim * 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)


class KV(NamedTuple):
    """Keys and values of one layer for one segment, before any rotary embedding: ``(B, Hkv, T, D)``."""

    keys: Tensor
    values: Tensor


class Output(NamedTuple):
    logits: Tensor
    loss: Tensor | None
    cache: list[KV] | None  # this segment's keys/values per layer, for the next segment
    entries: KV  # the memory layer's entries for this segment (normalised keys, values)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs of channels (first half with second half) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention over [cached previous segment; current segment].

    The memory layer's variant normalises queries and keys, uses ``mem_kv_heads`` key/value
    heads, and adds gated attention over retrieved memories.
    """

    def __init__(self, cfg: ModelConfig, memory: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.is_memory = memory
        self.n_head = cfg.n_head
        self.kv_heads = cfg.mem_kv_heads if memory else cfg.n_head
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * self.kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if memory:
            # log of the per-head temperatures applied to cosine similarities, one for local
            # attention and one for memory attention (see mix_memory for why two).
            self.log_scale = nn.Parameter(torch.full((cfg.n_head,), math.log(math.sqrt(hd) * 2)))
            self.mem_log_scale = nn.Parameter(torch.full((cfg.n_head,), math.log(math.sqrt(hd) * 2)))
            # g = sigmoid(gate) mixes memory and local attention; 0 starts at an even mix.
            self.gate = nn.Parameter(torch.zeros(cfg.n_head))
            # ALiBi's geometric slopes: each head has its own reach into the local past.
            slopes = 2.0 ** (-8.0 * torch.arange(1, cfg.n_head + 1) / cfg.n_head)
            self.register_buffer("slopes", slopes, persistent=False)

    def project_kv(self, x: Tensor) -> KV:
        """Keys and values of ``x`` ``(B, T, C)`` as ``(B, Hkv, T, D)``; normalised keys here."""
        B, T, _ = x.shape
        k, v = self.kv_proj(x).view(B, T, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        if self.is_memory:
            k = F.normalize(k, dim=-1)
        return KV(k, v)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KV | None,
        keep_cache: Tensor | None,
        memory: Memory | None,
        whole: bool = False,
    ) -> tuple[Tensor, KV]:
        """Returns the output and this segment's keys/values (``whole``: with the cache's before them)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        kv = self.project_kv(x)
        k, v = kv
        if cache is not None:
            k = torch.cat((cache.keys.to(k.dtype), k), dim=2)
            v = torch.cat((cache.values.to(v.dtype), v), dim=2)
        past = k.shape[2] - T
        mask = None
        if past:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            prev = keep_cache.view(B, 1, 1, 1).expand(B, 1, T, past)
            mask = torch.cat((prev, causal.expand(B, 1, T, T)), dim=-1)
        if self.is_memory:
            q = F.normalize(q, dim=-1)
            scale = self.log_scale.exp().view(1, -1, 1, 1).to(q.dtype)
            local = F.scaled_dot_product_attention(
                q * scale, k, v, attn_mask=self.distance_bias(T, past, mask, q.dtype), scale=1.0,
                enable_gqa=self.kv_heads != self.n_head,
            )
        else:
            cos, sin = rope
            local = F.scaled_dot_product_attention(
                rotary(q, cos[past:], sin[past:]), rotary(k, cos, sin), v,
                attn_mask=mask, is_causal=mask is None,
            )
        if self.is_memory and memory is not None:
            local = self.mix_memory(q, local, memory)
        y = local.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y), KV(k, v) if whole else kv

    def distance_bias(self, T: int, past: int, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """ALiBi-style additive bias: -slope_h * distance, -inf where attention is not allowed.

        Position enters the memory layer's local attention only through this bias, never through
        the queries and keys, so the content match it learns locally is the same match that
        finds position-free entries in the memory.
        """
        device = self.slopes.device
        dist = (torch.arange(T, device=device) + past)[:, None] - torch.arange(past + T, device=device)
        bias = -self.slopes.view(-1, 1, 1) * dist.clamp(min=0).to(self.slopes.dtype)  # (H, T, past+T)
        allowed = dist >= 0 if mask is None else mask  # causal, and the cache only where kept
        return bias.to(dtype).masked_fill(~allowed, float("-inf"))

    def mix_memory(self, q: Tensor, local: Tensor, memory: Memory) -> Tensor:
        """Gated attention over the top-k retrieved memories (position-free, no gradient in).

        The memory softmax has its own temperature.  With one temperature shared with local
        attention, early (still unhelpful) retrievals pushed it down, which blurred local
        attention too and left memory attention too flat to ever become useful.
        """
        got = memory.search(q.detach(), self.cfg.knn_k)
        scale = self.mem_log_scale.exp().view(1, -1, 1, 1)
        mk = got.keys.to(q.dtype)
        mv = got.values.to(q.dtype)
        logits = torch.einsum("bhtd,bhtkd->bhtk", q, mk) * scale.to(q.dtype)
        logits = logits.masked_fill(~got.mask, float("-inf"))
        weights = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        mem = torch.einsum("bhtk,bhtkd->bhtd", weights, mv)
        # Where nothing was retrieved (empty memory) local attention stands alone.
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1).to(q.dtype) * got.mask.any(-1, keepdim=True)
        return g * mem + (1 - g) * local


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, memory: bool) -> None:
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, memory)
        self.ln2 = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache, keep_cache, memory, whole=False) -> tuple[Tensor, KV]:
        a, kv = self.attn(self.ln1(x), rope, cache, keep_cache, memory, whole)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class MemorizingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, memory=i == cfg.memory_layer) for i in range(cfg.n_layer)
        )
        self.ln_f = nn.RMSNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "down.weight")):  # GPT-2 residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(2 * cfg.seq_len).float(), inv)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def memory_attention(self) -> Attention:
        return self.blocks[self.cfg.memory_layer].attn

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, total: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if total > self.rope_cos.shape[0]:
            raise ValueError(f"context of {total} tokens exceeds 2 x seq_len")
        return self.rope_cos[:total].to(dtype), self.rope_sin[:total].to(dtype)

    def _run(
        self,
        idx: Tensor,
        upto: int,
        cache: list[KV] | None,
        reset: Tensor | None,
        memory: Memory | None,
        whole: bool = False,
    ) -> tuple[Tensor, list[KV]]:
        """Run blocks ``0..upto-1``; returns the hidden state and each block's new KV (``whole``:
        the cache's KV followed by the new)."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"segment of {T} tokens exceeds seq_len {self.cfg.seq_len}")
        use_cache = cache is not None
        past = cache[0].keys.shape[2] if use_cache else 0
        keep = None
        if use_cache:
            keep = torch.ones(B, dtype=torch.bool, device=idx.device)
            if reset is not None:
                keep = ~reset.to(idx.device, torch.bool)
        x = self.embed(idx)
        rope = self._rope(past + T, x.dtype)
        new: list[KV] = []
        for i in range(upto):
            x, kv = self.blocks[i](x, rope, cache[i] if use_cache else None, keep, memory, whole)
            new.append(KV(kv.keys.detach(), kv.values.detach()))
        return x, new

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        memory: Memory | None = None,
        cache: list[KV] | None = None,
        reset: Tensor | None = None,
    ) -> Output:
        """One segment.  ``targets`` use -1 for positions without loss.

        ``cache`` is the previous segment's ``Output.cache``; ``reset`` (B,) marks slots whose
        document starts in this segment, so their cache is ignored.  ``memory`` is searched by
        the memory layer; adding this segment's ``Output.entries`` to it is the caller's job,
        after the step, so a segment never retrieves itself.
        """
        x, new = self._run(idx, self.cfg.n_layer, cache if self.cfg.xl_cache else None, reset, memory)
        x = self.ln_f(x)
        logits = x @ self.embed.weight.t()  # tied input/output embedding
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1
            )
        return Output(logits, loss, new if self.cfg.xl_cache else None, new[self.cfg.memory_layer])

    @torch.no_grad()
    def encode(
        self, idx: Tensor, cache: list[KV] | None = None, reset: Tensor | None = None
    ) -> tuple[KV, list[KV] | None]:
        """Memory entries for a segment, running only the blocks below the memory layer.

        Returns the memory layer's (normalised key, value) per token ``(B, Hkv, T, D)`` and
        the XL cache of the lower blocks for encoding the next segment of the same text.
        """
        m = self.cfg.memory_layer
        x, new = self._run(idx, m, cache if self.cfg.xl_cache else None, reset, None)
        entries = self.blocks[m].attn.project_kv(self.blocks[m].ln1(x))
        return entries, (new if self.cfg.xl_cache else None)

    @torch.no_grad()
    def extend(
        self, idx: Tensor, past: list[KV] | None, memory: Memory | None = None
    ) -> tuple[Tensor, list[KV]]:
        """Incremental decoding: the final hidden state ``(B, C)`` of the last position of ``idx``.

        ``past`` holds every layer's keys and values of the tokens before ``idx`` ``(B, T)``
        (what a previous call returned); the result extends it by ``idx``.  Every token attends
        to all earlier tokens of the window, so a window of up to ``2 * seq_len`` tokens stays
        within the reach the model was trained with (a segment plus the cached one before it),
        and only new tokens are ever computed: a keystroke costs one token, not a segment.
        The next-token logits are ``hidden @ embed.weight.T``; a caller decoding many tokens
        keeps that matrix transposed and contiguous (on a CPU, 5x faster than the strided view).
        """
        x, kv = self._run(idx, self.cfg.n_layer, past, None, memory, whole=True)
        return self.ln_f(x[:, -1]), kv

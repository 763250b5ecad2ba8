"""The memorizing transformer (Wu et al., ICLR 2022) on a pretrained Llama-family base, in one file.

The base is an ordinary decoder-only Llama (RMSNorm, rotary positions, grouped key/value heads,
SwiGLU), loaded frozen from a converted checkpoint (``base.py``).  A few of its attention heads,
chosen by measurement (``heads.py``: induction heads), become **memory heads**: besides causal
attention over the prompt, each retrieves the top-k (key, value) pairs of its key/value head
from an external memory (the rest of the project) and attends to them in the same softmax.

Choices and why:
- **Memory entries are the base's own keys and values**, taken before the rotary embedding.
  They depend only on the frozen layers below, so encoding a project needs no memory lookups
  and no trained parameter: retraining the memory heads never invalidates a stored memory.
- **Retrieved entries sit at a fixed distance.**  A memory key has no position; the query is
  rotated as if every entry were ``mem_distance`` tokens back (InfLLM places retrieved blocks
  the same way), which keeps the head's learned rotary geometry intact.
- **One softmax over local and memory logits**, with a learned per-head bias on the memory
  logits (initial -2): a training-free joint softmax already helps on cross-file identifiers;
  the bias lets a head decide how far to trust entries it cannot see the surroundings of.
- **A low-rank adapter on the memory part of the query** (``q + B·A·x``), the only other trained
  parameters: context-to-memory distillation (``train.py``) teaches the heads to find in the
  memory what they would have found with the defining code in the prompt.
- **kNN copy.**  Entries remember their token.  The memory attention of the memory heads,
  summed per token id, is a distribution over tokens that appeared after matching contexts
  elsewhere in the project (kNN-LM's idea, on induction heads, whose keys encode the previous
  token); a learned gate mixes it into the next-token distribution, so exact names can be
  copied rather than re-spelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory import Memory

ARCH_FIELDS = ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "rope_theta",
               "norm_eps", "max_context", "tie_embeddings", "qkv_bias")


@dataclass(frozen=True)
class ModelConfig:
    # the base (defaults: SmolLM2-135M)
    vocab_size: int = 49152
    n_layer: int = 30
    d_model: int = 576
    n_head: int = 9
    n_kv_head: int = 3
    d_ff: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_context: int = 8192
    tie_embeddings: bool = True
    qkv_bias: bool = False
    # the memory
    memory_heads: tuple[tuple[int, int], ...] = ()  # (layer, query head) pairs that read the memory
    knn_k: int = 32
    mem_distance: int = 512  # retrieved entries are read as if this many tokens back
    adapter_rank: int = 8
    mem_bias_init: float = -2.0
    value_rank: int = 0  # rank of an adapter on the values the memory heads read (0: none)
    copy_context: bool = False  # the kNN copy's gate also reads the final hidden state

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("d_model must divide into n_head heads, and n_head into n_kv_head groups")
        object.__setattr__(self, "memory_heads", tuple(sorted((int(a), int(b)) for a, b in self.memory_heads)))
        for layer, head in self.memory_heads:
            if not (0 <= layer < self.n_layer and 0 <= head < self.n_head):
                raise ValueError(f"memory head L{layer}H{head} outside {self.n_layer} layers × {self.n_head} heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_kv_head

    @property
    def memory_kv_heads(self) -> tuple[tuple[int, int], ...]:
        """(layer, key/value head) pairs whose entries the memory stores, in storage order."""
        return tuple(sorted({(layer, head // self.group) for layer, head in self.memory_heads}))

    @property
    def encode_layers(self) -> int:
        """Blocks that run to encode memory entries: up to the last memory layer, inclusive."""
        return max((layer for layer, _ in self.memory_heads), default=-1) + 1

    @property
    def bytes_per_memory_token(self) -> int:
        """Stored size of one token's entries: int8 key and value with an fp16 scale each, per
        memory key/value head, plus the token id and byte offset."""
        return len(self.memory_kv_heads) * 2 * (self.head_dim + 2) + 8

    def arch_dict(self) -> dict:
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    def memory_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ARCH_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_arch(cls, arch: dict, **memory) -> ModelConfig:
        unknown = set(arch) - set(ARCH_FIELDS)
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**arch, **memory)

    def with_memory(self, **memory) -> ModelConfig:
        return replace(self, **memory)


ROOM = 64  # spare positions a new key/value buffer gets: a ghost text's tokens fit without a copy


class KVBuffer:
    """Keys and values with room after them, and how far they are claimed (see ``KV.extend``)."""

    def __init__(self, keys: Tensor, values: Tensor, claimed: int) -> None:
        self.keys, self.values, self.claimed = keys, values, claimed


class KV(NamedTuple):
    """Keys (rotated) and values of one layer for the tokens read so far: ``(B, Hkv, T, D)``.

    ``buffer``: the larger tensors these are the front of, when ``extend`` made them.
    """

    keys: Tensor
    values: Tensor
    buffer: KVBuffer | None = None

    def extend(self, keys: Tensor, values: Tensor, room: int = ROOM) -> KV:
        """These keys and values followed by ``keys``/``values`` along the sequence axis, without
        copying these where possible: decoding appends one token at a time, and copying every
        layer's keys and values at every step costs as much as the attention itself.

        The front of a buffer that is exactly its claimed part is extended in place (whoever holds
        this KV still sees only its own tokens).  Anything else (a shorter prefix of a buffer
        extended since, a batch of contexts, plain tensors) is copied into a new buffer with
        ``room`` spare positions.  In-place writes are only made without autograd.
        """
        n, T = self.keys.shape[2], keys.shape[2]
        buf = self.buffer
        if not (buf is not None and buf.claimed == n and buf.keys.shape[2] >= n + T
                and buf.keys.dtype == keys.dtype and not torch.is_grad_enabled()):
            buf = KV.join([KV(self.keys.to(keys.dtype), self.values.to(values.dtype))], T + room).buffer
        buf.keys[:, :, n : n + T] = keys
        buf.values[:, :, n : n + T] = values
        buf.claimed = n + T
        return KV(buf.keys[:, :, : n + T], buf.values[:, :, : n + T], buf)

    @staticmethod
    def own(keys: Tensor, values: Tensor, room: int = ROOM) -> KV:
        """The first keys and values of a sequence, copied into a buffer of their own with
        ``room`` spare positions.  As computed they are views into the block's rotated and fused
        projections, which hold the queries too: a 384-token prompt's state then kept 60-80 MB
        alive instead of 18, and the completer keeps one per open document.  The copy costs a few
        milliseconds, and the first decoding step then appends in place instead of copying.
        With autograd (training) the views are kept: nothing is cached there."""
        if torch.is_grad_enabled():
            return KV(keys, values)
        return KV.join([KV(keys, values)], room)

    @staticmethod
    def join(kvs: list[KV], room: int) -> KV:
        """``kvs`` (of one length) one after the other along the batch axis, copied once into a
        new buffer with ``room`` spare positions: what ``extend`` then appends to in place."""
        n = kvs[0].keys.shape[2]
        B = sum(kv.keys.shape[0] for kv in kvs)
        _, H, _, D = kvs[0].keys.shape
        buf = KVBuffer(kvs[0].keys.new_empty(B, H, n + room, D), kvs[0].values.new_empty(B, H, n + room, D), n)
        b = 0
        for kv in kvs:
            rows = kv.keys.shape[0]
            buf.keys[b : b + rows, :, :n] = kv.keys
            buf.values[b : b + rows, :, :n] = kv.values
            b += rows
        return KV(buf.keys[:, :, :n], buf.values[:, :, :n], buf)


class Entries(NamedTuple):
    """Memory entries of a text: per memory key/value head, keys (not rotated) and values,
    ``(B, S, T, D)`` with S = ``len(cfg.memory_kv_heads)``."""

    keys: Tensor
    values: Tensor


class Prefix(NamedTuple):
    """Contexts that rows of an ``encode`` call are read after, read once (``read_prefix``):
    per block below the last memory layer, rotated keys and values ``(C, Hkv, W, D)`` of C
    contexts right-aligned to W positions, and ``valid`` ``(C, W)``, False on the padding."""

    kv: list[KV]
    valid: Tensor


class Read(NamedTuple):
    """What one memory head read, per position: the entries' tokens and memory ids, and the
    attention they got, all ``(B, T, k)``.

    ``weights`` are shares of the head's whole softmax (local + memory), so a row sums to the
    fraction of attention that went to the memory (0 where a position did not read it).
    Provenance and the kNN copy are both computed from these.
    """

    head: int  # index into cfg.memory_heads
    weights: Tensor
    tokens: Tensor  # -1: no entry
    source: Tensor  # -1: no entry


class Output(NamedTuple):
    logits: Tensor  # (B, T, V) log-probabilities (or the last position only: (B, 1, V))
    kv: list[KV]  # every layer's keys/values: the past for the next call
    reads: list[Read]  # memory reads, in memory-head order (empty without memory)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + D/2) by position-dependent angles (the Hugging Face layout)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)
        self.qkv: nn.Module | None = None  # the three projections as one (``fuse``)

    def fuse(self) -> None:
        """Replace the three projections by one product (inference): fewer, larger matrix
        products, which is what a decoding step on a CPU is mostly made of."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv = _fused(parts)
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: Tensor) -> Tensor:
        """Queries, keys and values before rotation as one ``(B, H + 2·Hkv, T, D)`` tensor (heads
        in that order), so that rotating queries and keys, or changing their precision, is one
        operation."""
        B, T, _ = x.shape
        if self.qkv is not None:
            y = self.qkv(x)
        else:
            y = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return y.view(B, T, -1, self.cfg.head_dim).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.gate_up: nn.Module | None = None  # gate and up as one product (``fuse``)

    def fuse(self) -> None:
        """Gate and up projections as one product (inference), as ``Attention.fuse``."""
        self.gate_up = _fused((self.gate, self.up))
        del self.gate, self.up

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)


def _fused(parts: tuple[nn.Linear, ...]) -> nn.Linear:
    """One linear layer computing ``parts`` side by side (outputs concatenated in order)."""
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(False)
    return fused


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)


class MemoryParams(nn.Module):
    """The trained part: per memory head a logit bias and a low-rank query adapter; the copy gate.

    Optional (``value_rank``, ``copy_context``): a low-rank adapter on the retrieved values, so
    a memory head can pass on what an entry holds differently from a local key's value, and a
    copy gate that depends on the position (a linear read of the final hidden state), so the
    copy is trusted where the next token is a name and not elsewhere.  Both start as no change.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, r = len(cfg.memory_heads), cfg.adapter_rank
        self.bias = nn.Parameter(torch.full((n,), cfg.mem_bias_init))
        self.down = nn.Parameter(torch.randn(n, cfg.d_model, r) / math.sqrt(cfg.d_model)) if r else None
        self.up = nn.Parameter(torch.zeros(n, r, cfg.head_dim)) if r else None  # starts as no change
        # kNN copy: p = (1 - g) p_model + g p_copy with g = sigmoid(copy_gate) * memory share;
        # -4 starts it practically off, so an untrained model is the base plus memory attention.
        self.copy_gate = nn.Parameter(torch.tensor(-4.0))
        rv = cfg.value_rank
        self.value_down = nn.Parameter(torch.randn(n, cfg.head_dim, rv) / math.sqrt(cfg.head_dim)) if rv else None
        self.value_up = nn.Parameter(torch.zeros(n, rv, cfg.head_dim)) if rv else None
        self.copy_proj = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.copy_context else None


class MemorizingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.memory = MemoryParams(cfg)
        # per layer: [(memory head index, query head, storage slot of its key/value head)]
        slots = {kv: s for s, kv in enumerate(cfg.memory_kv_heads)}
        self._mem_at: dict[int, list[tuple[int, int, int]]] = {}
        for m, (layer, head) in enumerate(cfg.memory_heads):
            self._mem_at.setdefault(layer, []).append((m, head, slots[(layer, head // cfg.group)]))
        # Attention (and rotary) precision; None: that of the activations.  CPU inference runs
        # its linear layers in bfloat16 but attention in float32, which is both more precise and,
        # for one query at a time, faster there (runtime.py).
        self.attention_dtype: torch.dtype | None = None
        self._rope_len = 0
        self._fixed: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.register_buffer("rope_cos", torch.zeros(0), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(0), persistent=False)

    def num_params(self, trained_only: bool = False) -> int:
        """Parameters in all, or only those of the memory heads (what this project trains)."""
        params = self.memory.parameters() if trained_only else self.parameters()
        return sum(p.numel() for p in params)

    def output(self, h: Tensor) -> Tensor:
        """Next-token logits from final hidden states (the tied embedding unless the base has a head)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return h @ self.embed.weight.t().to(h.dtype)

    # ------------------------------------------------------------------ rotary tables

    def _angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=positions.device).double() / cfg.head_dim)
        ang = positions.double()[:, None] * inv[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().float(), ang.sin().float()

    def _rope(self, start: int, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        end = start + T
        if end > self.cfg.max_context:
            raise ValueError(f"context of {end} tokens exceeds the base's {self.cfg.max_context}")
        if end > self._rope_len:
            n = min(self.cfg.max_context, max(end, 2 * self._rope_len, 1024))
            self.rope_cos, self.rope_sin = self._angles(torch.arange(n, device=self.embed.weight.device))
            self._rope_len = n
        return self.rope_cos[start:end].to(dtype), self.rope_sin[start:end].to(dtype)

    # ------------------------------------------------------------------ the forward pass

    def forward(
        self,
        idx: Tensor,
        *,
        past: list[KV] | None = None,
        memory: Memory | None = None,
        last_only: bool = False,
        copy: bool = True,
        hidden: Tensor | None = None,
        from_layer: int = 0,
        memory_from: int = 0,
        tree: Tensor | None = None,
    ) -> Output:
        """Read ``idx`` ``(B, T)`` after ``past`` (every layer's keys/values of earlier tokens).

        Returns next-token log-probabilities, the keys/values of the layers that ran (``past``
        extended) and the memory reads.  ``last_only``: only the last position's distribution
        (incremental decoding).  ``copy``: mix the kNN copy distribution in (with a memory).
        ``hidden``/``from_layer``: start from the input of block ``from_layer`` (what
        ``hidden_at`` returned), which training uses to skip the frozen layers below the memory.
        ``memory_from``: only positions from this one on (of ``idx``) read the memory: a long
        prompt's early positions need not pay for searches (the product reads the memory at
        the prompt's last tokens and while decoding).
        ``tree``: ``(T, T)`` bool; the tokens of ``idx`` are the nodes of a tree, each read
        after ``past`` and its own ancestors only (``tree[i, j]``: node i reads node j; each
        node reads itself) at the position its depth gives it.  The candidate ranking reads a
        whole trie of names in one call this way instead of one decoding step per token.
        """
        x = self.embed(idx) if hidden is None else hidden
        x, kv, reads = self._run(x, from_layer, self.cfg.n_layer, past, memory, memory_from, tree)
        h = self.norm(x[:, -1:] if last_only else x)
        logp = torch.log_softmax(self.output(h).float(), dim=-1)
        if copy and reads:
            logp = self.mix_copy(logp, reads, last_only, h)
        return Output(logp, kv, reads)

    @torch.no_grad()
    def hidden_at(self, idx: Tensor, layer: int) -> Tensor:
        """The input of block ``layer`` for ``idx`` read from the start (no memory below it)."""
        return self._run(self.embed(idx), 0, layer, None, None)[0]

    def _run(self, x: Tensor, first: int, upto: int, past: list[KV] | None, memory: Memory | None,
             memory_from: int = 0, tree: Tensor | None = None) -> tuple[Tensor, list[KV], list[Read]]:
        """Blocks ``first..upto-1`` on ``x``; ``past[i]`` belongs to block ``first + i``."""
        B, T, _ = x.shape
        H, Hkv = self.cfg.n_head, self.cfg.n_kv_head
        start = past[0].keys.shape[2] if past else 0
        ad = self.attention_dtype or x.dtype
        if tree is None:
            cos, sin = self._rope(start, T, ad)
            mask = self._mask(T, start, x.device) if start and T > 1 else None
        else:
            depth = tree.sum(-1) - 1
            cos, sin = self._rope(start, int(depth.max()) + 1, ad)
            cos, sin = cos[depth], sin[depth]
            mask = torch.cat((torch.ones(T, start, dtype=torch.bool, device=x.device), tree), dim=-1)
        # the local keys each position may read, for the memory heads' own softmax
        allowed = None if memory is None else mask if mask is not None else self._mask(T, start, x.device)
        new: list[KV] = []
        reads: list[Read] = []
        for n, i in enumerate(range(first, upto)):
            block = self.blocks[i]
            h = block.ln1(x)
            qkv = block.attn.project(h).to(ad)
            qk = rotary(qkv[:, : H + Hkv], cos, sin)
            q0, q, k, v = qkv[:, :H], qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
            kv = past[n].extend(k, v) if past else KV.own(k, v)
            k, v = kv.keys, kv.values
            new.append(kv)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None and T > 1, attn_mask=mask,
                                               enable_gqa=self.cfg.group > 1)
            if memory is not None and i in self._mem_at and memory_from < T:
                a = self._memory_heads(i, a, q, q0, k, v, h.to(ad), allowed, memory, reads, memory_from)
            x = x + block.attn.o_proj(a.transpose(1, 2).reshape(B, T, -1)).to(x.dtype)
            x = x + block.mlp(block.ln2(x)).to(x.dtype)
        return x, new, reads

    @staticmethod
    def _mask(T: int, start: int, device: torch.device) -> Tensor:
        """Causal mask for ``T`` new queries after ``start`` cached positions (True = may attend)."""
        return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)

    def _memory_heads(self, layer: int, a: Tensor, q: Tensor, q0: Tensor, k: Tensor, v: Tensor, h: Tensor,
                      allowed: Tensor, memory: Memory, reads: list[Read], memory_from: int = 0) -> Tensor:
        """Recompute the memory heads of ``layer`` with local and retrieved entries in one softmax.

        ``q`` are the rotated queries, ``q0`` the same before rotation, ``h`` the block's input,
        ``allowed`` ``(T, S)`` the local keys each position may read; positions before
        ``memory_from`` keep their local attention (``a``).
        """
        cfg, mp = self.cfg, self.memory
        B, _, T, D = q.shape
        F0 = memory_from
        cos_d, sin_d = self._fixed_rotation(q.dtype)
        out = a.clone()
        allowed = allowed[F0:]  # the rows of the positions that read memory
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for m, head, slot in self._mem_at[layer]:
            by_slot.setdefault(slot, []).append((m, head))
        for slot, members in by_slot.items():
            ms = [m for m, _ in members]
            hs = [hd for _, hd in members]
            kvh = hs[0] // cfg.group
            q_local = q[:, hs, F0:]  # (B, G, T', D), rotated
            # the memory query: the unrotated query (+ adapter), rotated to the fixed distance
            q_raw = q0[:, hs, F0:]
            if mp.up is not None:
                q_raw = q_raw + torch.einsum("btc,gcr,grd->bgtd", h[:, F0:], mp.down[ms].to(h.dtype),
                                             mp.up[ms].to(h.dtype))
            q_mem = rotary(q_raw, cos_d, sin_d)
            got = memory.search(slot, q_mem.detach(), cfg.knn_k)
            scale = 1.0 / math.sqrt(D)
            local = torch.einsum("bgtd,bsd->bgts", q_local, k[:, kvh]) * scale
            local = local.masked_fill(~allowed, float("-inf"))
            mem = torch.einsum("bgtd,bgtkd->bgtk", q_mem, got.keys.to(q.dtype)) * scale
            mem = mem + mp.bias[ms].view(1, -1, 1, 1).to(mem.dtype)
            mem = mem.masked_fill(~got.mask, float("-inf"))
            w = torch.softmax(torch.cat((local, mem), dim=-1).float(), dim=-1).to(q.dtype)
            S = local.shape[-1]
            read = torch.einsum("bgtk,bgtkd->bgtd", w[..., S:], got.values.to(q.dtype))
            if mp.value_up is not None:
                # the value adapter is linear, so adapting the weighted sum of the entries' values
                # equals summing adapted values, at 1/k of the cost
                read = read + torch.einsum("bgtd,gdr,gre->bgte", read, mp.value_down[ms].to(q.dtype),
                                           mp.value_up[ms].to(q.dtype))
            o = w[..., :S] @ v[:, kvh].unsqueeze(1) + read
            out[:, hs, F0:] = o
            for g, m in enumerate(ms):
                reads.append(Read(m, _pad(w[:, g, :, S:], F0, 0), _pad(got.tokens[:, g], F0, -1),
                                  _pad(got.source[:, g], F0, -1)))
        reads.sort(key=lambda r: r.head)
        return out

    def _fixed_rotation(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rotation of a memory query (``mem_distance`` back), computed once per precision."""
        device = self.embed.weight.device
        got = self._fixed.get((dtype, device))
        if got is None:
            cos, sin = self._angles(torch.tensor([self.cfg.mem_distance], device=device))
            got = self._fixed[(dtype, device)] = (cos[0].to(dtype), sin[0].to(dtype))
        return got

    def mix_copy(self, logp: Tensor, reads: list[Read], last_only: bool, h: Tensor | None = None) -> Tensor:
        """log((1 - g) p_model + g p_copy): p_copy puts each memory head's attention on the tokens
        of the entries it read; g grows with the share of attention that went to the memory
        (and, with ``copy_context``, with a linear read of ``h``, the final hidden states).

        p_copy is zero but for the few hundred tokens read at a position, where the mix is
        log(1 - g) + log p_model; only those cells are computed one by one.  (Mixing the whole
        vocabulary densely cost 46 ms of a 400 ms forward pass over 128 positions.)
        """
        B, T, V = logp.shape
        weights = torch.stack([r.weights[:, -1:] if last_only else r.weights for r in reads]).float()  # (M,B,T,k)
        tokens = torch.stack([r.tokens[:, -1:] if last_only else r.tokens for r in reads])
        share = weights.sum(-1).mean(0)  # (B, T): mean memory share over memory heads
        flat_w = weights.permute(1, 2, 0, 3).flatten(2)  # (B, T, M*k)
        flat_t = tokens.permute(1, 2, 0, 3).flatten(2).clamp(min=0)
        total = flat_w.sum(-1)  # (B, T)
        gate = self.memory.copy_gate
        if self.memory.copy_proj is not None:  # h is required then
            # scaled so that the read moves as slowly as an adapter's weights while it trains
            gate = gate + h.float() @ self.memory.copy_proj.float() / math.sqrt(h.shape[-1])  # (B, T)
        g = torch.sigmoid(gate) * share * (total > 0)
        out = logp + torch.log1p(-g).unsqueeze(-1)
        # the (position, token) cells the memory read, each once, with the attention they got
        rows = torch.arange(B * T, device=logp.device).view(B, T, 1)
        cells, slot = torch.unique((rows * V + flat_t).flatten(), return_inverse=True)
        mass = torch.zeros(len(cells), device=logp.device).index_add(0, slot, flat_w.flatten())
        row = torch.div(cells, V, rounding_mode="floor")
        g_at, total_at = g.flatten()[row], total.flatten()[row]
        mixed = (1 - g_at) * logp.flatten()[cells].exp() + g_at * mass / total_at.clamp(min=1e-9)
        out.view(-1)[cells] = torch.log(mixed.clamp(min=1e-30))
        return out

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode(self, idx: Tensor, *, prefix: Prefix | None = None, rows: Tensor | None = None,
               pause: Callable[[], None] | None = None) -> Entries:
        """Memory entries of ``idx`` ``(B, T)``: only the blocks up to the last memory layer run.

        ``prefix``/``rows``: row b is read after context ``rows[b]`` of ``prefix`` (what
        ``read_prefix`` returned), as if that context were in front of it; entries are those
        of ``idx`` alone.  Chunks of one file share their context, so it is read once.
        ``pause``: called before each block, where a server lets waiting completions run first.
        """
        B, T = idx.shape
        mask = None
        if prefix is not None:
            W = prefix.valid.shape[1]
            mask = torch.cat((prefix.valid[rows][:, None, None, :].expand(B, 1, T, W),
                              self._mask(T, 0, idx.device).expand(B, 1, T, T)), dim=-1)
        keys, values, _ = self._encode_blocks(self.embed(idx), self.cfg.encode_layers, mask,
                                              prefix.kv if prefix is not None else None, rows, pause)
        return Entries(torch.stack(keys, 1), torch.stack(values, 1))

    @torch.no_grad()
    def read_prefix(self, contexts: list[list[int]], pad: int, pause: Callable[[], None] | None = None) -> Prefix:
        """Keys and values of the blocks below the last memory layer for ``contexts``, each
        right-aligned (padded on the left with ``pad``, which nothing attends to).  Rotary
        attention depends only on distances, so a context read at shifted positions is the
        same context."""
        W = max(len(c) for c in contexts)
        device = self.embed.weight.device
        idx = torch.full((len(contexts), W), pad, dtype=torch.long)
        valid = torch.zeros(len(contexts), W, dtype=torch.bool)
        for r, c in enumerate(contexts):
            idx[r, W - len(c) :] = torch.tensor(c, dtype=torch.long)
            valid[r, W - len(c) :] = True
        idx, valid = idx.to(device), valid.to(device)
        # padding attends to itself only (a row with no key would be NaN); no real token sees it
        mask = (valid[:, None, None, :] & self._mask(W, 0, device)) | torch.eye(W, dtype=torch.bool, device=device)
        _, _, kv = self._encode_blocks(self.embed(idx), self.cfg.encode_layers - 1, mask, None, None, pause)
        return Prefix(kv, valid)

    def _encode_blocks(self, x: Tensor, upto: int, mask: Tensor | None, past: list[KV] | None,
                       rows: Tensor | None, pause: Callable[[], None] | None = None,
                       ) -> tuple[list[Tensor], list[Tensor], list[KV]]:
        """Blocks below ``upto`` on ``x`` (read after ``past[i][rows]`` if given): the memory
        key/value heads' keys and values (unrotated) and each block's rotated keys and values.
        The last memory layer only projects: its keys and values are all the memory needs."""
        cfg = self.cfg
        H, Hkv = cfg.n_head, cfg.n_kv_head
        B, T, _ = x.shape
        cos, sin = self._rope(past[0].keys.shape[2] if past else 0, T, x.dtype)
        keys, values, kv = [], [], []
        for i in range(upto):
            if pause is not None:
                pause()
            block = self.blocks[i]
            qkv = block.attn.project(block.ln1(x))
            for layer, kvh in cfg.memory_kv_heads:
                if layer == i:
                    keys.append(qkv[:, H + kvh])
                    values.append(qkv[:, H + Hkv + kvh])
            if i == cfg.encode_layers - 1:
                break
            qk = rotary(qkv[:, : H + Hkv], cos, sin)
            k, v = qk[:, H:], qkv[:, H + Hkv :]
            kv.append(KV(k, v))
            if past:
                k = torch.cat((past[i].keys[rows], k), dim=2)
                v = torch.cat((past[i].values[rows], v), dim=2)
            a = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=cfg.group > 1)
            x = x + block.attn.o_proj(a.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.ln2(x))
        return keys, values, kv


def _pad(x: Tensor, n: int, value: float) -> Tensor:
    """``x`` ``(B, T', k)`` preceded by ``n`` positions filled with ``value`` along T."""
    if not n:
        return x
    return torch.cat((torch.full((x.shape[0], n, *x.shape[2:]), value, dtype=x.dtype, device=x.device), x), dim=1)

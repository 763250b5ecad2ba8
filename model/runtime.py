"""Where and in what precision the model runs.

- **GPU**: bfloat16 throughout (half the memory traffic, tensor cores).
- **CPU**: every linear layer (the output head included) holds its weights twice: in the
  *product precision* for reading many tokens at once (prompts, encoding, the candidate trie),
  and in 4 bits (where the base's weights already are: ``CpuLinear``) or int8 per output channel
  for one or a few tokens (decoding: bound by memory traffic, so the weights' size is the cost).
  The product precision is bfloat16 where this CPU multiplies bfloat16 faster than float32
  (AVX-512 BF16, AMX), float32 elsewhere: measured once per process, since on a CPU without
  bfloat16 arithmetic (AVX2 only) oneDNN emulates it and a 512-row bfloat16 product took 7.5x as
  long as float32.  Activations, embeddings, norms and the memory heads' own parameters are in
  the product precision; attention is float32.  Measured figures, and the bits-per-token cost of
  each precision, are in ``docs/model.md``.  (Dynamic int8 quantization of the activations as
  well was measured too: it costs 64% more bits per token on this base, whose activations have
  large outliers.)
- **int8 encoding** (``int8_encoding``, inside ``encoding()`` only): int8 products with int8
  activations, each token's activations quantized with their own scale after a per-channel
  smoothing that moves the activations' outlier channels into the weights (SmoothQuant, alpha
  0.5), calibrated once per base on standard-library code.  A memory encoded so reads +0.3% bits
  per token (+0.6% on cross-file names) on flask; one scale per tensor lost half the memory's
  gain (7-bit) or all of it (8-bit).  Chosen only where the product is at least twice as fast as
  the product precision: on an AVX2 EPYC the product alone was 1.0-1.9x faster depending on the
  VM's phase, the Encoder 1.28x in one A/B, but whole indexing 5-20% slower (the per-token
  scaling reads and writes every activation again), so there it stays off unless ``MTLSP_CPU_ENCODING=int8``.  Prompts
  and decoding never use it.

Training needs gradients through the frozen layers, so it uses the float32 model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import MemorizingTransformer

FEW_ROWS = 16  # up to this many rows (tokens) a product uses the 4-bit or int8 weights
PRECISION_ENV = "MTLSP_CPU_PRECISION"  # "bfloat16" or "float32" overrides the measurement
_BF16_GAIN = 1.2  # bfloat16 products must be this much faster to be chosen
ENCODING_ENV = "MTLSP_CPU_ENCODING"  # "int8" or "float" overrides the measurement
_INT8_GAIN = 2.0  # int8 encoding products must be this much faster to be chosen (see above)
_SMOOTHING_ALPHA = 0.5  # SmoothQuant's split of the outliers between activations and weights
_CALIBRATION_TOKENS = 2048
MAXIMA_FILE = "activation_maxima.pt"  # kept next to a base's conversion: the maxima depend on it alone
_local = threading.local()  # per thread: inside ``encoding()``; the activation maxima being recorded


@functools.cache
def cpu_product_dtype() -> torch.dtype:
    """The precision of this CPU's many-row matrix products: bfloat16 only where it is faster.

    Measured rather than read off the CPU's flags, because what matters is whether the
    installed torch has a fast kernel for it here: on the dev VM with AVX-512 BF16 bfloat16 was
    about 1.7x faster than float32 for a prompt; on an AVX2-only EPYC it was 7.5x slower.  The
    measurement is a decoder-sized product (256 x 576 by 576 x 1536), best of three: 0.16 s once
    per process on the AVX2 EPYC.
    """
    forced = os.environ.get(PRECISION_ENV, "").strip().lower()
    if forced in ("bfloat16", "bf16"):
        return torch.bfloat16
    if forced in ("float32", "fp32"):
        return torch.float32
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    return torch.bfloat16 if _seconds(x.bfloat16(), w.bfloat16()) * _BF16_GAIN < _seconds(x, w) else torch.float32


def _seconds(x: Tensor, w: Tensor) -> float:
    return _best_of(lambda: F.linear(x, w))


class CpuLinear(nn.Module):
    """A frozen linear layer for CPU inference: ``dtype`` weights for many rows, 4 or 8 bits for few.

    Few rows (decoding) are bound by reading the weights, so their size is the cost.  Where the
    weights already lie on a 4-bit grid in groups of 32 along the input (the shipped base comes
    from a Q4_1 GGUF: every block linear does), the int4 product reproduces them up to its
    bfloat16 scales and takes half the traffic of int8: 120 decoder-sized products of one row
    took 12 ms against 20 ms in int8 on an AVX2 EPYC.  Other weights (the embedding, another
    base) get int8 per output channel.  Both kernels take bfloat16 activations (with float32
    ones the int8 product was 5-30x slower), so few rows are converted to bfloat16 and back.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, four_bits: bool = True) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.register_buffer("w", w.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        # not buffers: ``model.to(dtype)`` must not cast them, the kernels want bfloat16 scales
        grid = four_bit_grid(w) if four_bits else None
        self.packed4 = grid is not None  # decided once: the decoding step asks 121 times
        if grid is not None:
            q, scales_and_zeros = grid
            self.register_buffer("w4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        else:
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.register_buffer("w8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
            self.scales = scales.to(torch.bfloat16)
        self.packed8 = None  # int8 weights for encoding (``quantize_for_encoding``)
        self.unsmooth: Tensor | None = None

    def quantize_for_encoding(self, activation_max: Tensor) -> None:
        """int8 products for many rows inside ``encoding()``: the weights are multiplied by a
        per-input-channel smoothing ``s`` (activations are divided by it), then kept in int8
        per output channel."""
        w = self.w.float()
        s = (activation_max.float().clamp(min=1e-5) ** _SMOOTHING_ALPHA
             / w.abs().amax(0).clamp(min=1e-5) ** (1 - _SMOOTHING_ALPHA)).clamp(min=1e-5)
        self.packed8 = _pack_int8(w * s)
        self.unsmooth = 1.0 / s

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.w.dtype)
        rows = x.numel() // x.shape[-1]
        if rows > FEW_ROWS:
            record = getattr(_local, "record", None)
            if record is not None:
                seen = x.detach().float().reshape(rows, -1).abs().amax(0)
                record[self] = torch.maximum(record[self], seen) if self in record else seen
            elif self.packed8 is not None and getattr(_local, "encoding", False):
                return self._int8(x, rows)
            return F.linear(x, self.w, self.bias)
        flat = x.reshape(rows, -1).to(torch.bfloat16)
        if self.packed4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.w4, GROUP, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.w8, self.scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _int8(self, x: Tensor, rows: int) -> Tensor:
        flat = x.float().reshape(rows, -1) * self.unsmooth
        # one scale per token: dividing each row by its largest value makes the kernel's single
        # (per-tensor) activation scale a per-token one; reduce_range avoids its int16 overflow
        peak = flat.abs().amax(-1, keepdim=True).clamp(min=1e-8)
        y = torch.ops.quantized.linear_dynamic(flat / peak, self.packed8, True) * peak
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _pack_int8(w: Tensor):
    """``w`` (out, in) as the quantized engine's packed int8 weights, one scale per output row."""
    scales = (w.abs().amax(1).clamp(min=1e-12) / 127).double()
    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; the kernel is its fastest here
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w.contiguous(), scales, torch.zeros(w.shape[0], dtype=torch.long), 0,
                                       torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


@contextlib.contextmanager
def encoding() -> Iterator[None]:
    """Products on this thread read text into the memory: int8 where ``int8_encoding`` set it up."""
    before = getattr(_local, "encoding", False)
    _local.encoding = True
    try:
        yield
    finally:
        _local.encoding = before


@functools.cache
def int8_encoding_faster() -> bool:
    """Whether int8 encoding products (per-token scales included) beat this CPU's product
    precision by ``_INT8_GAIN``, on an encoder-sized product; False where the quantized kernels
    are missing.  ``MTLSP_CPU_ENCODING`` overrides.  The margin is wide because the rest of
    encoding (attention, norms, the scaling itself) does not speed up: on an AVX2 EPYC a product
    1.0-1.9x faster made whole indexing no faster."""
    forced = os.environ.get(ENCODING_ENV, "").strip().lower()
    if forced in ("int8", "float"):
        return forced == "int8"
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen)
    probe = CpuLinear(nn.Linear(576, 1536, bias=False), cpu_product_dtype(), four_bits=False)
    probe.w = w.to(probe.w.dtype)
    x = torch.randn(1024, 576, generator=gen).to(probe.w.dtype)
    try:
        probe.quantize_for_encoding(x.float().abs().amax(0))
        with encoding():
            int8 = _best_of(lambda: probe(x))
    except (RuntimeError, AttributeError, NotImplementedError):  # no quantized engine in this torch
        return False
    return int8 * _INT8_GAIN < _best_of(lambda: probe(x))


def _best_of(f) -> float:
    f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def calibration_text() -> str:
    """Code to measure activations on: modules of this Python's standard library, present
    wherever mtlsp runs and never a user's project."""
    lib = Path(os.__file__).parent
    parts = []
    for name in ("textwrap.py", "json/decoder.py", "shlex.py", "dataclasses.py"):
        f = lib / name
        if f.is_file():
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def int8_encoding(model: MemorizingTransformer, tok, base_folder: str | Path | None = None) -> bool:
    """Set ``model`` (made ``for_inference``) to encode with int8 products where it runs on the
    CPU and that is faster (``int8_encoding_faster``); returns whether it did."""
    if next(model.parameters()).device.type != "cpu" or not int8_encoding_faster():
        return False
    quantize_encoding(model, tok, base_folder)
    return True


def quantize_encoding(model: MemorizingTransformer, tok, base_folder: str | Path | None = None) -> None:
    """Give ``model``'s products int8 weights for ``encoding()``, whatever this CPU prefers.

    The smoothing needs each product's largest activation per input channel: measured once per
    base by encoding ``calibration_text`` (a few seconds) and kept in the base's folder as
    ``MAXIMA_FILE`` where one is given (a damaged file is measured again).
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}
    cache = Path(base_folder) / MAXIMA_FILE if base_folder else None
    maxima = None
    if cache is not None and cache.is_file():
        try:
            maxima = torch.load(cache, weights_only=True)
        except Exception as e:  # a damaged cache is measured again
            print(f"mtlsp: ignoring unreadable activation maxima {cache}: {e}", file=sys.stderr)
    if not isinstance(maxima, dict) or not all(isinstance(v, Tensor) for v in maxima.values()):
        maxima = _activation_maxima(model, tok, linears)
        if cache is not None:  # written whole or not at all; where it cannot be, measured next time
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            try:
                torch.save(maxima, tmp)
                os.replace(tmp, cache)
            except OSError as e:
                print(f"mtlsp: could not keep activation maxima in {cache}: {e}", file=sys.stderr)
    for name, m in linears.items():
        if name in maxima and maxima[name].shape == (m.w.shape[1],):
            m.quantize_for_encoding(maxima[name])


@torch.no_grad()
def _activation_maxima(model: MemorizingTransformer, tok, linears: dict[str, CpuLinear]) -> dict[str, Tensor]:
    ids = tok.encode(calibration_text())[:_CALIBRATION_TOKENS]
    rows = [ids[i : i + 512] for i in range(0, len(ids) - 511, 512)] or [ids]
    record: dict[CpuLinear, Tensor] = {}
    _local.record = record
    try:
        for r in rows:
            model.encode(torch.tensor([r]))
    finally:
        _local.record = None
    names = {m: n for n, m in linears.items()}
    return {names[m]: v for m, v in record.items()}


GROUP = 32  # the int4 product's group along the input: Q4_0/Q4_1's block


def four_bit_grid(w: Tensor) -> tuple[Tensor, Tensor] | None:
    """``w`` (out, in) as 4-bit levels q (int32) and per-group (scale, zero) such that
    w = (q - 8) * scale + zero, in the layout of torch's int4 product; None unless that is exact
    (to 1e-5 of the group's range): requantizing weights that were not 4-bit would cost bits."""
    out, inp = w.shape
    if inp % GROUP:
        return None
    g = w.view(out, inp // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15)
    if ((q * scale[..., None] + low[..., None] - g).abs() > 1e-5 * (high - low)[..., None] + 1e-12).any():
        return None
    scales_and_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).contiguous()  # (in/32, out, 2)
    return q.view(out, inp).to(torch.int32), scales_and_zeros


class CpuRMSNorm(nn.Module):
    """RMSNorm in four operations, computed in float32: torch's own runs about twice as many for
    a single row (38 against 17 µs on the dev machine), and a decoding step normalizes 61 times."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.register_buffer("weight", norm.weight.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        scale = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True).add_(self.eps))
        return (xf * scale).mul_(self.weight).to(x.dtype)


def for_inference(model: MemorizingTransformer, device: torch.device,
                  dtype: torch.dtype | None = None, four_bits: bool = True) -> MemorizingTransformer:
    """``model`` (float32, on the CPU) made ready to serve on ``device``; changes it in place.

    ``dtype`` is the CPU's product precision (default: ``cpu_product_dtype()``); ``four_bits``
    False keeps decoding in int8 even where the weights lie on a 4-bit grid (for comparison).
    """
    model.eval()
    for block in model.blocks:  # q/k/v and gate/up as one product each
        block.attn.fuse()
        block.mlp.fuse()
    if device.type != "cpu":
        return model.to(device=device, dtype=torch.bfloat16)
    if model.lm_head is None:  # the tied embedding, as an output layer of its own
        head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        head.weight = model.embed.weight
        model.lm_head = head
    dtype = dtype or cpu_product_dtype()
    if dtype == torch.float32:
        # weights kept in float32 would stay pages of the weights file's map, and one of them keeps
        # the whole file resident, fused-away weights included: owning them took 176 MB off RSS
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    model.lm_head = CpuLinear(model.lm_head, dtype, four_bits)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, CpuLinear(child, dtype, four_bits))
        block.ln1, block.ln2 = CpuRMSNorm(block.ln1), CpuRMSNorm(block.ln2)
    model.norm = CpuRMSNorm(model.norm)
    model.to(dtype)  # embeddings, norms, memory parameters; the 4-bit and int8 buffers stay integers
    model.attention_dtype = torch.float32
    return model

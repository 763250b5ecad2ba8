"""Where and in what precision the model runs.

- **GPU**: bfloat16 throughout (half the memory traffic, tensor cores).
- **CPU**: bfloat16 activations, and every linear layer (the output head included) holding its
  weights twice: bfloat16 for reading many tokens at once (prompts, encoding: oneDNN's
  bfloat16 matrix products, AVX-512 BF16 where the CPU has it) and int8 per output channel for
  one or a few tokens (decoding: bound by memory traffic, so the weights' size is the cost).
  Embeddings, norms and the memory heads' own parameters stay as they are.  Measured figures,
  and the bits-per-token cost of each precision, are in ``docs/model.md``.  (Dynamic int8
  quantization of the activations as well was measured too: it costs 64% more bits per token on
  this base, whose activations have large outliers.)

Training needs gradients through the frozen layers, so it uses the float32 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import MemorizingTransformer

FEW_ROWS = 16  # up to this many rows (tokens) a product uses the int8 weights


class CpuLinear(nn.Module):
    """A frozen linear layer for CPU inference: bfloat16 weights for many rows, int8 for few."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("w16", w.to(torch.bfloat16))
        self.register_buffer("w8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.bfloat16)
        rows = x.numel() // x.shape[-1]
        if rows <= FEW_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), self.w8, self.scales)
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.w16, self.bias)


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


def for_inference(model: MemorizingTransformer, device: torch.device) -> MemorizingTransformer:
    """``model`` (float32, on the CPU) made ready to serve on ``device``; changes it in place."""
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
    model.lm_head = CpuLinear(model.lm_head)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, CpuLinear(child))
        block.ln1, block.ln2 = CpuRMSNorm(block.ln1), CpuRMSNorm(block.ln2)
    model.norm = CpuRMSNorm(model.norm)
    model.to(torch.bfloat16)  # embeddings, norms, memory parameters; the int8 buffers stay int8
    model.attention_dtype = torch.float32
    return model

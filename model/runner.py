"""Segment after segment through the model, carrying each slot's XL cache and memory along.

Training and evaluation share this loop so that both treat document boundaries the same way:
a slot whose document starts in this segment has its memory cleared and its cache masked, the
memory is searched during the forward pass, and only then are the segment's own entries added.
"""

from __future__ import annotations

import torch
from torch import nn

from .memory import TensorMemory
from .model import KV, MemorizingTransformer, Output
from .stream import Batch


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPUs here lack fast bf16)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def new_memory(model: MemorizingTransformer, batch: int, capacity: int, device) -> TensorMemory:
    """A training/evaluation memory shaped for ``model``: bf16 on CUDA, fp32 on CPU."""
    cfg = model.cfg
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TensorMemory(batch, capacity, cfg.mem_kv_heads, cfg.head_dim, device=device, dtype=dtype)


class SegmentRunner:
    def __init__(self, model: MemorizingTransformer, pad_id: int, batch: int, capacity: int = 0) -> None:
        self.model = model
        self.pad_id = pad_id
        self.batch = batch
        self.device = next(model.parameters()).device
        self.cache: list[KV] | None = None
        self.memory: TensorMemory | None = None
        if capacity > 0:
            self.enable_memory(capacity)

    def enable_memory(self, capacity: int) -> None:
        self.memory = new_memory(self.model, self.batch, capacity, self.device)

    def __call__(self, net: nn.Module, b: Batch, with_targets: bool = True) -> tuple[Output, torch.Tensor]:
        """Run one batch of segments through ``net`` (the model, or its DDP wrapper).

        Returns the model output and the targets on the device (-1 = no target).
        """
        x = torch.from_numpy(b.inputs).to(self.device, non_blocking=True)
        y = torch.from_numpy(b.targets).to(self.device, non_blocking=True)
        reset = torch.from_numpy(b.reset).to(self.device, non_blocking=True)
        if self.memory is not None:
            self.memory.reset(reset)
        with autocast(self.device):
            out = net(x, y if with_targets else None, memory=self.memory, cache=self.cache, reset=reset)
        self.cache = out.cache
        if self.memory is not None:
            self.memory.add(out.entries.keys, out.entries.values, valid=x != self.pad_id)
        return out, y

"""Training: batch slots stream repository-documents, each slot with its own kNN memory.

Schedule: the model trains without the memory first and switches it on for the last part
(``mem_start`` of the budget).  Why: retrieval inside the training loop costs time, and the
memory only pays once the model has learned enough to use it (measured before this project: a
model trained with memory from the start saw 5x fewer tokens in the same time and barely used
its memory).  The paper's section 4.5 shows a model fine-tuned to use memory late closes most of
the gap quickly.

Single process on CPU or one GPU; several GPUs through ``torchrun`` (DDP, one process per GPU,
documents sharded by rank, each rank with its own slots and memories).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .dataset import Dataset, load_dataset
from .evaluate import score_stream
from .fim import FimTokens
from .model import MemorizingTransformer, ModelConfig
from .runner import SegmentRunner
from .stream import SegmentStream
from .tokenizer import CodeTokenizer
from .weights import load_weights, save_weights


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 8  # slots per process; each streams its own documents
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 0  # 0: bounded by time only
    time_budget_s: float = 0.0  # 0: bounded by steps only
    mem_start: float = 0.7  # fraction of the budget after which the memory is used
    mem_capacity: int = 16384  # tokens memorised per slot
    fim_rate: float = 0.5
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 1337
    compile: bool = False

    def __post_init__(self) -> None:
        if not (self.max_steps or self.time_budget_s):
            raise ValueError("set max_steps or time_budget_s")


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # Seconds on a CPU: for tests.
    "tiny": (
        ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=32, knn_k=4),
        TrainConfig(batch=2, lr=3e-3, warmup_steps=2, max_steps=6, mem_start=0.5, mem_capacity=96,
                    eval_every=3, eval_batches=2, ckpt_every=3, log_every=1),
    ),
    # What two CPU cores can train in about 90 minutes (about 1k tokens/s).
    "cpu": (
        ModelConfig(n_layer=6, n_head=3, d_model=192, seq_len=512),
        TrainConfig(batch=6, lr=2e-3, warmup_steps=100, time_budget_s=5400, mem_start=0.65,
                    eval_every=250, eval_batches=6, ckpt_every=50),
    ),
    # The shipped model: about 8 minutes on one H100/H200, ~21M parameters (42 MB in fp16).
    "gpu": (
        ModelConfig(n_layer=8, n_head=6, d_model=384, seq_len=512),
        TrainConfig(batch=64, lr=2e-3, warmup_steps=200, time_budget_s=420, mem_start=0.7,
                    eval_every=500, eval_batches=8, ckpt_every=500, log_every=50, compile=True),
    ),
}


def lr_at(tc: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine decay to ``min_lr_frac`` over the budget's progress (0..1)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    floor = tc.lr * tc.min_lr_frac
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


class Trainer:
    def __init__(
        self,
        data_dir: Path,
        out_dir: Path,
        mc: ModelConfig,
        tc: TrainConfig,
        *,
        init_weights: Path | None = None,
    ) -> None:
        self.ddp = "RANK" in os.environ
        if self.ddp:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(tc.seed + self.rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tok = CodeTokenizer.load(self.data_dir / "tokenizer.json")
        self.mc = replace(mc, vocab_size=self.tok.vocab_size)
        self.tc = tc
        self.data: Dataset = load_dataset(self.data_dir)
        self.model = MemorizingTransformer(self.mc).to(self.device)
        if init_weights is not None:
            self._init_from(init_weights)
        if tc.compile and self.device.type == "cuda":
            for i, block in enumerate(self.model.blocks):
                if i != self.mc.memory_layer:  # retrieval does data-dependent indexing: keep eager
                    block.compile()
        self.net = self.model
        if self.ddp:
            # The gate is unused while the memory is off, hence find_unused_parameters.
            self.net = DistributedDataParallel(self.model, find_unused_parameters=True)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        other = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=tc.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda",
        )
        train_docs = self.data.spans("train")[self.rank :: self.world]
        self.fim = FimTokens(self.tok.fim_prefix, self.tok.fim_suffix, self.tok.fim_middle, self.tok.eot)
        self.stream = SegmentStream(
            self.data.tokens, train_docs, tc.batch, self.mc.seq_len, pad_id=self.tok.pad,
            fim=self.fim, fim_rate=tc.fim_rate, seed=tc.seed + self.rank,
        )
        self.step, self.elapsed = 0, 0.0
        self.runner = SegmentRunner(self.model, self.tok.pad, tc.batch)
        self.log_path = self.out_dir / "train_log.jsonl"

    def _init_from(self, path: Path) -> None:
        loaded = load_weights(path)
        if loaded.config != self.mc:
            raise ValueError(f"weights in {path} have config {loaded.config}, not {self.mc}")
        self.model.load_state_dict(loaded.model.state_dict())

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / f"ckpt_rank{self.rank}.pt"

    def save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "stream": self.stream.state_dict(),
            "model_config": self.mc.to_dict(),
            "train_config": asdict(self.tc),
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)

    def load_checkpoint(self) -> bool:
        """Resume if a checkpoint exists.  Memories and XL caches restart empty."""
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        if state["model_config"] != self.mc.to_dict():
            raise ValueError(f"{self.ckpt_path} was written for another model config")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.stream.load_state_dict(state["stream"])
        return True

    # -- the loop ----------------------------------------------------------------------------
    def progress(self) -> float:
        p = 0.0
        if self.tc.max_steps:
            p = max(p, self.step / self.tc.max_steps)
        if self.tc.time_budget_s:
            p = max(p, self.elapsed / self.tc.time_budget_s)
        if self.ddp:  # every rank must agree on when to switch phases and stop
            t = torch.tensor([p], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            p = t.item()
        return p

    def log(self, record: dict) -> None:
        if self.rank == 0:
            print(json.dumps(record), flush=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self) -> dict:
        tc = self.tc
        resumed = self.load_checkpoint()
        self.log({"event": "start", "resumed": resumed, "step": self.step, "params": self.model.num_params(),
                  "hardware": hardware(), "model": self.mc.to_dict(), "train": asdict(tc)})
        phase_tokens = {"off": [0, 0.0], "on": [0, 0.0]}  # tokens, seconds per memory phase
        while (progress := self.progress()) < 1.0:
            if progress >= tc.mem_start and self.runner.memory is None:
                self.runner.enable_memory(tc.mem_capacity)
                self.log({"event": "memory_on", "step": self.step})
            t0 = time.perf_counter()
            lr = lr_at(tc, self.step, progress)
            for group in self.opt.param_groups:
                group["lr"] = lr
            b = self.stream.next_batch()
            out, _ = self.runner(self.net, b)
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            tokens = int((b.targets >= 0).sum()) * self.world
            if self.step % tc.log_every == 0:
                loss = out.loss.item()  # waits for the GPU, so only on logging steps
            dt = time.perf_counter() - t0
            self.elapsed += dt
            phase = phase_tokens["on" if self.runner.memory is not None else "off"]
            phase[0] += tokens
            phase[1] += dt
            if self.step % tc.log_every == 0:
                gate = torch.sigmoid(self.model.memory_attention.gate).mean().item()
                self.log({"step": self.step, "loss": round(loss, 4), "lr": lr, "grad_norm": round(norm.item(), 3),
                          "tok_per_s": round(tokens / dt), "elapsed": round(self.elapsed, 1),
                          "memory": self.runner.memory is not None, "gate": round(gate, 4)})
            if self.step % tc.eval_every == 0:
                self.log({"step": self.step, **self.validate()})
            if self.step % tc.ckpt_every == 0:
                self.save_checkpoint()
        self.save_checkpoint()
        summary = {
            "steps": self.step,
            "wall_time_s": round(self.elapsed, 1),
            "tokens_seen": self.stream.tokens_read * self.world,
            "tokens_per_s": {k: round(v[0] / v[1]) if v[1] else None for k, v in phase_tokens.items()},
            "hardware": hardware(),
            "params": self.model.num_params(),
            "val": self.validate(),
        }
        self.log({"event": "done", **summary})
        if self.rank == 0:
            save_weights(self.model, self.tok, self.out_dir / "weights", info={"training": summary})
            manifest = self.data_dir / "manifest.json"
            (self.out_dir / "weights" / "corpus_manifest.json").write_bytes(manifest.read_bytes())
        if self.ddp:
            dist.destroy_process_group()
        return summary

    def validate(self) -> dict:
        """Bits per token on held-out documents, memory off and on (same segments)."""
        self.model.eval()
        result = {}
        docs = self.data.spans("val") or self.data.spans("train")[:1]
        for name, capacity in (("val_bits_nomem", 0), ("val_bits_mem", self.tc.mem_capacity)):
            stream = SegmentStream(self.data.tokens, docs, self.tc.batch, self.mc.seq_len,
                                   pad_id=self.tok.pad, seed=0, loop=False)
            score = score_stream(self.model, stream, capacity, max_batches=self.tc.eval_batches)
            result[name] = round(score.bits_per_token, 4)
        self.model.train()
        return result

"""Teach the memory heads to find in the memory what they would find in the prompt.

Context-to-memory distillation, on a frozen base:

- **teacher**: the base reading a window of a file *after* the most related chunk of another
  file of the same project (most shared identifiers), i.e. with the evidence in its prompt;
- **student**: the memorizing model reading the window alone, with every other file of the
  project in its memory (the window's own file hidden);
- **loss**: KL(teacher ‖ student) on the window's tokens, plus ``lm_weight`` × the ordinary
  next-token loss, so the student copies what the context made likely and stays a language model.

Only ``model.memory`` is trained (per-head logit bias, low-rank query adapter, copy gate): a
few tens of thousands of parameters, which is what two CPU cores can train in an hour or two.

What makes that affordable:
- the memory entries depend only on the frozen base, so each project is encoded once;
- the teacher never changes, so its distributions are computed once (top ``teacher_k`` tokens);
- the layers below the first memory layer never read the memory, so their output is cached and
  each step runs only the layers from the first memory layer up.

``prepare`` writes those caches into the run folder; ``train`` reads them, checkpoints every
``ckpt_every`` steps and resumes from the last checkpoint when run again.  On a GPU the same
recipe runs with more projects and steps (``--device cuda``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .corpus import Document
from .evaluate import stuffing
from .memory import TensorMemory
from .model import MemorizingTransformer
from .projects import SourceFile, cross_file_mask, defined_names, encode_memory, tokenize_files, top_level_chunks
from .runtime import cpu_product_dtype
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
    window: int = 256  # student tokens per example (after the file header)
    stuff_tokens: int = 384  # the teacher's related chunk, at most
    teacher_k: int = 64  # teacher tokens kept per position (the rest of its mass is dropped)
    examples: int = 2000
    min_cross: int = 4  # an example's window holds at least this many cross-file identifier tokens
    project_min_tokens: int = 3000
    project_max_tokens: int = 40000
    max_projects: int = 60  # projects encoded into memories (each costs its tokens, once)
    steps: int = 2000
    accumulate: int = 4  # windows per optimizer step
    lr: float = 2e-3  # adapters; the per-head biases and the copy gate move 10x faster
    kl_weight: float = 0.0  # 0: no teacher (see the module docstring for why that is the default)
    lm_weight: float = 1.0
    cross_weight: float = 1.0  # next-token loss weight of cross-file identifier tokens (the memory's job)
    ckpt_every: int = 100
    seed: int = 0
    held_out: float = 0.05  # share of projects kept out of training, to watch the loss


# ------------------------------------------------------------------------------ projects


def projects_of(doc: Document, tok: Tokenizer, cfg: TrainConfig) -> list[list[tuple[str, str]]]:
    """Split a repository-document into projects: directory subtrees of a workable size.

    A project is the memory of its own files, so it should be code that belongs together (one
    package or subpackage) and small enough to encode quickly; a big document (``torch``) is
    split at its directories until each part fits ``project_max_tokens``.
    """
    sizes = {f.path: len(f.text) // 3 for f in doc.files}  # ~3 bytes per token for code
    files = {f.path: f.text for f in doc.files}

    def split(paths: list[str], depth: int) -> list[list[str]]:
        total = sum(sizes[p] for p in paths)
        if total <= cfg.project_max_tokens:
            return [paths] if total >= cfg.project_min_tokens and len(paths) >= 3 else []
        groups: dict[str, list[str]] = {}
        for p in paths:
            parts = p.split("/")
            groups.setdefault("/".join(parts[: depth + 1]) if len(parts) > depth + 1 else "", []).append(p)
        if len(groups) == 1 and "" not in groups:
            return split(paths, depth + 1)
        out = []
        for key, members in groups.items():
            if key == "":  # files directly in this folder: a project of their own if they fit
                members = sorted(members, key=lambda p: sizes[p])
                while members and sum(sizes[p] for p in members) > cfg.project_max_tokens:
                    members.pop()
                out += [members] if sum(sizes[p] for p in members) >= cfg.project_min_tokens and len(members) >= 3 else []
            else:
                out += split(members, depth + 1)
        return out

    return [[(p, files[p]) for p in group] for group in split(sorted(files), 0)]


# ------------------------------------------------------------------------------ preparing


@dataclass
class Example:
    project: int
    file: int
    ids: list[int]  # header + window
    first: int  # where the window's tokens start
    cross_at: list[int]  # where its cross-file identifier tokens are, in the window

    @property
    def cross(self) -> int:
        return len(self.cross_at)


def choose_examples(tok: Tokenizer, projects: list[list[SourceFile]], cfg: TrainConfig, rng: random.Random,
                    ) -> list[Example]:
    """Windows rich in names defined elsewhere in their project: where the memory has a job."""
    candidates: list[Example] = []
    for pi, files in enumerate(projects):
        defined = [defined_names(f.text) for f in files]
        for fi, f in enumerate(files):
            foreign = set().union(*(d for j, d in enumerate(defined) if j != fi))
            cross = cross_file_mask(tok, f, foreign)
            for a in range(f.first, max(f.first + 1, len(f.ids) - cfg.window // 2), cfg.window):
                b = min(len(f.ids), a + cfg.window)
                at = [int(j) for j in cross[a:b].nonzero()[0]]
                if len(at) >= cfg.min_cross and b - a >= 32:
                    candidates.append(Example(pi, fi, f.ids[: f.first] + f.ids[a:b], f.first, at))
    rng.shuffle(candidates)
    return candidates[: cfg.examples]


@torch.no_grad()
def prepare(model: MemorizingTransformer, tok: Tokenizer, docs: list[Document], out: Path, cfg: TrainConfig,
            log: Callable[[str], None] = print) -> dict:
    """Write the caches ``train`` reads: project memories, student inputs, teacher targets."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    rng = random.Random(cfg.seed)
    raw = [p for d in docs for p in projects_of(d, tok, cfg)]
    rng.shuffle(raw)
    raw = raw[: cfg.max_projects]
    projects = [tokenize_files(tok, p) for p in raw]
    examples = choose_examples(tok, projects, cfg, rng)
    used = sorted({e.project for e in examples})
    log(f"{len(raw)} projects, {len(examples)} examples from {len(used)} of them")
    first = min(layer for layer, _ in model.cfg.memory_heads)
    t0 = time.time()
    memories: dict[int, dict] = {}
    for n, pi in enumerate(used):
        mem = encode_memory(model, tok, projects[pi])
        memories[pi] = {"keys": mem.keys, "values": mem.values, "tokens": mem.tokens, "files": mem.files}
        if n % 10 == 0:
            log(f"encoded {n + 1}/{len(used)} project memories ({time.time() - t0:.0f} s)")
    torch.save(memories, out / "memories.pt")
    chunks = {pi: [top_level_chunks(f.path, f.text) for f in projects[pi]] for pi in used}
    hidden, targets, rows = [], [], []
    for n, e in enumerate(examples):
        prefix: list[int] = []
        if cfg.kl_weight:  # the teacher: the window read after the most related chunks
            others = [c for j, cs in enumerate(chunks[e.project]) if j != e.file for c in cs]
            prefix = stuffing(tok, tok.decode(e.ids[e.first :]), others, cfg.stuff_tokens)
            logp = model(torch.tensor([prefix + e.ids])).logits[0, len(prefix) + e.first - 1 : -1]
            top = logp.topk(cfg.teacher_k, dim=-1)
            targets.append((top.values.to(torch.float16), top.indices.to(torch.int32)))
        hidden.append(model.hidden_at(torch.tensor([e.ids]), first)[0].to(torch.bfloat16))
        rows.append({"project": e.project, "file": e.file, "ids": e.ids, "first": e.first, "cross": e.cross,
                     "cross_at": e.cross_at, "teacher_prefix": len(prefix)})
        if n % 100 == 0:
            log(f"example {n + 1}/{len(examples)} ({time.time() - t0:.0f} s)")
    torch.save({"hidden": hidden, "targets": targets}, out / "examples.pt")
    meta = {"config": asdict(cfg), "projects": [[p for p, _ in raw[pi]] for pi in used], "examples": rows,
            "project_ids": used, "first_memory_layer": first, "seconds": time.time() - t0}
    (out / "examples.json").write_text(json.dumps(meta))
    done.write_text(json.dumps({"examples": len(rows), "projects": len(used), "seconds": meta["seconds"]}))
    return json.loads(done.read_text())


# ------------------------------------------------------------------------------ training


def distill_loss(logp: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor] | None, ids: torch.Tensor,
                 kl_weight: float, lm_weight: float, weights: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kl_weight`` × KL(teacher ‖ student) over the teacher's top tokens (renormalised) +
    ``lm_weight`` × NLL.  ``logp`` (T, V) student log-probabilities predicting ``ids`` (T,);
    ``weights`` (T,) weigh the NLL's tokens (a weighted mean); returns (loss, kl, plain mean NLL)."""
    token_nll = -logp.gather(-1, ids[:, None])[:, 0]
    nll = token_nll.mean()
    fit = nll if weights is None else (token_nll * weights).sum() / weights.sum()
    kl = torch.zeros(())
    if targets is not None and kl_weight:
        values, indices = targets
        t = torch.log_softmax(values.float(), dim=-1)
        kl = (t.exp() * (t - logp.gather(-1, indices.long()))).sum(-1).mean()
    return kl_weight * kl + lm_weight * fit, kl, nll


class Trainer:
    def __init__(self, model: MemorizingTransformer, run: Path, cfg: TrainConfig, log: Callable[[str], None] = print,
                 ) -> None:
        self.model, self.run, self.cfg, self.log = model, run, cfg, log
        meta = json.loads((run / "examples.json").read_text())
        self.rows = meta["examples"]
        if cfg.cross_weight != 1.0 and any("cross_at" not in r for r in self.rows):
            raise SystemExit(f"{run} was prepared before examples recorded their cross-file tokens; "
                             "--cross-weight needs a new run folder")
        self.first = meta["first_memory_layer"]
        data = torch.load(run / "examples.pt")
        self.hidden, self.targets = data["hidden"], data["targets"]
        self.memories = {pi: TensorMemory(m["keys"], m["values"], m["tokens"], m["files"])
                         for pi, m in torch.load(run / "memories.pt").items()}
        # whole projects are held out: the loss on them says whether the heads learned to use a
        # memory in general, not this project's memory
        projects = sorted({r["project"] for r in self.rows})
        held_projects = set(projects[: min(len(projects) - 1, max(1, round(len(projects) * cfg.held_out)))])
        self.held = [i for i, r in enumerate(self.rows) if r["project"] in held_projects][:60]
        self.train_ids = [i for i, r in enumerate(self.rows) if r["project"] not in held_projects]
        for p in model.parameters():
            p.requires_grad_(False)
        self.params = list(model.memory.parameters())
        for p in self.params:
            p.requires_grad_(True)
        # the per-head biases and the copy gate's constant move faster than the weights
        fast = {"bias", "copy_gate"}
        scalars = [p for n, p in model.memory.named_parameters() if n in fast]
        matrices = [p for n, p in model.memory.named_parameters() if n not in fast]
        self.opt = torch.optim.Adam([{"params": matrices, "scale": 1.0}, {"params": scalars, "scale": 10.0}], lr=cfg.lr)
        # bfloat16 products where this CPU has fast ones (2 cores go further); float32 elsewhere
        self.autocast = model.embed.weight.device.type == "cpu" and cpu_product_dtype() == torch.bfloat16
        self.step = 0
        self.history: list[dict] = []
        self.ckpt = run / "checkpoint.pt"
        if self.ckpt.is_file():
            state = torch.load(self.ckpt)
            model.memory.load_state_dict(state["memory"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.history = state["step"], state["history"]
            log(f"resumed at step {self.step}")

    def cross_mask(self, i: int) -> torch.Tensor:
        """Which of example ``i``'s targets are cross-file identifier tokens (what evaluation singles out)."""
        row = self.rows[i]
        mask = torch.zeros(len(row["ids"]) - row["first"], dtype=torch.bool)
        mask[row.get("cross_at", [])] = True  # caches prepared before cross_at: none marked
        return mask

    def predictions(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``i``'s log-probabilities (T, V) over its window's tokens, and those tokens (T,)."""
        row = self.rows[i]
        memory = self.memories[row["project"]]
        memory.hide([row["file"]])
        ids = torch.tensor([row["ids"]])
        device = self.model.embed.weight.device
        hidden = self.hidden[i].to(device, self.model.embed.weight.dtype)[None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(ids.to(device), memory=memory, hidden=hidden, from_layer=self.first)
        memory.hide([])
        f = row["first"]
        return out.logits[0, f - 1 : -1], ids[0, f:].to(device)

    def teacher(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The teacher's top tokens for example ``i`` (None where the run has no teacher)."""
        return self.targets[i] if self.targets else None

    def example_loss(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp, ids = self.predictions(i)
        weights = None
        if self.cfg.cross_weight != 1.0:
            weights = 1.0 + (self.cfg.cross_weight - 1.0) * self.cross_mask(i).float().to(ids.device)
        return distill_loss(logp, self.teacher(i), ids, self.cfg.kl_weight, self.cfg.lm_weight, weights)

    @torch.no_grad()
    def held_out_loss(self) -> dict:
        """Mean NLL per window on the held-out projects, and per cross-file identifier token."""
        kl = nll = cross = 0.0
        n_cross = 0
        for i in self.held:
            logp, ids = self.predictions(i)
            _, k, n = distill_loss(logp, self.teacher(i), ids, self.cfg.kl_weight, self.cfg.lm_weight)
            kl, nll = kl + float(k), nll + float(n)
            mask = self.cross_mask(i).to(ids.device)
            cross -= float(logp.gather(-1, ids[:, None])[:, 0][mask].sum())
            n_cross += int(mask.sum())
        out = {"kl": kl / len(self.held), "nll": nll / len(self.held)}
        return out | ({"nll_cross": cross / n_cross} if n_cross else {})

    def save(self) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"memory": self.model.memory.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "history": self.history}, tmp)
        os.replace(tmp, self.ckpt)

    def train(self, time_budget: float | None = None) -> list[dict]:
        cfg = self.cfg
        rng = random.Random(cfg.seed + self.step)
        if not self.history:
            self.history.append({"step": 0, **self.held_out_loss(), "seconds": 0.0})
            self.log(json.dumps(self.history[-1]))
        t0 = time.time() - self.history[-1]["seconds"]
        while self.step < cfg.steps:
            lr = cfg.lr * min(1.0, (self.step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * self.step / cfg.steps))
            for g in self.opt.param_groups:
                g["lr"] = lr * g["scale"]
            self.opt.zero_grad(set_to_none=True)
            kl_sum = 0.0
            for _ in range(cfg.accumulate):
                loss, kl, _ = self.example_loss(rng.choice(self.train_ids))
                (loss / cfg.accumulate).backward()
                kl_sum += float(kl)
            self.opt.step()
            self.step += 1
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.history.append({"step": self.step, **self.held_out_loss(), "train_kl": kl_sum / cfg.accumulate,
                                     "seconds": time.time() - t0, "lr": lr})
                self.log(json.dumps(self.history[-1]))
                self.save()
            if time_budget is not None and time.time() - t0 > time_budget:
                self.history.append({"step": self.step, **self.held_out_loss(), "seconds": time.time() - t0,
                                     "stopped": "time budget"})
                self.save()
                break
        return self.history



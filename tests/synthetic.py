"""A synthetic corpus on which only a memory can help: names defined early, used late.

Each document is a small project.  ``defs.py`` defines six functions whose names are drawn from
a pool of 200 made-up words; ``use_*.py`` files call them.  Each call is repeated twice a few
lines later, at varying distances, so a model learns to copy a name it has just seen; the first
call of each group, though, sits far beyond the local context (one segment plus the cached
previous one) from the definitions and earlier calls.  Without memory a model can only guess
among all 200 names there; with the project in memory it can narrow the guess to the six this
project defines: the cross-file identifier problem of code completion, reduced to its core.
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtlsp_model.corpus import build_documents
from mtlsp_model.dataset import sample_texts, write_dataset
from mtlsp_model.model import ModelConfig
from mtlsp_model.runner import SegmentRunner
from mtlsp_model.stream import SegmentStream
from mtlsp_model.tokenizer import train_tokenizer
from mtlsp_model.train import TrainConfig, Trainer

_pool_rng = random.Random(20221)
NAME_POOL = sorted({"".join(_pool_rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(200)})
FILLER = [
    "# keep the totals in sync with the ledger\n",
    "log.info('step done')\n",
    "count += 1\n",
    "# nothing to see here, move along\n",
    "assert count >= 0\n",
]
FIRST_CALL = re.compile(r"(?<=_0 = )[a-z]+(?=\()")  # the first call of a group


def project_files(rng: random.Random, gap: tuple[int, int] = (8, 8), n_defs: int = 6, n_uses: int = 3) -> dict[str, str]:
    """One project; ``gap`` bounds the lines of filler before each group of calls."""
    names = rng.sample(NAME_POOL, n_defs)
    files = {"defs.py": "".join(f"def {n}(a, b):\n    return a * {rng.randint(2, 9)} + b\n\n" for n in names)}
    for u in range(n_uses):
        lines = []
        for i in range(n_defs):
            lines += rng.choices(FILLER, k=rng.randint(*gap))
            name = rng.choice(names)
            for r in range(3):
                if r:
                    lines += rng.choices(FILLER, k=rng.randint(0, 3))
                lines.append(f"x{i}_{r} = {name}({rng.randint(0, 9)}, {rng.randint(0, 9)})\n")
        files[f"use_{u}.py"] = "".join(lines)
    return files


def write_projects(root: Path, count: int, seed: int) -> None:
    """Training projects; their gaps vary, so some first calls are near an earlier group too."""
    rng = random.Random(seed)
    for i in range(count):
        for name, text in project_files(rng, gap=(0, 6)).items():
            path = root / f"proj{i:04d}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def first_call_positions(tok, files: dict[str, str]) -> tuple[np.ndarray, list[int]]:
    """Token ids of a project (defs first) and positions of the tokens of each first call."""
    ids: list[int] = []
    positions: list[int] = []
    for name in ["defs.py"] + sorted(n for n in files if n != "defs.py"):
        ids += tok.file_header(name)
        enc = tok.hf.encode(files[name], add_special_tokens=False)
        spans = [m.span() for m in FIRST_CALL.finditer(files[name])]
        positions += [len(ids) + j for j, (a, b) in enumerate(enc.offsets) if any(a < e and b > s for s, e in spans)]
        ids += enc.ids
    return np.array(ids), positions


@torch.no_grad()
def far_use_loss(model, tok, capacity: int, projects: int = 20, seed: int = 999) -> float:
    """Mean loss (nats) on the tokens of first calls in held-out projects, memory of ``capacity``."""
    rng = random.Random(seed)
    losses: list[float] = []
    for _ in range(projects):
        ids, positions = first_call_positions(tok, project_files(rng))
        stream = SegmentStream(ids, [(0, len(ids))], 1, model.cfg.seq_len, pad_id=tok.pad, shuffle=False, loop=False)
        runner = SegmentRunner(model, tok.pad, 1, capacity)
        nll: list[float] = []
        while not stream.exhausted:
            out, y = runner(model, stream.next_batch(), with_targets=False)
            nll += F.cross_entropy(out.logits[0], y[0], ignore_index=-1, reduction="none")[y[0] >= 0].tolist()
        losses += [nll[p - 1] for p in positions]  # the target at index i is token i + 1
    return float(np.mean(losses))


def train_on_projects(root: Path, model: ModelConfig, train: TrainConfig):
    """Write 300 projects under ``root``, build corpus and tokenizer, train.

    Returns the trained model (in eval mode), its tokenizer and the training summary.
    """
    torch.manual_seed(0)
    write_projects(root / "src", 300, seed=1)
    docs, _ = build_documents([root / "src"], exclude=[])
    tok = train_tokenizer(sample_texts(docs, 1 << 20), vocab_size=700)
    write_dataset(root / "data", docs, tok, roots=[], excluded=[], seed=0)
    trainer = Trainer(root / "data", root / "run", model, train)
    summary = trainer.train()
    return trainer.model.eval(), tok, summary

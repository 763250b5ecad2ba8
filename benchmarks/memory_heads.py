"""Compact (one shared key/value head) against per-head memory, at small scale.

Trains the synthetic-projects model of tests/test_learning.py twice, identical but for
``mem_kv_heads``, and reports for each: bytes per memorised token, loss on far-away name uses
with and without memory, and validation bits per token with and without memory.

Usage: python benchmarks/memory_heads.py [--steps 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from synthetic import far_use_loss, train_on_projects  # noqa: E402
from test_learning import MODEL, TRAIN  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=TRAIN.max_steps)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kv_heads in (1, MODEL.n_head):
        mc = replace(MODEL, mem_kv_heads=kv_heads)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            model, tok, summary = train_on_projects(Path(tmp), mc, replace(TRAIN, max_steps=a.steps))
        rows.append({
            "mem_kv_heads": kv_heads,
            "bytes_per_token_fp16": mc.bytes_per_memory_token,
            "far_use_loss_no_memory": round(far_use_loss(model, tok, 0), 4),
            "far_use_loss_memory": round(far_use_loss(model, tok, TRAIN.mem_capacity), 4),
            "val_bits_no_memory": summary["val"]["val_bits_nomem"],
            "val_bits_memory": summary["val"]["val_bits_mem"],
            "seconds": round(time.time() - t0),
        })
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "steps": a.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""The CPU runtime's precisions, on this machine: which should it choose?

``model/runtime.py`` picks bfloat16 for many-row matrix products only where this CPU computes
them faster than float32 (measured once per process), and decodes through 4-bit weights where
the base's weights lie on a 4-bit grid (int8 elsewhere).  This script measures what those
choices are worth for the product's own work, three variants in one process, alternating
rounds (float32 or bfloat16 products; 4-bit or int8 decoding weights):

- encoding chunks of a repository into memory entries (``Encoder``, as the indexer runs it);
- reading a 384-token prompt (no memory, nothing reused);
- one decoding step at that context.

    python benchmarks/cpu_precision.py --repo /work/evalrepos/flask --out /tmp/cpu_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from mtlsp_model.runtime import cpu_product_dtype, for_inference
from mtlsp_model.weights import load_weights

from mtlsp.complete.decode import Decoder
from mtlsp.index.chunks import chunk_file
from mtlsp.index.encode import Encoder, chunk_hashes, preamble


def jobs_of(encoder: Encoder, root: Path, budget: int) -> list:
    jobs = []
    for f in sorted(p for p in root.rglob("*.py") if ".git" not in p.parts):
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        chunks = chunk_file(rel, data)
        pre = preamble(data, chunks)
        jobs += [encoder.job(rel, data, c, h, pre) for c, h in zip(chunks, chunk_hashes(rel, data, chunks))]
        if sum(len(j.ids) for j in jobs) >= budget:
            return jobs
    return jobs


def prompts_of(tok, root: Path, n: int, length: int) -> list[list[int]]:
    out = []
    for f in sorted(p for p in root.rglob("*.py") if ".git" not in p.parts):
        ids = tok.encode(f.read_text())
        if len(ids) > length:
            out.append(tok.file_header(f.relative_to(root).as_posix()) + ids[:length])
        if len(out) == n:
            break
    return out


def one_round(encoder: Encoder, decoder: Decoder, jobs: list, prompts: list[list[int]], steps: int) -> dict:
    """Encoding is skipped (None) for an int8-decoding variant: many rows never use those weights."""
    encode_rate = None
    if jobs:
        t = time.perf_counter()
        encoder.encode(jobs)
        encode_rate = sum(len(j.ids) for j in jobs) / (time.perf_counter() - t)
    prefill, step = [], []
    for ids in prompts:
        t = time.perf_counter()
        ctx = decoder.prefill(ids, None)
        prefill.append(time.perf_counter() - t)
        for _ in range(steps):
            t = time.perf_counter()
            ctx = decoder.step([ctx], [int(ctx.logits.argmax())], None)[0]
            step.append(time.perf_counter() - t)
    return {"encode_tokens_per_s": encode_rate,
            "prefill_ms": 1e3 * statistics.median(prefill), "step_ms": 1e3 * statistics.median(step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--encode-tokens", type=int, default=8000)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engines = {}
    for dtype, four_bits in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, True)):
        loaded = load_weights(None)
        for_inference(loaded.model, torch.device("cpu"), dtype, four_bits)
        encoder = Encoder(loaded.model, loaded.tokenizer)
        encoder.warm_up()
        name = str(dtype).removeprefix("torch.") + (" + 4-bit decoding" if four_bits else " + int8 decoding")
        engines[name] = (encoder, Decoder(loaded.model, loaded.tokenizer))
    tok = loaded.tokenizer
    jobs = jobs_of(encoder, a.repo, a.encode_tokens)
    prompts = prompts_of(tok, a.repo, a.prompts, 384)
    rounds: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(a.rounds):
        for name, (enc, dec) in engines.items():
            rounds[name].append(one_round(enc, dec, [] if "int8" in name else jobs, prompts, a.steps))
            print(r, name, json.dumps(rounds[name][-1]), flush=True)
    result = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                         f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": f"python benchmarks/cpu_precision.py --repo {a.repo}",
              "chosen": str(cpu_product_dtype()).removeprefix("torch."),
              "encode_tokens": sum(len(j.ids) for j in jobs),
              "median": {name: {k: statistics.median(x[k] for x in rs) if rs[0][k] is not None else None for k in rs[0]}
                         for name, rs in rounds.items()},
              "rounds": rounds}
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("chosen", "median")}, indent=2))


if __name__ == "__main__":
    main()

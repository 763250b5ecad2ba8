"""The CPU runtime's precisions, on this machine: which should it choose?

``model/runtime.py`` picks bfloat16 for many-row matrix products only where this CPU computes
them faster than float32 (measured once per process), and decodes through 4-bit weights where
the base's weights lie on a 4-bit grid (int8 elsewhere).  This script measures what those
choices are worth for the product's own work, four variants in one process, alternating
rounds (float32 or bfloat16 products; 4-bit or int8 decoding weights; float32 products with
int8 encoding, ``runtime.quantize_encoding``, whatever this CPU would choose):

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
from model_speed import encode_jobs, prompts, timings  # this folder's own: run as a script
from mtlsp_model.runtime import cpu_product_dtype, for_inference, int8_encoding_faster, quantize_encoding
from mtlsp_model.weights import load_weights

from mtlsp.complete.decode import Decoder
from mtlsp.index.encode import Encoder


def one_round(encoder: Encoder, decoder: Decoder, jobs: list, batch: list[list[int]], steps: int) -> dict:
    """Encoding is skipped (None) for an int8-decoding variant: many rows never use those weights."""
    encode_rate = None
    if jobs:
        t = time.perf_counter()
        encoder.encode(jobs)
        encode_rate = sum(len(j.ids) for j in jobs) / (time.perf_counter() - t)
    timed = timings(decoder, None, batch, steps)
    return {"encode_tokens_per_s": encode_rate, "prefill_ms": timed["prefill_ms"]["median"],
            "step_ms": timed["step_ms"]["median"]}


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
    chosen_int8 = int8_encoding_faster()
    for dtype, four_bits, int8 in ((torch.float32, True, False), (torch.float32, True, True),
                                   (torch.float32, False, False), (torch.bfloat16, True, False)):
        loaded = load_weights(None)
        for_inference(loaded.model, torch.device("cpu"), dtype, four_bits)
        if int8:
            quantize_encoding(loaded.model, loaded.tokenizer, loaded.info["base_folder"])
        encoder = Encoder(loaded.model, loaded.tokenizer)
        encoder.warm_up()
        name = (str(dtype).removeprefix("torch.") + (" + 4-bit decoding" if four_bits else " + int8 decoding")
                + (" + int8 encoding" if int8 else ""))
        engines[name] = (encoder, Decoder(loaded.model, loaded.tokenizer))
    files = sorted(p for p in a.repo.rglob("*.py") if ".git" not in p.parts)
    jobs = encode_jobs(encoder, a.repo, files, a.encode_tokens)
    batch = prompts(loaded.tokenizer, a.repo, files, a.prompts, 384, seed=0)
    rounds: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(a.rounds):
        for name, (enc, dec) in engines.items():
            rounds[name].append(one_round(enc, dec, [] if "int8 decoding" in name else jobs, batch, a.steps))
            print(r, name, json.dumps(rounds[name][-1]), flush=True)
    result = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                         f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": f"python benchmarks/cpu_precision.py --repo {a.repo}",
              "chosen": str(cpu_product_dtype()).removeprefix("torch."), "int8_encoding_chosen": chosen_int8,
              "encode_tokens": sum(len(j.ids) for j in jobs),
              "median": {name: {k: statistics.median(x[k] for x in rs) if rs[0][k] is not None else None for k in rs[0]}
                         for name, rs in rounds.items()},
              "rounds": rounds}
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("chosen", "median")}, indent=2))


if __name__ == "__main__":
    main()

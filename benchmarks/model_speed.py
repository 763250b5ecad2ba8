"""Speed of the shipped model as the product runs it, with a real repository in its memory.

- encoding chunks into memory entries (``Encoder``: the blocks up to the last memory layer);
- reading a 384-token prompt with the memory (a fresh prompt: nothing reused), and without;
- one decoding step with the memory, and without;
- the bits-per-token cost of the serving precision against float32, on a few files.

``--against WEIGHTS``: instead, the shipped weights and WEIGHTS in alternating rounds on the same
prompts and memory: a prompt, a decoding step and a pass over 16 tokens (as ghost text's guesses
and the ranking's trie read them), each with the memory. Trained parameters change what a
memory read costs; this VM's speed drifts by 10-20% between runs, so only a same-run
comparison shows what they cost.

``--profile``: instead, where the time of encoding and of reading a prompt (no memory) goes,
by torch operator (the profiler's self CPU time), to see how far each is from
``ceiling.py``'s bound and what stands between.

The memory is the repository's store, built by the indexer (IVF index once it is large), and
the prompts are windows of the repository's own files.

    python benchmarks/model_speed.py --repo /work/evalrepos/flask --out /tmp/model_speed.json
    python benchmarks/model_speed.py --repo /work/evalrepos/flask --out /tmp/profile.json \
        --profile --encode-tokens 12000
    python benchmarks/model_speed.py --repo /work/evalrepos/flask --out /tmp/ab.json \
        --against runs/mem3/weights --cache-dir /work/runs/evalcache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mtlsp_model.evaluate import score_file
from mtlsp_model.projects import SourceFile
from mtlsp_model.runtime import for_inference
from mtlsp_model.tokenizer import Tokenizer
from mtlsp_model.weights import load_weights
from torch.profiler import profile

from mtlsp.complete.decode import Decoder
from mtlsp.complete.retrieval import StoreMemory
from mtlsp.index.chunks import chunk_file
from mtlsp.index.encode import Encoder, Job, chunk_hashes, preamble
from mtlsp.workspace import Engine


def median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def encode_jobs(encoder: Encoder, root: Path, files: list[Path], budget: int) -> list[Job]:
    """The indexer's jobs for ``files``, in order, until they hold ``budget`` tokens."""
    jobs = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        chunks = chunk_file(rel, data)
        context = encoder.context(rel, preamble(data, chunks))
        jobs += [encoder.job(rel, data, c, h, context) for c, h in zip(chunks, chunk_hashes(rel, data, chunks))]
        if sum(len(j.ids) for j in jobs) >= budget:
            break
    return jobs


def encode_rate(engine: Engine, jobs: list[Job]) -> dict:
    engine.encoder.encode(jobs[:4])  # warm-up
    t = time.perf_counter()
    engine.encoder.encode(jobs)
    seconds = time.perf_counter() - t
    tokens = sum(len(j.ids) for j in jobs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def prompts(tok: Tokenizer, root: Path, files: list[Path], n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens from random places of ``files``, after their header."""
    rng = random.Random(seed)
    tokens = {f: tok.encode(f.read_text()) for f in files}
    if not any(len(ids) > length for ids in tokens.values()):
        raise SystemExit(f"no file holds more than {length} tokens: nothing to take prompts from")
    out = []
    while len(out) < n:
        f = rng.choice(files)
        ids = tokens[f]
        if len(ids) <= length:
            continue
        start = rng.randrange(0, len(ids) - length)
        out.append(tok.file_header(f.relative_to(root).as_posix()) + ids[start : start + length])
    return out


def timings(decoder: Decoder, memory, batch: list[list[int]], steps: int) -> dict:
    prefill, step = [], []
    for ids in batch:
        t = time.perf_counter()
        ctx = decoder.prefill(ids, memory)
        prefill.append(time.perf_counter() - t)
        for _ in range(steps):
            t = time.perf_counter()
            ctx = decoder.step([ctx], [int(ctx.logits.argmax())], memory)[0]
            step.append(time.perf_counter() - t)
    return {"prefill_ms": {"median": median_ms(prefill), "p95": 1e3 * float(np.percentile(prefill, 95))},
            "step_ms": {"median": median_ms(step), "p95": 1e3 * float(np.percentile(step, 95))},
            "prompts": len(batch), "steps": len(step)}


def against(engine: Engine, other: Path, memory, batch: list[list[int]], rounds: int) -> dict:
    """Medians (ms) of a prompt, a step and a 16-token pass, all with ``memory``, for the shipped
    weights and ``other``'s, the two read in turns prompt by prompt."""
    loaded = load_weights(other)
    decoders = {"shipped": engine.decoder,
                str(other): Decoder(for_inference(loaded.model, engine.device), engine.loaded.tokenizer)}
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "step": [], "pass16": []} for k in decoders}
    for r in range(rounds):
        for ids in batch:
            for name, decoder in (decoders.items() if r % 2 == 0 else reversed(decoders.items())):
                t = time.perf_counter()
                ctx = decoder.prefill(ids[:-16], memory)
                times[name]["prefill"].append(time.perf_counter() - t)
                t = time.perf_counter()
                decoder.step([ctx], [ids[-16]], memory)
                times[name]["step"].append(time.perf_counter() - t)
                t = time.perf_counter()
                decoder.extend(ctx, ids[-16:], memory)
                times[name]["pass16"].append(time.perf_counter() - t)
    out = {name: {k: round(median_ms(v), 1) for k, v in t.items()} for name, t in times.items()}
    first, second = out.values()
    out["ratio"] = {k: round(second[k] / first[k], 3) for k in first}
    out["samples"] = rounds * len(batch)
    return out


def time_shares(run: Callable[[], None]) -> dict:
    """``run``'s self CPU time by torch operator: seconds and share of the whole, largest first
    (the operators under 1% together as ``other``)."""
    with profile() as prof:
        run()
    times = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(times.values())
    shares = {k: {"s": round(v, 3), "share": round(v / total, 3)}
              for k, v in sorted(times.items(), key=lambda kv: -kv[1]) if v >= 0.01 * total}
    rest = total - sum(x["s"] for x in shares.values())
    return {"total_s": round(total, 3), "ops": {**shares, "other": {"s": round(rest, 3), "share": round(rest / total, 3)}}}


def profiles(engine: Engine, root: Path, files: list[Path], budget: int, n_prompts: int) -> dict:
    """``time_shares`` of encoding ``budget`` tokens (after ``encode_rate``'s timed pass) and
    of reading ``n_prompts`` 384-token prompts without memory."""
    jobs = encode_jobs(engine.encoder, root, files, budget)
    rate = encode_rate(engine, jobs)
    batch = prompts(engine.loaded.tokenizer, root, files, n_prompts, 384, seed=0)
    plain = timings(engine.decoder, None, batch, 1)
    return {"encode": {"tokens": rate["tokens"], "tokens_per_s": rate["tokens_per_s"],
                       **time_shares(lambda: engine.encoder.encode(jobs))},
            "prefill": {"prompts": len(batch), "ms": plain["prefill_ms"],
                        **time_shares(lambda: [engine.decoder.prefill(ids, None) for ids in batch])}}


def precision_cost(engine: Engine, root: Path, files: list[Path], memory) -> dict:
    """Bits per token of a few files in the serving precision and in float32 (same memory)."""
    fp32 = load_weights(None).model
    tok = engine.loaded.tokenizer
    bits = {"serving": 0.0, "float32": 0.0}
    tokens = 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        header = tok.file_header(rel)
        sf = SourceFile(rel, f.read_text(), header + tok.encode(f.read_text())[:1536], len(header))
        memory.hide = (rel,)
        for name, model in (("serving", engine.loaded.model), ("float32", fp32)):
            nll = score_file(model, sf, memory)
            bits[name] += float(np.nansum(nll)) / np.log(2)
        tokens += int((~np.isnan(nll)).sum())
    memory.hide = ()
    return {"tokens": tokens, "bits_per_token": {k: v / tokens for k, v in bits.items()},
            "change": bits["serving"] / bits["float32"] - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--encode-tokens", type=int, default=60_000)
    ap.add_argument("--precision-files", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="only where encoding's and a prompt's time goes")
    ap.add_argument("--against", type=Path, help="only: the shipped weights against these, in turns")
    ap.add_argument("--rounds", type=int, default=4, help="with --against: passes over the prompts")
    ap.add_argument("--cache-dir", help="reuse the repository's store from this cache (default: a fresh one)")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engine = Engine.load(None, "auto")
    files = sorted(p for p in a.repo.rglob("*.py") if ".git" not in p.parts)
    result: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                               f"device {engine.device}, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d"),
                    "command": f"python benchmarks/model_speed.py --repo {a.repo}"}
    if a.profile:
        result["profile"] = profiles(engine, a.repo, files, a.encode_tokens, a.prompts)
        a.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    if not a.against:
        result["encode"] = encode_rate(engine, encode_jobs(engine.encoder, a.repo, files, a.encode_tokens))
        print(json.dumps(result["encode"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store, indexer = engine.open_memory(a.repo, cap_tokens=10**7, cache_root=a.cache_dir or tmp,
                                            ann_background=False)
        report = indexer.refresh()
        store.wait_for_index()
        stats = store.stats()
        result["memory"] = {"entries": stats["entries"], "backend": stats["backend"], "index_seconds": report.seconds,
                            "ann": stats["ann"]}
        print(json.dumps(result["memory"]), flush=True)
        memory = StoreMemory(store)
        batch = prompts(engine.loaded.tokenizer, a.repo, files, a.prompts, 384, seed=0)
        if a.against:
            against(engine, a.against, memory, batch[:2], 1)  # warm-up
            result["against"] = against(engine, a.against, memory, batch, a.rounds)
            result["command"] += f" --against {a.against} --rounds {a.rounds}"
            a.out.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return
        timings(engine.decoder, memory, batch[:2], 2)  # warm-up
        result["with_memory"] = timings(engine.decoder, memory, batch, a.steps)
        result["without_memory"] = timings(engine.decoder, None, batch, a.steps)
        print(json.dumps({k: result[k] for k in ("with_memory", "without_memory")}), flush=True)
        picked = random.Random(1).sample(files, min(a.precision_files, len(files)))
        result["precision"] = precision_cost(engine, a.repo, picked, memory)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

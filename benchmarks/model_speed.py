"""Speed of the memorizing transformer's parts, measured in one process so ratios are fair.

- training tokens/s of the same model with the memory off and on (full memory of
  ``mem_capacity`` tokens per slot), interleaved round by round to cancel machine drift;
- encoding tokens/s (text -> memory entries, the indexer's path);
- top-k search time of the memory layer for memories of several sizes, for one token's queries
  and for a 512-token segment's.

Usage: python benchmarks/model_speed.py [--preset cpu] [--sizes 65536,1048576] [--json out.json]
Prints one JSON object; medians of ``--repeat`` timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from mtlsp_model.model import MemorizingTransformer
from mtlsp_model.runner import SegmentRunner, autocast, new_memory
from mtlsp_model.stream import Batch
from mtlsp_model.train import PRESETS, hardware


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(vocab: int, batch: int, seq_len: int, rng: np.random.Generator) -> Batch:
    x = rng.integers(0, vocab, size=(batch, seq_len + 1))
    return Batch(x[:, :-1].copy(), x[:, 1:].copy(), np.zeros(batch, dtype=bool))


def train_throughput(model, tc, device, rounds: int, steps: int) -> dict:
    """Tokens/s of training steps, memory off vs on, alternating ``rounds`` times."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    cfg = model.cfg
    off = SegmentRunner(model, pad_id=-1, batch=tc.batch)
    on = SegmentRunner(model, pad_id=-1, batch=tc.batch, capacity=tc.mem_capacity)
    # Fill the memory so every search scans a full memory, as in steady-state training.
    full = torch.randn(tc.batch, cfg.mem_kv_heads, tc.mem_capacity, cfg.head_dim, device=device)
    on.memory.add(torch.nn.functional.normalize(full, dim=-1), full)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds + 1):  # round 0 warms up both paths
        for name, runner in (("off", off), ("on", on)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                out, _ = runner(model, random_batch(cfg.vocab_size, tc.batch, cfg.seq_len, rng))
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
            if r:
                rates[name].append(steps * tc.batch * cfg.seq_len / (time.perf_counter() - t0))
    off_rate, on_rate = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"tokens_per_s_memory_off": round(off_rate), "tokens_per_s_memory_on": round(on_rate),
            "ratio_on_off": round(on_rate / off_rate, 3), "batch": tc.batch,
            "mem_capacity": tc.mem_capacity, "rounds": rounds, "steps_per_round": steps}


@torch.no_grad()
def encode_throughput(model, device, repeat: int) -> dict:
    cfg = model.cfg
    x = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), device=device)
    times = []
    for i in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            model.encode(x)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"encode_tokens_per_s": round(x.numel() / statistics.median(times))}


@torch.no_grad()
def search_times(model, device, sizes: list[int], repeat: int) -> list[dict]:
    cfg = model.cfg
    rows = []
    for size in sizes:
        memory = new_memory(model, 1, size, device)
        chunk = 1 << 18
        for start in range(0, size, chunk):  # fill in chunks to bound temporary memory
            n = min(chunk, size - start)
            k = torch.nn.functional.normalize(torch.randn(1, cfg.mem_kv_heads, n, cfg.head_dim, device=device), dim=-1)
            memory.add(k, k)
        row = {"entries": size, "bytes_per_entry_fp16": cfg.bytes_per_memory_token}
        for tokens in (1, 512):
            q = torch.nn.functional.normalize(torch.randn(1, cfg.n_head, tokens, cfg.head_dim, device=device), dim=-1)
            times = []
            for i in range(repeat + 1):
                sync(device)
                t0 = time.perf_counter()
                memory.search(q, cfg.knn_k)
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
            row[f"ms_{tokens}_tokens"] = round(1000 * statistics.median(times), 3)
        rows.append(row)
        del memory
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--sizes", default="65536,1048576")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    mc, tc = PRESETS[a.preset]
    model = MemorizingTransformer(mc).to(device)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "preset": a.preset,
        "params": model.num_params(),
    }
    if not a.skip_train:
        result["train"] = train_throughput(model, tc, device, a.rounds, a.steps)
    model.eval()
    result.update(encode_throughput(model, device, a.repeat))
    result["search"] = search_times(model, device, [int(s) for s in a.sizes.split(",")], a.repeat)
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

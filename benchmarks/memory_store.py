"""Benchmark of the persistent kNN memory store: H memory heads per token, synthetic entries.

No model writes multi-head entries yet, so the keys are synthetic, shaped like raw pre-RoPE
attention keys.  Per head: a mixture of 1,024 gaussian clusters, each at its own scale, with
norms varying several-fold between clusters and heads, and a few dimensions far larger than
the rest.  A token's cluster is shared by its heads, as one context shapes all of a token's
keys.  Queries are drawn near the clusters, three per memory head (the query heads of its
group), so one token's search is H x 3 queries.  Files are 256-token chunks with names.

Measures on the CPU backend:

- bytes per token on disk, manifest included, at 100k and 1M tokens;
- search latency of one token's queries (median and p90 over 200 tokens), exact and IVF;
- recall@32 of the IVF indexes against exact search, on queries held out from the tuning;
- add/replace of a 2k-token file, with and without IVF indexes kept current;
- reload of a 1M-token store;
- a fresh process holding 1M tokens: time until its IVF indexes serve, and resident memory,
  with the cells an earlier build saved (``ivf-cells.bin``) and without them (trained).

    OMP_NUM_THREADS=2 python benchmarks/memory_store.py --out /tmp/memory_store.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtlsp.store.files import Entries
from mtlsp.store.cells import CELLS
from mtlsp.store.knn import recall_at_k
from mtlsp.store.memory_store import FileUpdate, MemoryStore, NewChunk, StoreOptions

FINGERPRINT = "synthetic"
CHUNK = 256  # tokens per chunk


class Synthetic:
    """Deterministic synthetic entries and queries for ``heads`` x ``dim`` memory heads."""

    def __init__(self, heads: int = 4, dim: int = 64, clusters: int = 1024, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.heads, self.dim, self.seed = heads, dim, seed
        # per head: dimension scales (a few outliers), a base norm, clusters at their own scale
        dim_scale = np.exp(rng.normal(0, 0.4, (heads, dim)))
        dim_scale[:, rng.choice(dim, 4, replace=False)] *= 4.0
        base = rng.uniform(3.0, 12.0, (heads, 1, 1))
        centres = rng.standard_normal((heads, clusters, dim)) * dim_scale[:, None]
        centres /= np.linalg.norm(centres, axis=2, keepdims=True)
        self.centres = centres * base * np.exp(rng.normal(0, 0.4, (heads, clusters, 1)))
        self.spread = rng.uniform(0.3, 0.8, (heads, clusters, 1)) / np.sqrt(dim) * dim_scale[:, None]
        self.popularity = rng.dirichlet(np.full(clusters, 0.5))

    def _near(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, H, D) points near clusters picked by popularity, one cluster per token."""
        c = rng.choice(len(self.popularity), size=n, p=self.popularity)
        h = np.arange(self.heads)[:, None]
        centre = self.centres[h, c[None, :]]  # (H, n, D)
        scale = self.spread[h, c[None, :]] * np.linalg.norm(centre, axis=2, keepdims=True)
        x = centre + rng.standard_normal(centre.shape) * scale
        return np.ascontiguousarray(x.transpose(1, 0, 2))

    def entries(self, i: int, n: int) -> Entries:
        """File ``i``'s ``n`` entries."""
        rng = np.random.default_rng((self.seed, i))
        keys = self._near(rng, n)
        values = rng.standard_normal((n, self.heads, self.dim))
        return Entries.from_float(keys, values, rng.integers(0, 49_152, n), np.arange(n) * 4)

    def queries(self, tokens: int, per_head: int = 3) -> np.ndarray:
        """(tokens, H, per_head, D): each token's queries, ``per_head`` near the same cluster."""
        rng = np.random.default_rng((self.seed, 2**32 - 1))  # apart from every file's
        base = self._near(rng, tokens)[:, :, None]  # (tokens, H, 1, D)
        jitter = rng.standard_normal((tokens, self.heads, per_head, self.dim))
        q = base + jitter * 0.5 * np.linalg.norm(base, axis=3, keepdims=True) / np.sqrt(self.dim)
        return q.astype(np.float32)


def file_update(data: Synthetic, i: int, n: int, version: str = "1") -> FileUpdate:
    """File ``i`` of ``n`` tokens in 256-token chunks, each defining two names."""
    e = data.entries(i, n)
    chunks = []
    for start in range(0, n, CHUNK):
        part = e.take(start, min(n, start + CHUNK))
        part = Entries(*part.arrays()[:-1], part.offsets - np.uint32(4 * start))
        chunks.append(NewChunk(4 * start, 4 * (start + len(part)), f"{i}:{version}:{start}", part,
                               (f"func_{i}_{start}", f"Class{i}_{start}")))
    return FileUpdate(f"pkg/mod_{i:04d}.py", version, chunks)


def file_sizes(total: int, seed: int = 0) -> list[int]:
    """Token counts of files, log-normal around 2.7k as in real repositories, capped at 8,192."""
    rng = np.random.default_rng(seed)
    sizes, have = [], 0
    while have < total:
        n = int(min(8192, max(64, rng.lognormal(7.6, 0.8))))
        sizes.append(n)
        have += n
    return sizes


def fill(store: MemoryStore, data: Synthetic, sizes: list[int], upto: int, done: int) -> int:
    """Add files [done:] until the store holds ``upto`` tokens; returns the next file index."""
    batch, have = [], store.stats()["entries"]
    while done < len(sizes) and have < upto:
        n = min(sizes[done], upto - have)
        batch.append(file_update(data, done, n))
        have += n
        done += 1
        if len(batch) == 50:
            store.update(batch)
            batch = []
    if batch:
        store.update(batch)
    return done


def timings_ms(fn, repeat: int) -> list[float]:
    out = []
    for r in range(repeat):
        t = time.perf_counter()
        fn(r)
        out.append(1e3 * (time.perf_counter() - t))
    return out


def summary(ms: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(ms), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2)}


def search_figures(store: MemoryStore, queries: np.ndarray, repeat: int) -> dict:
    """One token's queries (H x 3) per search, a different token each time."""
    store.search(queries[0], 32)  # warm
    return summary(timings_ms(lambda r: store.search(queries[r % len(queries)], 32), repeat))


def exact_slots(store: MemoryStore, q: np.ndarray) -> np.ndarray:
    """The store's exact answer: its IVF indexes switched off for the call."""
    threshold, store.options.ann_threshold = store.options.ann_threshold, 10**12
    try:
        return store.search(q, 32).slots
    finally:
        store.options.ann_threshold = threshold


def ivf_figures(store: MemoryStore, queries: np.ndarray) -> dict:
    """Build the IVF indexes tuned on 256 tokens' queries; recall on 256 other tokens'."""
    store.options.ann_threshold = 1
    for t in range(256):
        store.search(queries[t], 32)  # the recall is tuned on these
    t = time.perf_counter()
    store._search.build()
    build = time.perf_counter() - t
    held = queries[256:512]
    recalls = []
    for q in held:
        approx, exact = store.search(q, 32).slots, exact_slots(store, q)
        recalls.append([recall_at_k(approx[h], exact[h]) for h in range(store.heads)])
    a = store.stats()["ann"]
    return {
        "nlist": a["nlist"], "nprobe": a["nprobe"], "recall_at_32_tuning": a["recall_per_head"],
        "recall_at_32_held_out": [round(float(r), 4) for r in np.mean(recalls, axis=0)],
        "build_s": round(build, 1),
        "search_one_token": search_figures(store, queries[512:], 200),
    }


def replace_figures(store: MemoryStore, data: Synthetic, repeat: int = 30) -> dict:
    """Replace a 2k-token file by alternating versions, each a full durable commit."""
    versions = [file_update(data, 10**6 + v, 2048, str(v)) for v in range(2)]
    versions = [FileUpdate("bench/two_k.py", u.content_hash, u.chunks) for u in versions]
    store.update([versions[0]])
    return summary(timings_ms(lambda r: store.update([versions[(r + 1) % 2]]), repeat))


def proc_status() -> dict:
    status = Path("/proc/self/status").read_text().split("\n")
    get = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mb": round(get["VmRSS"] / 1024), "peak_rss_mb": round(get["VmHWM"] / 1024)}


def rss_child(directory: str, heads: int, dim: int, queries: str) -> None:
    """Run in a fresh process, as a language server starts: open the store (exact search
    ready), wait for the IVF indexes its background thread builds, search; report the time and
    resident memory after each step."""
    out = {"imports": proc_status()}
    t = time.perf_counter()
    store = MemoryStore(directory, fingerprint=FINGERPRINT, heads=heads, dim=dim,
                        options=StoreOptions(refresh_interval=3600))
    out["open_s"] = round(time.perf_counter() - t, 2)
    out["opened"] = proc_status()
    store.wait_for_index()
    out["ivf_built_s"] = round(time.perf_counter() - t, 1)
    out["ivf_built"] = proc_status()
    q = np.load(queries)
    for t in range(len(q)):
        store.search(q[t], 32)
    out["searched"] = proc_status()
    out.update(entries=store.stats()["entries"], backend=store.stats()["backend"],
               restored_heads=store.stats()["ann"]["restored_heads"])
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    data = Synthetic(args.heads, args.dim)
    sizes = file_sizes(args.total + 8192)
    queries = data.queries(712)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    where = work / "store"
    cpu = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {cpu}",
                    "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                    "heads": args.heads, "dim": args.dim, "load_before": os.getloadavg()}

    def exact_store() -> MemoryStore:  # searches by exact scans: no IVF index
        return MemoryStore(where, fingerprint=FINGERPRINT, heads=args.heads, dim=args.dim,
                           options=StoreOptions(ann_threshold=10**12, refresh_interval=3600))

    store = exact_store()
    done = fill(store, data, sizes, 100_000, 0)
    s = store.stats()
    result["at_100k"] = {"entries": s["entries"], "disk_bytes": s["disk_bytes"], "bytes_per_token": s["bytes_per_entry"]}
    done = fill(store, data, sizes, 200_000, done)
    result["at_200k"] = {"entries": store.stats()["entries"], "exact_search_one_token": search_figures(store, queries, 30),
                         "replace_2k_token_file": replace_figures(store, data)}
    print(json.dumps(result), flush=True)
    result["at_200k"]["ivf"] = ivf_figures(store, queries)
    result["at_200k"]["replace_2k_token_file_with_ivf"] = replace_figures(store, data)
    print(json.dumps(result), flush=True)
    del store
    gc.collect()

    store = exact_store()
    fill(store, data, sizes, args.total, done)
    store.compact()  # drop the replaced versions' garbage before measuring the disk
    s = store.stats()
    result["at_1m"] = {"entries": s["entries"], "disk_bytes": s["disk_bytes"], "bytes_per_token": s["bytes_per_entry"],
                       "manifest_bytes": (where / "manifest.msgpack").stat().st_size,
                       "files": s["files"], "chunks": s["chunks"], "segments": s["segments"],
                       "exact_search_one_token": search_figures(store, queries, 30),
                       "replace_2k_token_file": replace_figures(store, data)}
    print(json.dumps(result), flush=True)
    reload_s = []
    for _ in range(3):
        del store
        gc.collect()
        t = time.perf_counter()
        store = exact_store()
        reload_s.append(time.perf_counter() - t)
        assert store.stats()["entries"] == result["at_1m"]["entries"]
    result["at_1m"]["reload_s"] = round(statistics.median(reload_s), 2)
    result["at_1m"]["ivf"] = ivf_figures(store, queries)
    result["at_1m"]["replace_2k_token_file_with_ivf"] = replace_figures(store, data)
    result["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result), flush=True)
    del store
    gc.collect()
    np.save(work / "q.npy", queries[:256])
    fresh: dict[str, list] = {"saved_cells": [], "trained": []}
    for _round in range(2):  # alternating: this VM's speed drifts
        for kind, runs in fresh.items():
            if kind == "trained":  # the trained process saves new cells for the next round
                (where / CELLS).unlink()
            child = subprocess.run([sys.executable, __file__, "--rss-child", str(where), str(args.heads),
                                    str(args.dim), str(work / "q.npy")], capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(kind, json.dumps(runs[-1]), flush=True)
    result["at_1m"]["fresh_process"] = fresh
    result["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()

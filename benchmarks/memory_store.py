"""Benchmark of the persistent kNN memory store with real entries and real queries.

Entries are what the shipped model's encode path writes for a repository's Python files;
queries are what its memory layer asks while reading another repository.  Measures, on the
CPU backend: exact search of 8 queries over 200k entries, add/replace of a 2k-token file,
reload of a 1M-entry store, bytes per token on disk at 100k and 1M entries, resident memory
with 1M entries, and the IVF index (build time, recall@32, search time) at 1M.

    python benchmarks/memory_store.py --entries-from /work/evalrepos/pydantic \
        --queries-from /work/evalrepos/flask --out /tmp/memory_store.json
"""

from __future__ import annotations

import argparse
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
import torch
from mtlsp_model.generate import encode_entries, file_tokens
from mtlsp_model.memory import Retrieved
from mtlsp_model.weights import SHIPPED, load_weights

from mtlsp.knn import recall_at_k
from mtlsp.memory import FileUpdate, MemoryStore, NewChunk, StoreOptions
from mtlsp.encode import Encoder
from mtlsp.memory_files import Entries
from mtlsp.retrieval import entries_from_kv


class QueryRecorder:
    """A memory that answers nothing and keeps the queries the model asked."""

    def __init__(self) -> None:
        self.queries: list[np.ndarray] = []

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        B, H, T, D = queries.shape
        self.queries.append(queries.float().reshape(-1, D).numpy().copy())
        shape = (B, H, T, k)
        z = torch.zeros(*shape, D, dtype=queries.dtype)
        return Retrieved(z, z, torch.zeros(shape, dtype=torch.bool))


def python_files(root: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted(root.rglob("*.py")):
        try:
            out.append((str(p.relative_to(root)), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def encode_repo(loaded, root: Path, limit: int) -> list[tuple[str, Entries]]:
    """(path, entries) for files of ``root`` until ``limit`` tokens, each file one chunk."""
    model, tok = loaded.model, loaded.tokenizer
    offsets = Encoder(model, tok).token_offsets
    files, total, t0 = [], 0, time.perf_counter()
    for path, text in python_files(root):
        ids = file_tokens(tok, path, text)[:8192]
        files.append((path, entries_from_kv(encode_entries(model, ids), offsets(ids))))
        total += len(ids)
        if total >= limit:
            break
    print(f"encoded {total} tokens of {len(files)} files in {time.perf_counter() - t0:.0f} s", flush=True)
    return files


def record_queries(loaded, root: Path, n: int) -> np.ndarray:
    rec = QueryRecorder()
    T = loaded.config.seq_len
    with torch.no_grad():
        for path, text in python_files(root):
            ids = file_tokens(loaded.tokenizer, path, text)[:T]
            loaded.model(torch.tensor([ids]), memory=rec)
            if sum(len(q) for q in rec.queries) >= n:
                break
    q = np.concatenate(rec.queries)
    return q[np.random.default_rng(0).permutation(len(q))[:n]]


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def fill(store: MemoryStore, files: list[tuple[str, Entries]], upto: int, done: int) -> int:
    """Add files [done:] until the store holds ``upto`` tokens; returns the new file index."""
    batch, have = [], store.stats()["entries"]
    while done < len(files) and have < upto:
        path, e = files[done]
        e = e.take(0, min(len(e), upto - have))
        batch.append(FileUpdate(path, "1", [NewChunk(0, int(e.offsets[-1]) + 1, "c", e)]))
        have += len(e)
        done += 1
        if len(batch) == 50:
            store.update(batch)
            batch = []
    if batch:
        store.update(batch)
    return done


def rss_child(directory: str, fingerprint: str, dim: int, queries: str) -> None:
    """Run in a fresh process: open the store (default options: the IVF index is built at
    once), search, report resident memory."""
    store = MemoryStore(directory, fingerprint=fingerprint, dim=dim,
                        options=StoreOptions(ann_background=False))
    q = np.load(queries)
    store.search(q[:8], 32)
    status = Path("/proc/self/status").read_text().split("\n")
    get = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    print(json.dumps({"rss_mb": get["VmRSS"] / 1024, "peak_rss_mb": get["VmHWM"] / 1024,
                      "entries": store.stats()["entries"], "backend": store.stats()["backend"]}))


def ivf_figures(store: MemoryStore, queries: np.ndarray) -> dict:
    """Build the IVF index tuned on 256 real queries; recall on the other (held-out) ones."""
    store.options.ann_threshold = 1
    store.options.ann_background = False
    for i in range(0, 256, 8):
        store.search(queries[i : i + 8], 32)  # the recall is tuned on these
    t = time.perf_counter()
    store._build_ann()
    build = time.perf_counter() - t
    held_out = np.ascontiguousarray(queries[256:])
    exact = store._truth.search(held_out, 32)[1]
    approx = store.search(held_out, 32).slots
    a = store.stats()["ann"]
    q8 = np.ascontiguousarray(queries[:8])
    return {
        "nlist": a["nlist"], "nprobe": a["nprobe"], "recall_at_32_tuning": a["recall_at_32"],
        "recall_at_32_held_out": recall_at_k(approx, exact), "build_s": build,
        "search_8_queries_ms": median_ms(lambda: store.search(q8, 32), 50),
    }


def exact_figures(store: MemoryStore, queries: np.ndarray) -> dict:
    q8 = np.ascontiguousarray(queries[:8])
    return {
        "entries": store.stats()["entries"],
        "exact_search_8_queries_ms": median_ms(lambda: store.search(q8, 32), 30),
        "exact_search_1_query_ms": median_ms(lambda: store.search(q8[:1], 32), 30),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries-from", type=Path, required=True)
    ap.add_argument("--queries-from", type=Path, required=True)
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_weights(SHIPPED, device="cpu")
    fp, dim = loaded.fingerprint, loaded.config.head_dim
    files = encode_repo(loaded, args.entries_from, args.total + 4096)
    queries = record_queries(loaded, args.queries_from, 512)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    where = work / "store"
    result: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                    "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                    "entries_from": str(args.entries_from), "queries_from": str(args.queries_from)}

    def exact_store() -> MemoryStore:  # searches the faiss truth: no IVF index
        return MemoryStore(where, fingerprint=fp, dim=dim, options=StoreOptions(ann_threshold=10**12, refresh_interval=3600))

    store = exact_store()
    done = fill(store, files[1:], 100_000, 0) + 1
    s = store.stats()
    result["at_100k"] = {"entries": s["entries"], "disk_bytes": s["disk_bytes"], "bytes_per_token": s["bytes_per_entry"]}
    done = fill(store, files[done:], 200_000, 0) + done
    result["at_200k"] = exact_figures(store, queries)
    # a 2k-token file, replaced by alternating versions (each a full durable commit)
    two_k = [e for _, e in files if len(e) >= 2048][:2]
    versions = [FileUpdate("bench/two_k.py", str(i), [NewChunk(0, 9999, f"v{i}", e.take(0, 2048))]) for i, e in enumerate(two_k)]
    store.update([versions[0]])
    flips = iter(range(1, 10**6))

    def replace(target: MemoryStore) -> None:  # every call stores the other version
        target.update([versions[next(flips) % 2]])

    result["at_200k"]["replace_2k_token_file_ms"] = median_ms(lambda: replace(store), 30)
    result["at_200k"]["ivf"] = ivf_figures(store, queries)
    result["at_200k"]["replace_2k_token_file_with_ivf_ms"] = median_ms(lambda: replace(store), 30)

    store = exact_store()
    fill(store, files[done:], args.total, 0)
    store.compact()  # drop the replaced versions' garbage before measuring the disk
    s = store.stats()
    result["at_1m"] = {"entries": s["entries"], "disk_bytes": s["disk_bytes"], "bytes_per_token": s["bytes_per_entry"],
                       "files": s["files"], "segments": s["segments"]}
    result["at_1m"].update(exact_figures(store, queries))
    result["at_1m"]["replace_2k_token_file_ms"] = median_ms(lambda: replace(store), 30)
    reload_s = []
    for _ in range(3):
        t = time.perf_counter()
        store = exact_store()
        reload_s.append(time.perf_counter() - t)
        assert store.stats()["entries"] == s["entries"]
    result["at_1m"]["reload_s"] = statistics.median(reload_s)
    result["at_1m"]["ivf"] = ivf_figures(store, queries)
    result["at_1m"]["replace_2k_token_file_with_ivf_ms"] = median_ms(lambda: replace(store), 30)
    np.save(work / "q.npy", queries)
    child = subprocess.run([sys.executable, __file__, "--rss-child", str(where), fp, str(dim), str(work / "q.npy")],
                           capture_output=True, text=True, check=True)
    result["at_1m"]["resident"] = json.loads(child.stdout.strip().splitlines()[-1])
    result["bench_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()

"""Benchmark of the workspace indexer with the shipped model.

- full-index throughput (tokens encoded per second, scan and store included) and the peak
  resident memory of the process while indexing a repository of about 1M tokens;
- from a saved edit that adds a new function to a 1,000-line file to that function's entries
  being searchable: through ``Indexer.sync_paths`` alone, and end to end through the watcher;
- scanning a synthetic repository of 20,000 files (no encoding): the walk, and the walk plus
  reading and hashing every file (what a refresh of an up-to-date store does).

    python benchmarks/indexer.py --repo /work/evalrepos/pydantic --out /tmp/indexer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtlsp.index.scan import read_text, walk
from mtlsp.index.watch import Watcher
from mtlsp.process import bound_heap_retention
from mtlsp.store.memory_store import StoreOptions
from mtlsp.workspace import Engine


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thousand_line_file(n_funcs: int = 100) -> str:
    parts = ["import math\nfrom typing import Iterable\n\n"]
    for i in range(n_funcs):
        parts.append(
            f"\n\ndef compute_{i}(values: Iterable[float], scale: float = {i}.0) -> float:\n"
            f'    """Weighted sum number {i}."""\n'
            "    total = 0.0\n"
            "    for v in values:\n"
            f"        total += math.sqrt(abs(v)) * scale + {i}\n"
            "    return total\n"
            "\n"
            f"\nRESULT_{i} = compute_{i}([1.0, 2.0])\n"
        )
    return "".join(parts)


def edit_latency(engine: Engine, work: Path, repeats: int) -> dict:
    """Add a new function to a 1,000-line file, save, wait until a search finds it."""
    ws = work / "edit_ws"
    ws.mkdir()
    text = thousand_line_file()
    (ws / "big.py").write_text(text)
    store, ix = engine.open_memory(ws, cap_tokens=StoreOptions.cap_tokens, cache_root=work / "edit_store")
    store.options.refresh_interval = 3600
    ix.refresh()
    lines = text.count("\n")

    def new_text(i: int) -> str:
        fn = f"\n\ndef freshly_added_{i}(rows):\n    return [r * {i} for r in rows if r]\n"
        cut = text.index("\n\ndef compute_50")
        return text[:cut] + fn + text[cut:]

    direct = []
    for i in range(repeats):
        (ws / "big.py").write_text(new_text(i))
        t = time.perf_counter()
        report = ix.sync_paths(["big.py"])
        direct.append(time.perf_counter() - t)
        assert report.chunks_encoded <= 2, report
    watched = []
    w = Watcher(ix, debounce=0.05)
    w.start()
    try:
        for i in range(repeats, 2 * repeats):
            gen = store.generation
            t = time.perf_counter()
            (ws / "big.py").write_text(new_text(i))
            while store.generation == gen:
                time.sleep(0.002)
            watched.append(time.perf_counter() - t)
    finally:
        w.stop()
    return {
        "file_lines": lines,
        "sync_paths_ms": {"median": 1e3 * statistics.median(direct), "p95": 1e3 * float(np.percentile(direct, 95))},
        "watcher_debounce_50ms_ms": {"median": 1e3 * statistics.median(watched),
                                     "p95": 1e3 * float(np.percentile(watched, 95))},
    }


def scan_20k(work: Path) -> dict:
    root = work / "scan_ws"
    rng = np.random.default_rng(0)
    for i in range(20_000):
        d = root / f"pkg{i % 40}" / f"sub{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod_{i}.py").write_text(f"def f_{i}(x):\n    return x + {int(rng.integers(1000))}\n" * 20)
    (root / ".gitignore").write_text("*.pyc\nbuild/\n")
    t = time.perf_counter()
    found = list(walk(root))
    walk_s = time.perf_counter() - t
    t = time.perf_counter()
    for f in found:
        got = read_text(root, f.path, 1 << 20)
        if got is not None:
            hashlib.blake2b(got[0], digest_size=16).hexdigest()
    read_s = time.perf_counter() - t
    return {"files": len(found), "walk_s": walk_s, "walk_read_hash_s": walk_s + read_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    engine = Engine.load(None, "auto")  # the shipped model in the serving precision, as `mtlsp index` runs it
    bound_heap_retention()  # as `mtlsp index` does
    work = Path(tempfile.mkdtemp(dir=a.workdir))
    result: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores, device {engine.device}",
                    "date": time.strftime("%Y-%m-%d"), "command": f"python benchmarks/indexer.py --repo {a.repo}"}
    # the full index first, so that its peak resident memory is its own
    store, ix = engine.open_memory(a.repo, cap_tokens=10**8, cache_root=work / "repo_store")
    rss_before = peak_rss_mb()
    report = ix.refresh()
    result["full_index"] = {
        "repo": str(a.repo), "files": report.files, "indexed": report.indexed, "skipped": report.skipped,
        "tokens_encoded": report.tokens_encoded, "seconds": report.seconds,
        "tokens_per_s": report.tokens_encoded / report.seconds,
        "store_entries": store.stats()["entries"],
        "peak_rss_mb": peak_rss_mb(), "peak_rss_before_indexing_mb": rss_before,
    }
    store.wait_for_index()
    result["full_index"]["ivf_after"] = store.stats()["ann"]
    result["full_index"]["peak_rss_with_ivf_build_mb"] = peak_rss_mb()
    del store, ix
    result["scan_20k_files"] = scan_20k(work)
    result["edit_to_searchable"] = edit_latency(engine, work, a.repeats)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

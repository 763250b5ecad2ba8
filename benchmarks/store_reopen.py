"""Reopening a real memory store: how long until its IVF indexes serve, with the cells an
earlier build saved (``ivf-cells.bin``) and without them (trained: k-means, assignment,
tuning), and the recall@k each reaches.

Works on a copy of the store (the original is not touched), in fresh processes, alternating the
two ways: this VM's speed drifts.  Recall is measured against exact search on stored keys that
no tuning used (a seeded sample per head), at the k the language server reads (16).

    python benchmarks/store_reopen.py --store ~/.cache/mtlsp/stores/<folder>-<hash> --out X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtlsp.store import knn
from mtlsp.store.cells import CELLS
from mtlsp.store.files import read_manifest
from mtlsp.store.memory_store import MemoryStore, StoreOptions


def child(directory: str, k: int) -> None:
    """One fresh process: open, wait for the IVF indexes, measure their recall; print JSON."""
    manifest = read_manifest(Path(directory))
    t = time.perf_counter()
    store = MemoryStore(directory, fingerprint=manifest["fingerprint"], heads=manifest["heads"], dim=manifest["dim"],
                        options=StoreOptions(ann_k=k, refresh_interval=3600))
    opened = time.perf_counter() - t
    store.wait_for_index()
    serving = time.perf_counter() - t
    search = store._search
    keys = search.keys
    live = keys.live_slots()
    recalls = []
    for h in range(store.heads):
        pick = np.random.default_rng(1000 + h).choice(live, size=256, replace=False)
        q = keys.floats(pick, h)
        exact = knn.top_k(q, keys.codes[h, : keys.used], keys.scales[h, : keys.used], k, keys.alive[: keys.used])[1]
        recalls.append(round(knn.recall_at_k(search.ivf[h].search(q, k)[1], exact), 4))
    ann = store.stats()["ann"]
    print(json.dumps({"entries": store.stats()["entries"], "open_s": round(opened, 2),
                      "ivf_serving_s": round(serving, 2), "restored_heads": ann["restored_heads"],
                      "nprobe": ann["nprobe"], "nlist": ann["nlist"], "recall_held_out": recalls}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a store directory (it is copied)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp()) / "store"
    shutil.copytree(args.store, work)
    cpu = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    result: dict = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {cpu}", "date": time.strftime("%Y-%m-%d %H:%M"),
                    "command": " ".join(sys.argv), "trained": [], "saved_cells": []}
    (work / CELLS).unlink(missing_ok=True)
    for _round in range(args.rounds):
        for kind in ("trained", "saved_cells"):  # a trained process saves the cells the next one reads
            if kind == "trained":
                (work / CELLS).unlink(missing_ok=True)
            out = subprocess.run([sys.executable, __file__, "--child", str(work), str(args.k)],
                                 capture_output=True, text=True, check=True)
            result[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(kind, json.dumps(result[kind][-1]), flush=True)
    result["cells_bytes"] = (work / CELLS).stat().st_size
    shutil.rmtree(work.parent)
    for kind in ("trained", "saved_cells"):
        result[f"{kind}_median_s"] = float(np.median([r["ivf_serving_s"] for r in result[kind]]))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()

"""A separate process that writes a memory store, for the crash-safety and two-writer tests.

``python store_worker.py DIR OPS NAME`` performs update number ``i`` for i up to OPS, resuming
after the last one the store committed (each update records its number in a progress entry, in
the same generation).  Entries are a pure function of (path, version), so a checker can verify
that every file holds exactly the version its manifest record names.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import zlib

import numpy as np

from mtlsp.store.files import Entries
from mtlsp.store.memory_store import FileUpdate, MemoryStore, NewChunk, StoreOptions

HEADS, DIM = 3, 16
FINGERPRINT = "worker-model"


def entries_for(path: str, version: int) -> Entries:
    rng = np.random.default_rng(zlib.crc32(f"{path}@{version}".encode()))
    n = int(rng.integers(1, 300))
    keys = rng.standard_normal((n, HEADS, DIM)) * rng.uniform(0.5, 4.0, (n, HEADS, 1))
    values = rng.standard_normal((n, HEADS, DIM))
    return Entries.from_float(keys, values, rng.integers(0, 49_152, n), np.arange(n) * 4)


def names_for(path: str, version: int, row: int) -> tuple[str, ...]:
    """The names a chunk defines: also a pure function of where it is, so they can be checked."""
    return (f"n{version}_{row}", f"{path.replace('/', '_').replace('.', '_')}_{row}")


def put(path: str, version: int) -> FileUpdate:
    """One file at one version: up to three chunks splitting its entries."""
    e = entries_for(path, version)
    cuts = sorted({0, len(e) // 3, 2 * len(e) // 3, len(e)})
    chunks = []
    for a, b in itertools.pairwise(cuts):
        if b > a:
            part = e.take(a, b)
            part = dataclasses.replace(part, offsets=part.offsets - np.uint32(4 * a))
            chunks.append(NewChunk(4 * a, 4 * b, f"{version}:{a}", part, names_for(path, version, a)))
    return FileUpdate(path, f"v{version}", chunks)


def open_store(directory: str, **options) -> MemoryStore:
    return MemoryStore(directory, fingerprint=FINGERPRINT, heads=HEADS, dim=DIM,
                       options=StoreOptions(refresh_interval=0.0, on_invalid="raise", **options))


def progress(store: MemoryStore, name: str) -> int:
    info = store.file_info(f"progress-{name}")
    return -1 if info is None else int(info.content_hash[1:])


def main(directory: str, ops: int, name: str) -> None:
    store = open_store(directory)
    print("ready", flush=True)  # start-up (imports) is slow: the killer waits for this
    for i in range(progress(store, name) + 1, ops):
        path = f"{name}/f{i % 7}.py"
        removes = [f"{name}/f{(i + 3) % 7}.py"] if i % 5 == 4 else []
        store.update([put(path, i), put(f"progress-{name}", i)], removes)
        if i % 17 == 16:
            store.compact()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])

"""The IVF indexes' cells on disk, so that reopening a large store skips their training.

Training an IVF index is k-means, then assigning every key to its nearest cell, then measuring
recall against exact search to choose ``nprobe``: at 1M tokens about 10 s per head on a 2-core
machine, 36–66 s for four heads, during which every search is an exact scan (150–200 ms per
token).  None of that depends on anything but the keys, which the segments already hold.  So
after each build the store writes ``ivf-cells.bin`` next to its manifest:

- per head: the lifted centroids (nlist x (D+1) float32), the largest key norm they were lifted
  with, and the ``nprobe`` and recall measured for them (270 KB per head at nlist 1,024, D 64);
- per chunk that the indexes held, its id and content hash; and each of its tokens' list numbers,
  one uint16 per head (8 bytes per token at four heads, against 536 for the entry itself).

A reopened store matches chunks by (segment, row, tokens, hash) and puts their keys straight
into their lists; only entries written since (or moved by compaction) are assigned again.
The file is a cache: it is written atomically, and one that is missing, corrupt, or made for
another model, entry shape or recall setting is ignored (the indexes are then trained as
before).  Segment files never change once named, so a matching chunk id and hash means the same
keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from .files import CorruptStore, read_checked, write_checked

CELLS = "ivf-cells.bin"
_MAGIC = b"MTLSPIV1"
_FORMAT = 1


@dataclass(frozen=True)
class HeadCells:
    """One head's trained IVF cells and what was measured on them."""

    centroids: np.ndarray  # (nlist, D + 1) float32, centroids of the lifted keys
    max_norm: float  # the norm M keys were lifted with: x -> (x, sqrt(M^2 - |x|^2))
    nprobe: int
    recall: float
    built_size: int
    build_seconds: float

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]


@dataclass(frozen=True)
class SavedCells:
    """What a store needs to put its keys back into trained IVF lists."""

    heads: list[HeadCells]
    chunks: list[tuple[int, int, int, str]]  # (segment, row, tokens, content hash) in ``lists`` order
    lists: np.ndarray  # (H, tokens) uint16: each token's list number, per head
    k: int  # the recall@k ``nprobe`` was tuned for, and its target
    recall_target: float
    measured_on: str
    changes: int  # entries added or removed since the cells were trained: a rebuild is due at a share


@dataclass(frozen=True)
class Stamp:
    """Whose cells these are: a store of another model or entry shape cannot use them."""

    fingerprint: str
    heads: int
    dim: int


def write_cells(directory: Path, stamp: Stamp, saved: SavedCells) -> None:
    body = msgpack.packb({
        "format": _FORMAT,
        "fingerprint": stamp.fingerprint, "heads": stamp.heads, "dim": stamp.dim,
        "k": saved.k, "recall_target": saved.recall_target, "measured_on": saved.measured_on,
        "changes": saved.changes,
        "cells": [{
            "centroids": np.ascontiguousarray(c.centroids, np.float32).tobytes(), "nlist": c.nlist,
            "max_norm": c.max_norm, "nprobe": c.nprobe, "recall": c.recall,
            "built_size": c.built_size, "build_seconds": c.build_seconds,
        } for c in saved.heads],
        "chunks": [list(c) for c in saved.chunks],
        "lists": np.ascontiguousarray(saved.lists, np.uint16).tobytes(),
    }, use_bin_type=True)
    write_checked(directory / CELLS, _MAGIC, body)


def read_cells(directory: Path, stamp: Stamp) -> SavedCells | None:
    """The saved cells; None if there are none or they belong to another model or entry shape;
    ``CorruptStore`` if the file is damaged."""
    path = directory / CELLS
    body = read_checked(path, _MAGIC, "IVF cells file")
    if body is None:
        return None
    try:
        m = msgpack.unpackb(body, raw=False)
        if m["format"] != _FORMAT or (m["fingerprint"], m["heads"], m["dim"]) != (stamp.fingerprint, stamp.heads, stamp.dim):
            return None
        heads = [HeadCells(
            np.frombuffer(c["centroids"], np.float32).reshape(c["nlist"], stamp.dim + 1),
            float(c["max_norm"]), int(c["nprobe"]), float(c["recall"]), int(c["built_size"]),
            float(c["build_seconds"]),
        ) for c in m["cells"]]
        chunks = [(int(s), int(r), int(t), str(h)) for s, r, t, h in m["chunks"]]
        total = sum(c[2] for c in chunks)
        lists = np.frombuffer(m["lists"], np.uint16).reshape(stamp.heads, total)
        if len(heads) != stamp.heads or any(int(lists[h].max(initial=0)) >= c.nlist for h, c in enumerate(heads)):
            raise ValueError("list numbers do not fit the cells")
        return SavedCells(heads, chunks, lists, int(m["k"]), float(m["recall_target"]), str(m["measured_on"]),
                          int(m["changes"]))
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
        raise CorruptStore(f"{path}: {e}") from e

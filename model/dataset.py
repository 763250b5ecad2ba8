"""Repository-documents to one flat token file, with an index and the corpus manifest.

Layout of a dataset directory:
- ``tokens.bin``: every document's tokens back to back, uint16 (the vocabulary is < 65536);
- ``index.json``: per document its name, token offsets and split (train / val);
- ``manifest.json``: what was included (names, files, bytes, tokens), what was excluded, and
  the roots and seed, so a run can be reproduced and evaluation can refuse trained-on repos.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import Document
from .tokenizer import CodeTokenizer

VAL_EVERY = 50  # about 2% of documents, chosen by name hash, are held out for validation


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename, so a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_val(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % VAL_EVERY == 0


def document_tokens(doc: Document, tok: CodeTokenizer) -> list[int]:
    """A document's token stream: each file behind its ``<|file|>path`` header."""
    bodies = tok.encode_batch([f.text for f in doc.files])
    out: list[int] = []
    for f, body in zip(doc.files, bodies):
        out += tok.file_header(f.path)
        out += body
    return out


def sample_texts(docs: list[Document], budget_bytes: int, seed: int = 0) -> list[str]:
    """A tokenizer-training sample spread over documents, so no single package dominates."""
    files = [f.text for d in docs for f in d.files]
    random.Random(seed).shuffle(files)
    out, used = [], 0
    for text in files:
        if used >= budget_bytes:
            break
        out.append(text)
        used += len(text)
    return out


def write_dataset(
    out: Path,
    docs: list[Document],
    tok: CodeTokenizer,
    *,
    roots: list[str],
    excluded: list[str],
    seed: int,
) -> dict:
    """Tokenize ``docs`` into ``out`` and return the manifest written there."""
    out.mkdir(parents=True, exist_ok=True)
    index, entries, offset = [], [], 0
    if not docs:
        raise ValueError("no documents to write: every root was empty or excluded")
    if not any(not is_val(d.name) for d in docs):
        raise ValueError("every document fell in the validation split; add more roots")
    with open(out / "tokens.bin", "wb") as f:
        for doc in docs:
            ids = np.asarray(document_tokens(doc, tok), dtype=np.uint16)
            f.write(ids.tobytes())
            split = "val" if is_val(doc.name) else "train"
            index.append({"name": doc.name, "start": offset, "end": offset + len(ids), "split": split})
            entries.append(
                {
                    "name": doc.name,
                    "root": doc.root,
                    "split": split,
                    "files": len(doc.files),
                    "bytes": doc.bytes,
                    "tokens": int(len(ids)),
                }
            )
            offset += len(ids)
    manifest = {
        "roots": roots,
        "seed": seed,
        "excluded": sorted(excluded),
        "tokenizer_vocab": tok.vocab_size,
        "totals": {
            "documents": len(entries),
            "files": sum(e["files"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "tokens": offset,
            "train_tokens": sum(e["tokens"] for e in entries if e["split"] == "train"),
        },
        "documents": entries,
    }
    atomic_write(out / "index.json", json.dumps(index).encode())
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    tok.save(out / "tokenizer.json")
    return manifest


@dataclass
class Dataset:
    tokens: np.ndarray  # memory-mapped uint16
    docs: list[tuple[int, int]]  # (start, end) token offsets
    split: list[str]

    def spans(self, split: str) -> list[tuple[int, int]]:
        return [d for d, s in zip(self.docs, self.split) if s == split]


def load_dataset(path: Path) -> Dataset:
    path = Path(path)
    for name in ("tokens.bin", "index.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"dataset file {path / name} is missing; build the corpus first")
    index = json.loads((path / "index.json").read_text())
    tokens = np.memmap(path / "tokens.bin", dtype=np.uint16, mode="r")
    if index and index[-1]["end"] != len(tokens):
        raise ValueError(f"{path / 'tokens.bin'} holds {len(tokens)} tokens, index expects "
                         f"{index[-1]['end']}: the dataset is truncated or stale")
    return Dataset(tokens, [(d["start"], d["end"]) for d in index], [d["split"] for d in index])

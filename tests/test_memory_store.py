"""The persistent kNN memory store, with real faiss indexes and real files in temp dirs."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from mtlsp import knn
from mtlsp.memory import FileUpdate, KeptChunk, MemoryStore, NewChunk, StoreOptions
from mtlsp.memory_files import (
    Entries,
    StoreError,
    WriterLock,
    segment_name,
    store_dir_for,
)

sys.path.insert(0, str(Path(__file__).parent))
import store_worker

DIM = 16
WORKER = Path(__file__).parent / "store_worker.py"


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def entries(rng, n, dim=DIM):
    return Entries.from_float(unit(rng, n, dim), rng.standard_normal((n, dim)), np.arange(n) * 2)


def store_at(path, **options) -> MemoryStore:
    options.setdefault("refresh_interval", 0.0)
    return MemoryStore(path, fingerprint="fp-1", dim=DIM, options=StoreOptions(**options))


def one_chunk(path, e, content="h", start=0):
    return FileUpdate(path, content, [NewChunk(start, start + 2 * len(e), f"{content}:{path}", e)])


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch", "flat-mirror"])
def test_operations_match_brute_force(tmp_path, backend):
    """Random puts / replaces / removes, each search checked against numpy brute force."""
    rng = np.random.default_rng(1)
    store = store_at(tmp_path, backend="torch" if backend == "torch" else "faiss-cpu", device="cpu")
    if backend == "flat-mirror":  # the faiss-GPU mirror's logic, over a CPU flat index
        store._mirror = knn.FlatMirror(lambda: faiss.IndexFlatIP(DIM), "cpu flat mirror")
        store._mirror.max_hidden = 50
    reference: dict[str, Entries] = {}
    for step in range(60):
        path = f"f{rng.integers(8)}.py"
        if path in reference and rng.random() < 0.25:
            store.remove_files([path])
            del reference[path]
        else:
            e = entries(rng, int(rng.integers(1, 120)))
            store.update([one_chunk(path, e, f"v{step}")])
            reference[path] = e
        q = unit(rng, 5).astype(np.float32)
        hits = store.search(q, 8)
        if not reference:
            assert not hits.mask.any()
            continue
        keys = np.concatenate([reference[p].keys for p in sorted(reference)]).astype(np.float32)
        expect = np.sort(q @ keys.T, axis=1)[:, ::-1][:, :8]
        got = hits.scores[:, : expect.shape[1]]
        np.testing.assert_allclose(got, expect, atol=1e-5)
        # every hit's key/value/source is the stored entry it claims to be
        for i in range(5):
            for j in np.flatnonzero(hits.mask[i]):
                path_j, offset = hits.source(i, j)
                row = offset // 2
                np.testing.assert_array_equal(hits.keys[i, j], reference[path_j].keys[row].astype(np.float32))
                np.testing.assert_allclose(hits.values[i, j], reference[path_j].float_values()[row], rtol=1e-6)
    assert store.stats()["entries"] == sum(len(e) for e in reference.values())


def test_values_quantised_within_half_a_step():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, DIM)) * 3
    e = Entries.from_float(unit(rng, 50), v, np.zeros(50))
    step = np.abs(v).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(e.float_values() - v) <= 0.51 * step + 1e-3 * np.abs(v))


def test_kept_chunks_reuse_entries_and_move(tmp_path):
    rng = np.random.default_rng(2)
    store = store_at(tmp_path)
    a, b = entries(rng, 10), entries(rng, 6)
    store.update([FileUpdate("m.py", "1", [NewChunk(0, 20, "A", a), NewChunk(20, 32, "B", b)])])
    c = entries(rng, 4)
    # a new function inserted before B: A kept, B kept but 8 bytes later
    store.update([FileUpdate("m.py", "2", [KeptChunk(0, 20, "A"), NewChunk(20, 28, "C", c), KeptChunk(28, 40, "B")])])
    got = store.entries_of("m.py")
    np.testing.assert_array_equal(got.keys, np.concatenate([a.keys, c.keys, b.keys]))
    hits = store.search(b.keys[:1].astype(np.float32), 1)
    assert hits.source(0, 0) == ("m.py", 28)
    assert store.stats()["segments"] == 2 and store.stats()["garbage_rows"] == 0
    with pytest.raises(StoreError, match="no stored chunk"):
        store.update([FileUpdate("m.py", "3", [KeptChunk(0, 5, "nope")])])
    assert store.file_info("m.py").content_hash == "2"


def test_replacement_is_atomic_for_searchers(tmp_path):
    """A searcher racing with replacements sees one version of the file, never a mix."""
    store = store_at(tmp_path)
    n, versions = 64, 120
    direction = np.zeros((n, DIM))
    direction[:, 0] = 1

    def version(v):
        values = np.zeros((n, DIM))
        values[:, 1] = v  # int8 with a per-entry scale of v: exact
        return FileUpdate("x.py", str(v), [NewChunk(0, n, "c", Entries.from_float(direction, values, np.arange(n)))])

    store.update([version(1)])
    seen, done = [], threading.Event()

    def search():
        q = direction[:1].astype(np.float32)
        while not done.is_set():
            hits = store.search(q, n)
            seen.append(set(np.round(hits.values[0, :, 1]).tolist()))

    t = threading.Thread(target=search)
    t.start()
    try:
        for v in range(2, versions):
            store.update([version(v)])
    finally:
        done.set()
        t.join()
    assert len(seen) > 10
    assert all(len(s) == 1 for s in seen), [s for s in seen if len(s) != 1][:3]


def test_eviction_order(tmp_path):
    rng = np.random.default_rng(3)
    store = store_at(tmp_path, cap_tokens=100)
    for name in "abc":
        store.update([one_chunk(f"{name}.py", entries(rng, 30))])
    store.open_files = {"a.py"}  # oldest, but open: evicted last
    store.update([one_chunk("d.py", entries(rng, 30))])
    assert sorted(store.files()) == ["a.py", "c.py", "d.py"]
    store.update([one_chunk("e.py", entries(rng, 30))])
    assert sorted(store.files()) == ["a.py", "d.py", "e.py"]
    store.update([one_chunk("a.py", entries(rng, 30), "a2")])  # editing refreshes its age
    store.open_files = set()
    store.update([one_chunk("f.py", entries(rng, 30))])
    assert sorted(store.files()) == ["a.py", "e.py", "f.py"]
    assert store.stats()["entries"] == 90
    with pytest.raises(StoreError, match="exceed the memory cap"):
        store.update([one_chunk("huge.py", entries(rng, 101))])
    assert sorted(store.files()) == ["a.py", "e.py", "f.py"]  # refused input lost nothing


def test_bad_input_is_refused_and_loses_nothing(tmp_path):
    rng = np.random.default_rng(4)
    store = store_at(tmp_path)
    store.update([one_chunk("ok.py", entries(rng, 5))])
    with pytest.raises(StoreError, match="relative"):
        store.update([one_chunk("/abs.py", entries(rng, 5))])
    with pytest.raises(StoreError, match="dims"):
        store.update([one_chunk("d.py", entries(rng, 5, dim=8))])
    with pytest.raises(StoreError, match="NaN"):
        Entries.from_float(np.full((2, DIM), np.nan), np.zeros((2, DIM)), np.zeros(2))
    with pytest.raises(StoreError, match="unknown memory backend"):
        store_at(tmp_path / "other", backend="annoy")
    assert list(store.files()) == ["ok.py"] and store_at(tmp_path).generation == 1


def test_fingerprint_mismatch_is_refused_and_rebuilt(tmp_path):
    rng = np.random.default_rng(5)
    store_at(tmp_path).update([one_chunk("a.py", entries(rng, 9))])
    with pytest.raises(StoreError, match="built by model fp-1"):
        MemoryStore(tmp_path, fingerprint="fp-2", dim=DIM, options=StoreOptions(on_invalid="raise"))
    other = MemoryStore(tmp_path, fingerprint="fp-2", dim=DIM)
    assert "built by model fp-1" in other.reset_reason
    assert other.stats()["entries"] == 0 and not other.files()
    assert not list(tmp_path.glob("seg-*"))  # the old entries are gone, never mixed in
    again = MemoryStore(tmp_path, fingerprint="fp-2", dim=DIM)
    assert again.reset_reason is None
    with pytest.raises(StoreError, match="built by model fp-2"):
        MemoryStore(tmp_path, fingerprint="fp-1", dim=DIM, options=StoreOptions(on_invalid="raise"))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupt_manifest_is_refused_and_rebuilt(tmp_path, damage):
    rng = np.random.default_rng(6)
    store_at(tmp_path).update([one_chunk("a.py", entries(rng, 9))])
    manifest = tmp_path / "manifest.msgpack"
    data = manifest.read_bytes()
    manifest.write_bytes({"garbage": os.urandom(len(data)), "truncate": data[: len(data) // 2], "empty": b""}[damage])
    store = store_at(tmp_path)
    assert "corrupt" in store.reset_reason
    assert store.stats()["entries"] == 0
    store.update([one_chunk("b.py", entries(rng, 3))])
    assert list(store_at(tmp_path).files()) == ["b.py"]


def test_corrupt_segment_drops_only_its_files(tmp_path):
    rng = np.random.default_rng(7)
    store = store_at(tmp_path)
    store.update([one_chunk("a.py", entries(rng, 9))])
    store.update([one_chunk("b.py", entries(rng, 7))])
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    again = store_at(tmp_path)
    assert list(again.files()) == ["a.py"] and again.dropped_files == {"b.py"}
    assert again.stats()["entries"] == 9
    (tmp_path / segment_name(0)).unlink()  # a missing segment counts as damage too
    third = store_at(tmp_path)
    assert not third.files() and third.dropped_files == {"a.py"}


def test_readers_see_new_generations(tmp_path):
    rng = np.random.default_rng(8)
    writer, reader = store_at(tmp_path), store_at(tmp_path)
    e = entries(rng, 12)
    writer.update([one_chunk("new.py", e)])
    hits = reader.search(e.keys[:1].astype(np.float32), 1)
    assert hits.source(0, 0) == ("new.py", 0) and reader.generation == writer.generation
    writer.remove_files(["new.py"])
    assert not reader.search(e.keys[:1].astype(np.float32), 1).mask.any()
    # a reader that is also a writer first catches up, so nothing the other wrote is lost
    reader.update([one_chunk("r.py", entries(rng, 3))])
    writer.update([one_chunk("w.py", entries(rng, 3))])
    assert sorted(store_at(tmp_path).files()) == ["r.py", "w.py"]


def test_compaction_reclaims_space_and_keeps_results(tmp_path):
    rng = np.random.default_rng(9)
    store = store_at(tmp_path)
    batch = [one_chunk(f"f{i}.py", entries(rng, 50)) for i in range(10)]
    store.update(batch)  # one segment holding ten files
    for i in range(0, 10, 2):
        store.update([one_chunk(f"f{i}.py", entries(rng, 50), "v2")])
    q = unit(rng, 4).astype(np.float32)
    before = store.search(q, 10)
    assert store.stats()["garbage_rows"] == 250
    disk = store.stats()["disk_bytes"]
    store.compact()
    after = store.search(q, 10)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert [after.source(0, j) for j in range(10)] == [before.source(0, j) for j in range(10)]
    s = store.stats()
    assert s["garbage_rows"] == 0 and s["tombstones"] == 0 and s["disk_bytes"] < disk
    reloaded = store_at(tmp_path)
    np.testing.assert_array_equal(reloaded.search(q, 10).scores, after.scores)


def test_clear_empties_but_keeps_the_store(tmp_path):
    rng = np.random.default_rng(10)
    store = store_at(tmp_path)
    store.update([one_chunk("a.py", entries(rng, 5))])
    g = store.clear()
    assert store.stats()["entries"] == 0 and not list(tmp_path.glob("seg-*"))
    assert store_at(tmp_path).generation == g


def test_approximate_index_recall_is_measured(tmp_path):
    """Above the threshold a CPU store searches an IVF index tuned to the recall target."""
    rng = np.random.default_rng(11)
    centres = unit(rng, 40)
    store = store_at(tmp_path, ann_threshold=20_000, ann_background=False, ann_recall=0.9)
    for i in range(6):
        x = centres[rng.integers(40, size=4000)] + 0.3 * rng.standard_normal((4000, DIM)) / np.sqrt(DIM)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.update([one_chunk(f"f{i}.py", Entries.from_float(x, x, np.arange(4000)))])
    s = store.stats()
    assert s["ann"] is not None and s["ann"]["in_use"] and s["backend"] == "faiss-cpu ivf"
    assert s["ann"]["recall_at_32"] >= 0.9
    q = (centres[rng.integers(40, size=100)] + 0.3 * rng.standard_normal((100, DIM)) / np.sqrt(DIM)).astype(np.float32)
    approx = store.search(q, 32).slots
    exact = store._truth.search(q, 32)[1]
    assert knn.recall_at_k(approx, exact) >= 0.85  # fresh queries, not the tuning ones
    store.remove_files(["f0.py"])  # tombstoned entries never come back from the IVF index
    assert all(p != "f0.py" for p in (store.search(q, 32).source(0, j)[0] for j in range(32)))


def test_private_store_directory_keyed_by_resolved_path(tmp_path):
    ws = tmp_path / "proj"
    ws.mkdir()
    (tmp_path / "link").symlink_to(ws)
    assert store_dir_for(ws, tmp_path / "cache") == store_dir_for(tmp_path / "link", tmp_path / "cache")
    assert store_dir_for(ws, tmp_path / "cache") != store_dir_for(tmp_path, tmp_path / "cache")
    store = MemoryStore.open(ws, fingerprint="fp", dim=DIM, cache_root=tmp_path / "cache")
    store.update([one_chunk("a.py", entries(np.random.default_rng(0), 4))])
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    for f in store.dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert store.stats()["workspace"] == str(ws.resolve())


def test_busy_store_times_out_with_a_clear_error(tmp_path):
    store = store_at(tmp_path, lock_timeout=0.2)
    # another writer: a second descriptor's flock conflicts just as another process's does
    with WriterLock(tmp_path, 1.0), pytest.raises(StoreError, match="another process"):
        store.update([one_chunk("a.py", entries(np.random.default_rng(0), 4))])
    store.update([one_chunk("a.py", entries(np.random.default_rng(0), 4))])


def check_consistent(directory) -> int:
    """Open a store as a fresh process would and verify every file against its version."""
    store = store_worker.open_store(str(directory))
    for path, info in store.files().items():
        want = store_worker.entries_for(path, int(info.content_hash[1:]))
        got = store.entries_of(path)
        np.testing.assert_array_equal(got.keys, want.keys, err_msg=path)
        np.testing.assert_array_equal(got.values, want.values, err_msg=path)
    assert store.stats()["entries"] == sum(i.tokens for i in store.files().values())
    return store.generation


def test_killed_writer_leaves_a_consistent_generation(tmp_path):
    """SIGKILL a writing process at random instants; every reload is one whole generation."""
    ops, kills, rnd = 70, 0, random.Random(12)
    generations = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), str(ops), "w"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rnd.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        generations.append(check_consistent(tmp_path))
        if store_worker.progress(store_worker.open_store(str(tmp_path)), "w") == ops - 1 and kills >= 8:
            break
    assert store_worker.progress(store_worker.open_store(str(tmp_path)), "w") == ops - 1
    assert kills >= 8 and generations == sorted(generations)


def test_two_processes_writing_at_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "30", name], stdout=subprocess.DEVNULL)
             for name in ("p", "q")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    store = store_worker.open_store(str(tmp_path))
    assert store_worker.progress(store, "p") == 29 and store_worker.progress(store, "q") == 29
    assert {p.split("/")[0] for p in store.files()} == {"p", "q", "progress-p", "progress-q"}
    check_consistent(tmp_path)
    assert store.generation >= 60  # no update overwrote another's generation


def test_store_memory_feeds_the_model(tmp_path, tok, tiny_cfg):
    """The model reads a store exactly as it reads the training memory with the same entries."""
    from mtlsp_model.memory import TensorMemory
    from mtlsp_model.model import MemorizingTransformer

    from mtlsp.retrieval import StoreMemory, entries_from_kv

    torch.manual_seed(0)
    model = MemorizingTransformer(tiny_cfg).eval()
    with torch.no_grad():
        model.blocks[tiny_cfg.memory_layer].attn.gate.fill_(3.0)
    store = MemoryStore(tmp_path, fingerprint="tiny", dim=tiny_cfg.head_dim, options=StoreOptions(refresh_interval=0))
    ids = tok.encode("def area(width, height):\n    return width * height\n")[: tiny_cfg.seq_len]
    kv, _ = model.encode(torch.tensor([ids]))
    e = entries_from_kv(kv, np.arange(len(ids)))
    store.update([FileUpdate("geo.py", "1", [NewChunk(0, 50, "c", e)])])
    reference = TensorMemory(1, len(ids), 1, tiny_cfg.head_dim)
    reference.add(torch.from_numpy(e.keys.astype(np.float32))[None, None],
                  torch.from_numpy(e.float_values())[None, None])
    x = torch.tensor([tok.encode("x = area(")])
    with torch.no_grad():
        from_store = model(x, memory=StoreMemory(store)).logits
        from_tensor = model(x, memory=reference).logits
        without = model(x).logits
    torch.testing.assert_close(from_store, from_tensor, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(from_store, without, atol=1e-3)


def test_shipped_model_reads_a_reloaded_store(tmp_path):
    """End to end with the shipped weights: a sample workspace written to a store, reopened
    as a fresh process would, answers the model as its in-RAM training memory does."""
    from mtlsp_model.generate import encode_entries, file_tokens, memorize
    from mtlsp_model.weights import load_weights

    from mtlsp.encode import Encoder
    from mtlsp.retrieval import StoreMemory, entries_from_kv

    loaded = load_weights()
    model, tok = loaded.model, loaded.tokenizer
    sample = Path(__file__).resolve().parent.parent / "model" / "sample_workspace"
    files = [(p.relative_to(sample).as_posix(), p.read_text()) for p in sorted(sample.rglob("*.py"))]
    store = MemoryStore.open(sample, fingerprint=loaded.fingerprint, dim=loaded.config.head_dim,
                             directory=tmp_path)
    offsets = Encoder(model, tok).token_offsets
    puts = []
    for path, text in files:
        ids = file_tokens(tok, path, text)
        e = entries_from_kv(encode_entries(model, ids), offsets(ids))
        puts.append(FileUpdate(path, "h", [NewChunk(0, len(text.encode()), "c", e)]))
    store.update(puts)
    reopened = MemoryStore(tmp_path, fingerprint=loaded.fingerprint, dim=loaded.config.head_dim)
    memory = StoreMemory(reopened)
    prefix = tok.file_header("app/new.py") + tok.encode("from app import pricing\n\nx = pricing.")
    x = torch.tensor([prefix])
    with torch.no_grad():
        from_store = model(x, memory=memory).logits[0, -1]
        from_ram = model(x, memory=memorize(model, tok, files)).logits[0, -1]
    # int8 values: tiny differences, the same ranking
    assert (from_store - from_ram).abs().max() < 0.05
    assert from_store.topk(5).indices.tolist() == from_ram.topk(5).indices.tolist()
    sources = {memory.last.source(0, j)[0] for j in range(32) if memory.last.mask[0, j]}
    assert sources <= {p for p, _ in files} and sources

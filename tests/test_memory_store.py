"""The persistent kNN memory store, with real faiss indexes and real files in temp dirs.

Entries have three memory heads of 16 dimensions, keys of varying norms, as the model's raw
attention keys are; every search is checked against numpy over the dequantised keys.
"""

from __future__ import annotations

import dataclasses
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
import msgpack
import numpy as np
import pytest

from mtlsp.store import cells, knn
from mtlsp.store.files import (
    ChunkRecord,
    Entries,
    StoreError,
    WriterLock,
    bytes_per_token,
    quantize,
    read_manifest,
    segment_name,
    store_dir_for,
)
from mtlsp.store.memory_store import (
    FileUpdate,
    KeptChunk,
    MemoryStore,
    NewChunk,
    StoreOptions,
)

sys.path.insert(0, str(Path(__file__).parent))
import store_worker

HEADS, DIM = 3, 16
WORKER = Path(__file__).parent / "store_worker.py"


def keys_like(rng, n, heads=HEADS, dim=DIM):
    """Raw attention keys: not unit-norm, each head its own range of magnitudes."""
    scale = rng.uniform(0.5, 2.0, (n, heads, 1)) * (1.0 + np.arange(heads))[:, None]
    return rng.standard_normal((n, heads, dim)) * scale


def entries(rng, n, heads=HEADS, dim=DIM):
    return Entries.from_float(keys_like(rng, n, heads, dim), rng.standard_normal((n, heads, dim)),
                              rng.integers(0, 49_152, n), np.arange(n) * 2)


def queries(rng, nq):
    return rng.standard_normal((HEADS, nq, DIM)).astype(np.float32)


def store_at(path, heads=HEADS, dim=DIM, **options) -> MemoryStore:
    options.setdefault("refresh_interval", 0.0)
    return MemoryStore(path, fingerprint="fp-1", heads=heads, dim=dim, options=StoreOptions(**options))


def one_chunk(path, e, content="h", start=0, names=()):
    return FileUpdate(path, content, [NewChunk(start, start + 2 * len(e), f"{content}:{path}", e, names)])


def shifted(e: Entries, by: int) -> Entries:
    return dataclasses.replace(e, offsets=e.offsets - np.uint32(by))


def brute_force(q, keys, k):
    """Per head, the k best inner products of q (H, nq, D) with float keys (n, H, D)."""
    scores = np.einsum("hqd,nhd->hqn", q, keys)
    return np.sort(scores, axis=2)[..., ::-1][..., :k]


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch", "flat-mirror"])
def test_operations_match_brute_force(tmp_path, backend):
    """Random puts / replaces / removes, each search checked against numpy brute force."""
    rng = np.random.default_rng(1)
    store = store_at(tmp_path, backend="torch" if backend == "torch" else "faiss-cpu", device="cpu")
    if backend == "flat-mirror":  # the faiss-GPU mirror's logic, over CPU flat indexes
        store._search.mirror = knn.FlatMirror(lambda: faiss.IndexFlatIP(DIM), HEADS, "cpu flat mirror")
        store._search.mirror.max_hidden = 50
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
        q = queries(rng, 5)
        hits = store.search(q, 8)
        assert hits.scores.shape == hits.slots.shape == hits.tokens.shape == (HEADS, 5, 8)
        assert hits.keys.shape == hits.values.shape == (HEADS, 5, 8, DIM)
        if not reference:
            assert not hits.mask.any()
            continue
        keys = np.concatenate([reference[p].float_keys() for p in sorted(reference)])
        expect = brute_force(q, keys, 8)
        np.testing.assert_allclose(hits.scores[..., : expect.shape[2]], expect, rtol=1e-5, atol=1e-4)
        some = store.search(q[[2, 0]], 8, heads=[2, 0])  # a subset of the heads, in any order
        np.testing.assert_allclose(some.scores, hits.scores[[2, 0]], rtol=1e-6)
        np.testing.assert_array_equal(some.values, hits.values[[2, 0]])
        # every hit's key/value/token/source is head h of the stored entry it claims to be
        for h, i, j in zip(*np.nonzero(hits.mask)):
            path_j, offset = hits.source(h, i, j)
            row = offset // 2
            e = reference[path_j]
            np.testing.assert_array_equal(hits.keys[h, i, j], e.float_keys()[row, h])
            np.testing.assert_array_equal(hits.values[h, i, j], e.float_values()[row, h])
            assert hits.tokens[h, i, j] == e.tokens[row]
            assert hits.slots[h, i, j] in store._chunk_slots[store._m["files"][path_j]["chunks"][0].id]
    assert store.stats()["entries"] == sum(len(e) for e in reference.values())


def test_heads_are_searched_independently(tmp_path):
    """A key planted in head 2 only is found by head 2's queries only."""
    rng = np.random.default_rng(2)
    store = store_at(tmp_path)
    background = entries(rng, 300)
    planted = keys_like(rng, 1)
    target = np.zeros(DIM)
    target[3] = 1.0
    planted[0, 2] = 50 * target  # far above anything else along that direction, head 2 only
    store.update([one_chunk("noise.py", background),
                  one_chunk("planted.py", Entries.from_float(planted, rng.standard_normal((1, HEADS, DIM)), [7], [0]))])
    q = np.zeros((HEADS, 1, DIM), np.float32)
    q[:, 0] = target
    hits = store.search(q, 1)
    assert [hits.source(h, 0, 0)[0] for h in range(HEADS)] == ["noise.py", "noise.py", "planted.py"]
    assert hits.tokens[2, 0, 0] == 7 and hits.scores[2, 0, 0] == pytest.approx(50, rel=1e-2)
    one = store.search_head(2, q[2], 1)
    assert one.scores.shape == (1, 1, 1) and store.path_of(int(one.file_ids[0, 0, 0])) == "planted.py"
    assert [store.search_head(h, q[h], 1).source(0, 0, 0)[0] for h in (0, 1)] == ["noise.py", "noise.py"]
    empty = store.search(np.zeros((HEADS, 0, DIM), np.float32), 4)
    assert empty.scores.shape == (HEADS, 0, 4) and empty.keys.shape == (HEADS, 0, 4, DIM)
    # the same slot in every head: one slot is one token
    slot = hits.slots[2, 0, 0]
    wide = store.search(np.repeat(q, 1, axis=1), 301)
    for h in range(HEADS):
        assert slot in wide.slots[h]
    np.testing.assert_allclose(wide.scores, brute_force(q, np.concatenate([background.float_keys(), Entries.from_float(
        planted, np.zeros((1, HEADS, DIM)), [7], [0]).float_keys()]), 301), rtol=1e-5, atol=1e-4)


def test_keys_and_values_quantised_within_half_a_step():
    rng = np.random.default_rng(0)
    k, v = keys_like(rng, 50) * 3, rng.standard_normal((50, HEADS, DIM)) * 3
    e = Entries.from_float(k, v, np.arange(50), np.zeros(50))
    for x, back in ((k, e.float_keys()), (v, e.float_values())):
        step = np.abs(x).max(axis=2, keepdims=True) / 127
        assert np.all(np.abs(back - x) <= 0.51 * step + 1e-3 * np.abs(x))
    assert e.keys.dtype == e.values.dtype == np.int8 and e.key_scales.dtype == np.float16
    assert e.tokens.dtype == np.uint32 and e.key_scales.shape == (50, HEADS)


def test_tokens_and_names_round_trip(tmp_path):
    """Token ids and each chunk's defined names survive a reload; a kept chunk keeps its names."""
    rng = np.random.default_rng(3)
    store = store_at(tmp_path)
    a, b = entries(rng, 10), entries(rng, 6)
    store.update([FileUpdate("m.py", "1", [NewChunk(0, 20, "A", a, ("alpha", "Beta")),
                                           NewChunk(20, 32, "B", b, ("gamma", "alpha"))]),
                  one_chunk("n.py", entries(rng, 4))])
    names = store.names()
    assert names == {"m.py": ["alpha", "Beta", "gamma"], "n.py": []}
    assert store.names() is names  # cached until the next generation
    c = entries(rng, 4)
    store.update([FileUpdate("m.py", "2", [KeptChunk(0, 20, "A"), NewChunk(20, 28, "C", c, ("delta",)),
                                           KeptChunk(28, 40, "B")])])
    assert store.names()["m.py"] == ["alpha", "Beta", "delta", "gamma"]
    reloaded = store_at(tmp_path)
    assert reloaded.names() == store.names()
    assert [ch.names for ch in reloaded.file_info("m.py").chunks] == [("alpha", "Beta"), ("delta",), ("gamma", "alpha")]
    got = reloaded.entries_of("m.py")
    np.testing.assert_array_equal(got.tokens, np.concatenate([a.tokens, c.tokens, b.tokens]))
    reloaded.compact()  # compaction moves chunks: their names move with them
    assert store_at(tmp_path).names() == store.names()
    # the manifest holds named records, one msgpack array each
    rec = read_manifest(tmp_path)["files"]["m.py"]["chunks"][1]
    assert isinstance(rec, ChunkRecord) and rec.names == ("delta",) and rec.tokens == 4
    with pytest.raises(StoreError, match="names must be strings"):
        store.update([one_chunk("x.py", entries(rng, 2), names=(3,))])


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
    np.testing.assert_array_equal(got.value_scales, np.concatenate([a.value_scales, c.value_scales, b.value_scales]))
    hits = store.search(np.broadcast_to(b.float_keys()[:1].transpose(1, 0, 2), (HEADS, 1, DIM)), 1)
    assert hits.source(0, 0, 0) == ("m.py", 28)
    assert store.stats()["segments"] == 2 and store.stats()["garbage_rows"] == 0
    with pytest.raises(StoreError, match="no stored chunk"):
        store.update([FileUpdate("m.py", "3", [KeptChunk(0, 5, "nope")])])
    assert store.file_info("m.py").content_hash == "2"
    assert len(list(tmp_path.glob("seg-*"))) == 2  # the refused update wrote nothing


def test_replacement_is_atomic_for_searchers(tmp_path):
    """A searcher racing with replacements sees one version of the file, never a mix."""
    store = store_at(tmp_path)
    n, versions = 64, 120
    direction = np.zeros((n, HEADS, DIM))
    direction[..., 0] = 1

    def version(v):
        values = np.zeros((n, HEADS, DIM))
        values[..., 1] = v  # int8 with a per-entry scale of v: exact
        e = Entries.from_float(direction, values, np.full(n, v), np.arange(n))
        return FileUpdate("x.py", str(v), [NewChunk(0, n, "c", e)])

    store.update([version(1)])
    seen, done = [], threading.Event()

    def search():
        q = np.ascontiguousarray(direction[:1].transpose(1, 0, 2), dtype=np.float32)
        while not done.is_set():
            hits = store.search(q, n)
            seen.append(set(np.round(hits.values[..., 1]).ravel().tolist()) | set(hits.tokens.ravel().tolist()))

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
    assert sorted(store.evicted()) == ["b.py", "c.py", "d.py"]
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
    with pytest.raises(StoreError, match="2 heads"):
        store.update([one_chunk("d.py", entries(rng, 5, heads=2))])
    with pytest.raises(StoreError, match="NaN"):
        Entries.from_float(np.full((2, HEADS, DIM), np.nan), np.zeros((2, HEADS, DIM)), np.zeros(2), np.zeros(2))
    with pytest.raises(StoreError, match=r"keys \(n, H, D\)"):
        Entries.from_float(np.zeros((2, DIM)), np.zeros((2, DIM)), np.zeros(2), np.zeros(2))
    with pytest.raises(StoreError, match="token ids must fit"):
        Entries.from_float(np.zeros((1, HEADS, DIM)), np.zeros((1, HEADS, DIM)), [-1], [0])
    with pytest.raises(StoreError, match="fp16"):
        Entries.from_float(np.full((1, HEADS, DIM), 1e6), np.zeros((1, HEADS, DIM)), [0], [0])
    with pytest.raises(StoreError, match="queries must be shaped"):
        store.search(np.zeros((HEADS - 1, 1, DIM), np.float32), 3)
    with pytest.raises(StoreError, match="unknown memory backend"):
        store_at(tmp_path / "other", backend="annoy")
    assert list(store.files()) == ["ok.py"] and store_at(tmp_path).generation == 1


@pytest.mark.parametrize("other", [{"fingerprint": "fp-2"}, {"heads": HEADS + 1}, {"dim": DIM // 2}])
def test_other_model_or_entry_shape_is_refused_and_rebuilt(tmp_path, other):
    rng = np.random.default_rng(5)
    store_at(tmp_path).update([one_chunk("a.py", entries(rng, 9))])
    kwargs = {"fingerprint": "fp-1", "heads": HEADS, "dim": DIM} | other
    with pytest.raises(StoreError, match=f"built by model fp-1 \\(entries of {HEADS} heads x {DIM} dims\\)"):
        MemoryStore(tmp_path, **kwargs, options=StoreOptions(on_invalid="raise"))
    rebuilt = MemoryStore(tmp_path, **kwargs)
    assert "built by model fp-1" in rebuilt.reset_reason
    assert rebuilt.stats()["entries"] == 0 and not rebuilt.files()
    assert not list(tmp_path.glob("seg-*"))  # the old entries are gone, never mixed in
    again = MemoryStore(tmp_path, **kwargs)
    assert again.reset_reason is None
    with pytest.raises(StoreError, match="not by fp-1"):
        store_at(tmp_path, on_invalid="raise")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "old format"])
def test_corrupt_manifest_is_refused_and_rebuilt(tmp_path, damage):
    rng = np.random.default_rng(6)
    store_at(tmp_path).update([one_chunk("a.py", entries(rng, 9))])
    manifest = tmp_path / "manifest.msgpack"
    data = manifest.read_bytes()
    if damage == "old format":  # a store written before memory heads: refused, not misread
        from mtlsp.store.files import write_manifest
        body = msgpack.unpackb(data[12:], strict_map_key=False)
        write_manifest(tmp_path, dict(body, format=1))
    else:
        manifest.write_bytes({"garbage": os.urandom(len(data)), "truncate": data[: len(data) // 2], "empty": b""}[damage])
    store = store_at(tmp_path)
    assert "corrupt" in store.reset_reason
    if damage == "old format":
        assert "format 1" in store.reset_reason
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


def test_segment_header_records_the_entry_shape(tmp_path):
    from mtlsp.store.files import CorruptStore, read_segment
    rng = np.random.default_rng(8)
    e = entries(rng, 5)
    store_at(tmp_path).update([one_chunk("a.py", e)])
    got = read_segment(tmp_path, 0, HEADS, DIM)
    for x, y in zip(got.arrays(), e.arrays()):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CorruptStore, match=f"{HEADS} heads x {DIM} dims"):
        read_segment(tmp_path, 0, HEADS + 1, DIM)


def test_large_updates_are_split_into_segments(tmp_path):
    rng = np.random.default_rng(8)
    store = store_at(tmp_path, segment_rows=100)
    files = {f"f{i}.py": entries(rng, 40) for i in range(7)}
    store.update([one_chunk(p, e) for p, e in files.items()])
    assert store.stats()["segments"] == 3  # 120, 120, 40 rows: chunks are never split
    reloaded = store_at(tmp_path)
    for p, e in files.items():
        np.testing.assert_array_equal(reloaded.entries_of(p).keys, e.keys)


def test_readers_see_new_generations(tmp_path):
    rng = np.random.default_rng(8)
    writer, reader = store_at(tmp_path), store_at(tmp_path)
    e = entries(rng, 12)
    writer.update([one_chunk("new.py", e, names=("fresh_name",))])
    q = np.ascontiguousarray(e.float_keys()[:1].transpose(1, 0, 2))
    hits = reader.search(q, 1)
    assert hits.source(1, 0, 0) == ("new.py", 0) and reader.generation == writer.generation
    writer.remove_files(["new.py"])
    assert reader.names() == {}
    assert not reader.search(q, 1).mask.any()
    # a reader that is also a writer first catches up, so nothing the other wrote is lost
    reader.update([one_chunk("r.py", entries(rng, 3))])
    writer.update([one_chunk("w.py", entries(rng, 3))])
    assert sorted(store_at(tmp_path).files()) == ["r.py", "w.py"]


def test_a_store_read_from_disk_has_room_for_the_first_edits(tmp_path):
    """Opening a store leaves slots to spare, so that an editor's first edit writes into them
    instead of copying every array to a larger one."""
    rng = np.random.default_rng(12)
    store_at(tmp_path).update([one_chunk(f"f{i}.py", entries(rng, 3000)) for i in range(3)])
    store = store_at(tmp_path)
    assert store.stats()["entries"] == 9000
    arrays = (store._values, store._tokens, store._search.keys.codes)
    store.update([one_chunk("new.py", entries(rng, 64))])
    assert store.stats()["entries"] == 9064
    assert all(a is b for a, b in zip(arrays, (store._values, store._tokens, store._search.keys.codes)))


def test_compaction_reclaims_space_and_keeps_results(tmp_path):
    rng = np.random.default_rng(9)
    store = store_at(tmp_path)
    batch = [one_chunk(f"f{i}.py", entries(rng, 50)) for i in range(10)]
    store.update(batch)  # one segment holding ten files
    for i in range(0, 10, 2):
        store.update([one_chunk(f"f{i}.py", entries(rng, 50), "v2")])
    q = queries(rng, 4)
    before = store.search(q, 10)
    assert store.stats()["garbage_rows"] == 250
    disk = store.stats()["disk_bytes"]
    store.compact()
    after = store.search(q, 10)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.tokens, after.tokens)
    assert [after.source(2, 0, j) for j in range(10)] == [before.source(2, 0, j) for j in range(10)]
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


def test_bytes_per_token(tmp_path):
    """536 bytes per token at the model's 4 heads x 64 dims, manifest and headers included."""
    assert bytes_per_token(4, 64) == 4 * (64 + 2 + 64 + 2) + 4 + 4 == 536
    rng = np.random.default_rng(11)
    store = store_at(tmp_path, heads=4, dim=64)
    store.update([FileUpdate(f"f{i}.py", "h", [NewChunk(j * 500, j * 500 + 500, f"{i}:{j}", entries(rng, 250, 4, 64),
                                                        (f"name_{i}_{j}", f"other_{i}_{j}")) for j in range(8)])
                  for i in range(10)])
    s = store.stats()
    assert s["entries"] == 20_000 and 536 < s["bytes_per_entry"] <= 540


def clustered(rng, centres, n, spread=0.3):
    """Keys near ``centres`` (C, H, D), each cluster at its own scale."""
    pick = rng.integers(len(centres), size=n)
    noise = rng.standard_normal((n, HEADS, DIM)) * spread * np.linalg.norm(centres[pick], axis=2, keepdims=True) / np.sqrt(DIM)
    return centres[pick] + noise


@pytest.mark.parametrize("k", [32, 8])
def test_approximate_index_recall_is_measured(tmp_path, k):
    """Above the threshold a CPU store searches per-head IVF indexes tuned to the recall target,
    at the number of entries the model reads per query (``ann_k``)."""
    rng = np.random.default_rng(11)
    centres = keys_like(rng, 40) * rng.uniform(0.5, 2.0, (40, 1, 1))
    store = store_at(tmp_path, ann_threshold=20_000, ann_background=False, ann_recall=0.9, ann_k=k)
    for i in range(6):
        x = clustered(rng, centres, 4000)
        store.update([one_chunk(f"f{i}.py", Entries.from_float(x, x, np.arange(4000), np.arange(4000)))])
    s = store.stats()
    assert s["ann"] is not None and s["ann"]["in_use"] and s["backend"] == "faiss-cpu ivf"
    assert s["ann"]["heads_built"] == HEADS and s["ann"]["k"] == k and s["ann"]["recall_at_k"] >= 0.9
    q = clustered(rng, centres, 100).transpose(1, 0, 2).astype(np.float32)
    approx = store.search(q, k).slots
    keys = store._search.keys
    for h in range(HEADS):
        exact = knn.top_k(q[h], keys.codes[h, : keys.used], keys.scales[h, : keys.used], k, keys.alive[: keys.used])[1]
        assert knn.recall_at_k(approx[h], exact) >= 0.85  # fresh queries, not the tuning ones
    store.remove_files(["f0.py"])  # tombstoned entries never come back from the IVF indexes
    hits = store.search(q, 32)
    assert all(hits.source(h, 0, j)[0] != "f0.py" for h in range(HEADS) for j in range(32))
    assert store.stats()["tombstones"] == 4000


def test_ivf_lists_keep_one_byte_per_dimension_and_their_hits_are_scored_exactly():
    """The lists hold 8-bit codes (half of fp16), and their candidates are rescored from the
    key table: probing every cell finds exactly what the exact scan finds, scores included,
    although the codes alone order close keys wrongly."""
    rng = np.random.default_rng(5)
    centres = keys_like(rng, 40, heads=1)
    x = clustered(rng, centres, 20_000)
    codes, scales = quantize(x[:, 0])
    table = knn.KeyTable(1, DIM)
    table.reserve(len(codes))
    slots = np.arange(len(codes))
    table.put(slots, codes[:, None], scales[:, None])
    ivf = knn.IvfIndex(slots, codes, scales, table, 0)
    assert ivf.index.code_size == DIM
    q = clustered(rng, centres, 200)[:, 0].astype(np.float32)
    scores, ids = ivf.search(q, 16, nprobe=ivf.nlist)
    exact_scores, exact_ids = knn.top_k(q, codes, scales, 16)
    assert knn.recall_at_k(ids, exact_ids) == 1.0
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    codes_only = ivf.index.search(q, 16, params=faiss.SearchParametersIVF(nprobe=ivf.nlist))[1]
    assert knn.recall_at_k(codes_only, exact_ids) < 1.0


def test_many_queries_are_searched_in_pieces_on_another_thread_with_the_same_answer():
    """A search of many queries (a trie's) runs in row pieces, one on another thread, and
    answers exactly what one search answers; a decoding step's few queries stay on one thread."""
    rng = np.random.default_rng(6)
    centres = keys_like(rng, 40, heads=1)
    codes, scales = quantize(clustered(rng, centres, 20_000)[:, 0])
    table = knn.KeyTable(1, DIM)
    table.reserve(len(codes))
    slots = np.arange(len(codes))
    table.put(slots, codes[:, None], scales[:, None])
    ivf = knn.IvfIndex(slots, codes, scales, table, 0)
    q = clustered(rng, centres, 100)[:, 0].astype(np.float32)
    threads = set()

    def scan(rows):
        threads.add(threading.get_ident())
        return knn.top_k(q[rows], codes, scales, 16)

    whole = knn.top_k(q, codes, scales, 16)
    split = knn.in_pieces(scan, len(q), ways=2)
    assert len(threads) == 2
    np.testing.assert_array_equal(split[1], whole[1])
    np.testing.assert_array_equal(split[0], whole[0])
    threads.clear()
    knn.in_pieces(scan, 8, ways=2)
    assert threads == {threading.get_ident()}
    # the IVF index splits its own scans (its cells are chosen on the calling thread)
    before = knn._SPLIT_QUERIES
    try:
        knn._SPLIT_QUERIES = 10**9
        one = ivf.search(q, 16)
    finally:
        knn._SPLIT_QUERIES = before
    pieces = ivf.search(q, 16)
    np.testing.assert_array_equal(pieces[1], one[1])
    np.testing.assert_array_equal(pieces[0], one[0])


def ivf_ids(ivf: knn.IvfIndex) -> list[int]:
    lists = ivf.index.invlists
    return sorted(i for n in range(ivf.nlist)
                  for i in faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).tolist())


def test_background_builds_replay_the_changes_made_meanwhile(tmp_path):
    """Edits made while each head's IVF index is built on a background thread reach it."""
    rng = np.random.default_rng(13)
    centres = keys_like(rng, 40)
    store = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9)

    def put(path, n=3000):
        x = clustered(rng, centres, n)
        store.update([one_chunk(path, Entries.from_float(x, x, np.arange(n), np.arange(n)))])

    for i in range(4):
        put(f"f{i}.py")  # the fourth update starts the build
    overlapped = 0
    for step in range(60):
        if store._search._thread is None and step >= 6:
            break
        overlapped += store._search._thread is not None
        if step % 3 == 2:
            store.remove_files([f"g{step % 5}.py"])
        else:
            put(f"g{step % 5}.py", 500)
    store.wait_for_index()
    assert overlapped and store.stats()["backend"] == "faiss-cpu ivf"
    store.compact()  # purges every tombstone: each head's lists hold exactly the live slots
    store.wait_for_index()
    live = store._search.keys.live_slots().tolist()
    assert len(live) == store.stats()["entries"]
    for ivf in store._search.ivf:
        assert ivf_ids(ivf) == live


def placement(store: MemoryStore) -> list[dict]:
    """Per head, which IVF list holds each live entry, by the entry's (file, byte offset)."""
    keys = store._search.keys
    live = keys.live_slots()
    where = [(store._paths[store._file[s]], int(store._pos[s])) for s in live]
    return [dict(zip(where, ivf.list_numbers(keys.used)[live].tolist())) for ivf in store._search.ivf]


def found(store: MemoryStore, q: np.ndarray) -> list:
    hits = store.search(q, 8)
    return [[[hits.source(h, i, j) for j in range(8)] for i in range(q.shape[1])] for h in range(HEADS)]


def ivf_store(tmp_path, rng, centres, files=4, **options):
    store = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9, ann_background=False, **options)
    for i in range(files):
        x = clustered(rng, centres, 3000)
        store.update([one_chunk(f"f{i}.py", Entries.from_float(x, x, np.arange(3000), np.arange(3000)))])
    return store


def test_a_reopened_store_fills_the_saved_ivf_cells_instead_of_training(tmp_path, monkeypatch):
    """After a build the cells are saved; the next process puts the keys straight back into
    them (no k-means, no tuning), and assigns only the entries written since."""
    rng = np.random.default_rng(21)
    centres = keys_like(rng, 40)
    first = ivf_store(tmp_path, rng, centres)
    assert (tmp_path / cells.CELLS).exists() and first.stats()["ann"]["restored_heads"] == 0
    x = clustered(rng, centres, 500)  # written after the save: not in the saved lists
    first.update([one_chunk("g.py", Entries.from_float(x, x, np.arange(500), np.arange(500)))])
    q = clustered(rng, centres, 20).transpose(1, 0, 2).astype(np.float32)

    def no_training(*args):
        raise AssertionError("k-means ran")

    monkeypatch.setattr(knn.faiss, "Clustering", no_training)
    monkeypatch.setattr(knn, "top_k", no_training)  # tuning measures against exact search
    again = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9)  # restored in the background
    again.wait_for_index()
    s, before = again.stats()["ann"], first.stats()["ann"]
    assert again.stats()["backend"] == "faiss-cpu ivf" and s["restored_heads"] == HEADS
    assert s["nprobe"] == before["nprobe"] and s["recall_per_head"] == before["recall_per_head"]
    assert "cells read from disk" in s["measured_on"]
    assert placement(again) == placement(first)  # g.py's entries too: the same cells assign them
    assert found(again, q) == found(first, q)
    saved = cells.read_cells(tmp_path, cells.Stamp("fp-1", HEADS, DIM))  # saved again, with g.py
    assert saved.changes == 500 and sum(c[2] for c in saved.chunks) == 12_500


def test_saved_cells_that_do_not_fit_are_trained_again(tmp_path, caplog):
    """A damaged cells file, one tuned for another k, or one whose store changed too much since
    is not used: the indexes are trained as before, and the file is written afresh."""
    rng = np.random.default_rng(22)
    centres = keys_like(rng, 40)
    ivf_store(tmp_path, rng, centres)
    path = tmp_path / cells.CELLS
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    damaged = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9, ann_background=False)
    assert "checksum mismatch" in caplog.text and "trained again" in caplog.text
    assert damaged.stats()["ann"]["restored_heads"] == 0 and damaged.stats()["backend"] == "faiss-cpu ivf"
    assert cells.read_cells(tmp_path, cells.Stamp("fp-1", HEADS, DIM)) is not None
    other_k = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9, ann_background=False, ann_k=8)
    assert other_k.stats()["ann"]["restored_heads"] == 0
    path.write_bytes(good)
    indexer = store_at(tmp_path, ann_threshold=10**9)  # another process that builds no IVF
    x = clustered(rng, centres, 4000)  # a third of the entries are new since the cells were saved
    indexer.update([one_chunk("h.py", Entries.from_float(x, x, np.arange(4000), np.arange(4000)))])
    stale = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9, ann_background=False)
    assert stale.stats()["ann"]["restored_heads"] == 0 and stale.stats()["entries"] == 16_000
    fresh = store_at(tmp_path, ann_threshold=9000, ann_recall=0.9, ann_background=False)
    assert fresh.stats()["ann"]["restored_heads"] == HEADS  # from the cells the stale one saved


def test_a_store_refused_for_another_model_drops_its_saved_cells(tmp_path):
    rng = np.random.default_rng(23)
    ivf_store(tmp_path, rng, keys_like(rng, 40))
    assert (tmp_path / cells.CELLS).exists()
    MemoryStore(tmp_path, fingerprint="fp-2", heads=HEADS, dim=DIM)
    assert not (tmp_path / cells.CELLS).exists()


def test_exact_search_matches_numpy(tmp_path):
    """``knn.top_k`` over int8 codes across several scan blocks, with a mask."""
    rng = np.random.default_rng(12)
    n = 40_000
    e = entries(rng, n)
    keep = rng.random(n) > 0.3
    q = queries(rng, 4)[1]
    scores, rows = knn.top_k(q, e.keys[:, 1], e.key_scales[:, 1], 20, keep)
    full = q @ e.float_keys()[:, 1].T
    full[:, ~keep] = -np.inf
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :20], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, rows, axis=1), scores, rtol=1e-5, atol=1e-5)
    few, none = knn.top_k(q, e.keys[:3, 1], e.key_scales[:3, 1], 5)
    assert (none[:, 3:] == -1).all() and np.isneginf(few[:, 3:]).all()


def test_private_store_directory_keyed_by_resolved_path(tmp_path):
    ws = tmp_path / "proj"
    ws.mkdir()
    (tmp_path / "link").symlink_to(ws)
    assert store_dir_for(ws, tmp_path / "cache") == store_dir_for(tmp_path / "link", tmp_path / "cache")
    assert store_dir_for(ws, tmp_path / "cache") != store_dir_for(tmp_path, tmp_path / "cache")
    store = MemoryStore.open(ws, fingerprint="fp", heads=HEADS, dim=DIM, cache_root=tmp_path / "cache")
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
        for x, y in zip(got.arrays()[:-1], want.arrays()[:-1]):
            np.testing.assert_array_equal(x, y, err_msg=path)
        starts = np.repeat([c.start for c in info.chunks], [c.tokens for c in info.chunks])
        np.testing.assert_array_equal(got.offsets + starts, want.offsets, err_msg=path)  # relative to chunks
        want_names = [store_worker.names_for(path, int(info.content_hash[1:]), c.start // 4) for c in info.chunks]
        assert [c.names for c in info.chunks] == want_names, path
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

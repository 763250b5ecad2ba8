"""The memory mechanism of the memorizing transformer, on a tiny random model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlsp_model.memory import TensorMemory
from mtlsp_model.model import MemorizingTransformer, ModelConfig
from mtlsp_model.runner import SegmentRunner
from mtlsp_model.stream import SegmentStream


@pytest.fixture()
def model(tiny_cfg):
    torch.manual_seed(0)
    return MemorizingTransformer(tiny_cfg).eval()


def memory_for(cfg: ModelConfig, batch: int = 1, capacity: int = 64) -> TensorMemory:
    return TensorMemory(batch, capacity, cfg.mem_kv_heads, cfg.head_dim)


def random_entries(cfg, n, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(batch, cfg.mem_kv_heads, n, cfg.head_dim, generator=g), dim=-1)
    v = torch.randn(batch, cfg.mem_kv_heads, n, cfg.head_dim, generator=g)
    return k, v


def memory_layer_queries(model, idx):
    """The normalised queries the memory layer issues for ``idx`` (captured with a hook)."""
    seen = {}
    attn = model.memory_attention
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model(idx)
    handle.remove()
    x = seen["x"]
    q = attn.q_proj(x).view(x.shape[0], x.shape[1], model.cfg.n_head, -1).transpose(1, 2)
    return F.normalize(q, dim=-1)


def test_search_matches_brute_force(tiny_cfg):
    mem = memory_for(tiny_cfg, batch=2, capacity=40)
    k, v = random_entries(tiny_cfg, 50, batch=2)  # more than capacity: the oldest 10 roll off
    mem.add(k[:, :, :30], v[:, :, :30])
    mem.add(k[:, :, 30:], v[:, :, 30:])
    q = F.normalize(torch.randn(2, tiny_cfg.n_head, 5, tiny_cfg.head_dim), dim=-1)
    got = mem.search(q, 4)
    live_k, live_v = k[:, :, 10:], v[:, :, 10:]
    for b in range(2):
        for h in range(tiny_cfg.n_head):
            scores = q[b, h] @ live_k[b, 0].T
            best = scores.topk(4).indices
            torch.testing.assert_close(got.keys[b, h], live_k[b, 0][best])
            torch.testing.assert_close(got.values[b, h], live_v[b, 0][best])
    assert got.mask.all()


def test_young_memory_masks_missing_entries(tiny_cfg):
    mem = memory_for(tiny_cfg, capacity=64)
    mem.add(*random_entries(tiny_cfg, 2))
    got = mem.search(F.normalize(torch.randn(1, tiny_cfg.n_head, 3, tiny_cfg.head_dim), dim=-1), 4)
    assert got.mask.sum(-1).eq(2).all()


def test_planted_key_is_retrieved_and_changes_the_output(model, tok):
    cfg = model.cfg
    idx = torch.tensor([tok.encode("def planted(): return 1\n")[: cfg.seq_len]])
    q = memory_layer_queries(model, idx)
    target_t = idx.shape[1] - 1
    planted_key = q[0, 0, target_t]  # exactly what head 0 asks for at the last position
    keys, values = random_entries(cfg, 40)
    baseline = memory_for(cfg)
    baseline.add(keys, values)
    planted = memory_for(cfg)
    keys2, values2 = keys.clone(), values.clone()
    keys2[0, 0, 17] = planted_key
    values2[0, 0, 17] = 25.0 * torch.ones(cfg.head_dim)  # a loud, recognisable value
    planted.add(keys2, values2)

    got = planted.search(q, cfg.knn_k)
    assert torch.equal(got.keys[0, 0, target_t, 0], planted_key)  # found, and ranked first
    assert torch.equal(got.values[0, 0, target_t, 0], values2[0, 0, 17])
    with torch.no_grad():
        plain = model(idx, memory=baseline).logits[0, target_t]
        changed = model(idx, memory=planted).logits[0, target_t]
    assert (plain - changed).abs().max() > 1e-2


def test_gate_extremes(model, tok):
    cfg = model.cfg
    idx = torch.tensor([tok.encode("x = compute(1, 2)\n")[: cfg.seq_len]])
    mem = memory_for(cfg)
    keys, _ = random_entries(cfg, 40)
    constant = torch.full((cfg.head_dim,), 0.5)
    mem.add(keys, constant.expand(1, cfg.mem_kv_heads, 40, cfg.head_dim))
    attn = model.memory_attention
    with torch.no_grad():
        attn.gate.fill_(-30.0)  # gate closed: memory has no effect at all
        closed = model(idx, memory=mem).logits
        off = model(idx).logits
        torch.testing.assert_close(closed, off)

        attn.gate.fill_(30.0)  # gate open: the layer's attention output is the memory's alone
        seen = {}
        handle = attn.out_proj.register_forward_hook(lambda m, args, out: seen.update(y=args[0]))
        model(idx, memory=mem)
        handle.remove()
    # every value in memory is `constant`, so memory attention returns it whatever the weights
    torch.testing.assert_close(seen["y"], constant.repeat(cfg.n_head).expand_as(seen["y"]))


def test_no_gradient_reaches_the_memory(model, tok):
    cfg = model.cfg
    model.train()
    idx = torch.tensor([tok.encode("def f(a):\n    return a\n" * 3)[: cfg.seq_len]])
    mem = memory_for(cfg)
    mem.add(*random_entries(cfg, 40))
    mem.keys.requires_grad_(True)
    mem.values.requires_grad_(True)
    out = model(idx, idx.roll(-1, 1), memory=mem)
    grads = torch.autograd.grad(out.loss, [mem.keys, mem.values, model.memory_attention.gate],
                                allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2] is not None and grads[2].abs().sum() > 0  # the gate does learn
    assert not out.entries.keys.requires_grad and not out.entries.values.requires_grad


def test_encode_runs_only_lower_layers_and_matches_forward(model, tok):
    cfg = model.cfg
    ids = tok.encode("class A:\n    def m(self):\n        return self.x\n" * 4)
    seg1 = torch.tensor([ids[: cfg.seq_len]])
    seg2 = torch.tensor([ids[cfg.seq_len : 2 * cfg.seq_len]])
    mem = memory_for(cfg)
    mem.add(*random_entries(cfg, 40))
    with torch.no_grad():
        out1 = model(seg1, memory=mem)
        out2 = model(seg2, memory=mem, cache=out1.cache)
        enc1, cache = model.encode(seg1)
        enc2, _ = model.encode(seg2, cache)
    # entries depend only on the layers below memory: the memory's content cannot change them
    torch.testing.assert_close(enc1.keys, out1.entries.keys)
    torch.testing.assert_close(enc2.values, out2.entries.values)
    assert len(cache) == cfg.memory_layer
    with torch.no_grad():  # upper blocks are not run by encode: breaking them changes nothing
        for block in model.blocks[cfg.memory_layer + 1 :]:
            block.mlp.up.weight.fill_(float("nan"))
        again, _ = model.encode(seg1)
    torch.testing.assert_close(again.keys, enc1.keys)


def test_memory_cleared_at_document_boundaries(model, tok):
    """Scoring doc B after doc A in one slot equals scoring B alone: no memory or cache leaks."""
    cfg = model.cfg
    a = np.array(tok.encode("def alpha():\n    return 'a' * 3\n" * 6))
    b = np.array(tok.encode("class Beta:\n    value = 2\n" * 6))
    both = np.concatenate([a, b])

    def losses(tokens, docs):
        stream = SegmentStream(tokens, docs, 1, cfg.seq_len, pad_id=tok.pad, shuffle=False, loop=False)
        runner = SegmentRunner(model, tok.pad, 1, capacity=256)
        rows = []
        with torch.no_grad():
            while not stream.exhausted:
                batch = stream.next_batch()
                out, y = runner(model, batch, with_targets=False)
                rows.append((bool(batch.reset[0]), F.cross_entropy(out.logits[0], y[0], ignore_index=-1,
                                                                   reduction="none")))
                if batch.reset[0]:
                    assert int(runner.memory.size[0]) == int((batch.inputs[0] != tok.pad).sum())
        return rows

    joint = losses(both, [(0, len(a)), (len(a), len(both))])
    alone = losses(b, [(0, len(b))])
    starts = [i for i, (r, _) in enumerate(joint) if r]
    assert len(starts) == 2
    tail = [l for _, l in joint[starts[1] :]]
    assert len(tail) == len(alone)
    for x, (_, y) in zip(tail, alone):
        torch.testing.assert_close(x, y)


def test_xl_cache_is_used_within_a_document(model, tok):
    cfg = model.cfg
    ids = tok.encode("def gamma(x):\n    return x + 1\n" * 6)
    seg1 = torch.tensor([ids[: cfg.seq_len]])
    seg2 = torch.tensor([ids[cfg.seq_len : 2 * cfg.seq_len]])
    with torch.no_grad():
        cache = model(seg1).cache
        with_cache = model(seg2, cache=cache).logits
        masked = model(seg2, cache=cache, reset=torch.tensor([True])).logits
        alone = model(seg2).logits
    torch.testing.assert_close(masked, alone)
    assert (with_cache - alone).abs().max() > 1e-4


def test_compact_memory_entry_size():
    from mtlsp_model.train import PRESETS

    for name, (mc, _) in PRESETS.items():
        assert mc.bytes_per_memory_token <= 256, name
    per_head = ModelConfig(n_head=8, d_model=512, mem_kv_heads=8)
    assert per_head.bytes_per_memory_token == 2048


def test_memory_layer_at_three_quarters():
    assert ModelConfig(n_layer=12).memory_layer == 8  # the paper's layer 9 of 12
    assert ModelConfig(n_layer=8).memory_layer == 5
    with pytest.raises(ValueError):
        ModelConfig(n_layer=4, mem_layer=4)

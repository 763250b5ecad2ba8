"""The memorizing transformer on a tiny random Llama: decoding, encoding, memory heads, copy."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, tiny_config
from mtlsp_model.memory import Retrieved, TensorMemory
from mtlsp_model.model import MemorizingTransformer, rotary


@pytest.fixture()
def model(tok) -> MemorizingTransformer:
    return random_model(tiny_config(tok.vocab_size), seed=1)


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.file_header("a.py") + tok.encode(text)])


def memory_of(model, tok, texts: list[str]) -> TensorMemory:
    """Entries of each text (after its header), file id = its index."""
    keys, values, tokens, files = [], [], [], []
    for i, text in enumerate(texts):
        ids = ids_of(tok, text)
        h = len(tok.file_header("a.py"))
        e = model.encode(ids)
        keys.append(e.keys[0, :, h:])
        values.append(e.values[0, :, h:])
        tokens.append(ids[0, h:])
        files.append(torch.full((ids.shape[1] - h,), i))
    return TensorMemory(torch.cat(keys, 1), torch.cat(values, 1), torch.cat(tokens), torch.cat(files))


SRC = "def total(lines):\n    return sum(line.price for line in lines)\n\n\nclass Cart:\n    pass\n"


def test_config_derives_memory_layout(tiny_cfg):
    assert tiny_cfg.head_dim == 8 and tiny_cfg.group == 2
    assert tiny_cfg.memory_kv_heads == ((1, 0), (2, 1))  # L1H0, L1H1 share key/value head 0
    assert tiny_cfg.encode_layers == 3
    assert tiny_cfg.bytes_per_memory_token == 2 * 2 * (8 + 2) + 8
    with pytest.raises(ValueError):
        tiny_config(100, memory_heads=((3, 0),))


def test_incremental_decoding_matches_one_pass(model, tok):
    ids = ids_of(tok, SRC)
    full = model(ids).logits
    first = model(ids[:, :10])
    rest = model(ids[:, 10:], past=first.kv)
    torch.testing.assert_close(rest.logits, full[:, 10:], atol=1e-5, rtol=1e-5)
    step = model(ids[:, 10:11], past=first.kv, last_only=True)
    torch.testing.assert_close(step.logits[:, 0], full[:, 10], atol=1e-5, rtol=1e-5)


def test_incremental_decoding_with_memory_matches_one_pass(model, tok):
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "x = total(")
    full = model(ids, memory=mem).logits
    first = model(ids[:, :-1], memory=mem)
    last = model(ids[:, -1:], past=first.kv, memory=mem, last_only=True)
    torch.testing.assert_close(last.logits[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_fused_projections_compute_what_the_separate_ones_do(model, tok):
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "x = total(")
    before, entries = model(ids, memory=mem).logits, model.encode(ids)
    for block in model.blocks:
        block.attn.fuse()
        block.mlp.fuse()
    assert not hasattr(model.blocks[0].attn, "q_proj") and not hasattr(model.blocks[0].mlp, "gate")
    torch.testing.assert_close(model(ids, memory=mem).logits, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode(ids).keys, entries.keys, atol=1e-6, rtol=1e-6)


def test_encode_gives_the_unrotated_keys_and_values_the_layers_compute(model, tok):
    ids = ids_of(tok, SRC)
    entries = model.encode(ids)
    assert entries.keys.shape == (1, 2, ids.shape[1], 8)
    # layer 2's keys/values from the full forward's cache, rotated there: undo the rotation
    kv = model(ids).kv[2]
    cos, sin = model._rope(0, ids.shape[1], torch.float32)
    unrotated = rotary(kv.keys, cos, -sin)
    torch.testing.assert_close(entries.keys[:, 1], unrotated[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entries.values[:, 1], kv.values[:, 1])
    torch.testing.assert_close(entries.values[:, 0], model(ids).kv[1].values[:, 0])


def test_rows_read_after_a_shared_prefix_get_the_entries_of_the_whole_text(model, tok):
    contexts = [tok.file_header("a.py") + tok.encode("import os\n"), tok.file_header("long/b.py")]
    texts = ["def f(x):\n    return x\n", "class C:\n    pass\n", "y = f(2) + 1\n"]
    chunks = [tok.encode(t) for t in texts]
    rows = torch.tensor([0, 1, 0])
    prefix = model.read_prefix(contexts, pad=tok.eot)
    width = max(map(len, chunks))
    idx = torch.full((3, width), tok.eot)
    for r, c in enumerate(chunks):
        idx[r, : len(c)] = torch.tensor(c)
    shared = model.encode(idx, prefix=prefix, rows=rows)
    for r, c in enumerate(chunks):
        ctx = contexts[int(rows[r])]
        alone = model.encode(torch.tensor([ctx + c]))
        torch.testing.assert_close(shared.keys[r, :, : len(c)], alone.keys[0, :, len(ctx) :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared.values[r, :, : len(c)], alone.values[0, :, len(ctx) :], atol=1e-5, rtol=1e-4)


def test_encode_runs_only_up_to_the_last_memory_layer(tok):
    cfg = tiny_config(tok.vocab_size, memory_heads=((1, 0),))
    m = random_model(cfg)
    ids = ids_of(tok, SRC)
    before = m.encode(ids)
    with torch.no_grad():
        for p in m.blocks[2].parameters():
            p.fill_(float("nan"))
        m.norm.weight.fill_(float("nan"))
    after = m.encode(ids)
    assert cfg.encode_layers == 2
    torch.testing.assert_close(after.keys, before.keys)


def test_empty_memory_leaves_the_base_unchanged(model, tok):
    empty = TensorMemory(torch.zeros(2, 0, 8), torch.zeros(2, 0, 8), torch.zeros(0, dtype=torch.long))
    ids = ids_of(tok, SRC)
    torch.testing.assert_close(model(ids, memory=empty).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def test_memory_from_limits_which_positions_read_the_memory(model, tok):
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "x = total(lines)\n")
    T = ids.shape[1]
    full = model(ids, memory=mem)
    torch.testing.assert_close(model(ids, memory=mem, memory_from=0).logits, full.logits)
    torch.testing.assert_close(model(ids, memory=mem, memory_from=T).logits, model(ids).logits)
    late = model(ids, memory=mem, memory_from=T - 3)
    torch.testing.assert_close(late.logits[:, : T - 3], model(ids).logits[:, : T - 3])  # earlier: base alone
    assert all((r.weights[:, : T - 3] == 0).all() and (r.source[:, : T - 3] == -1).all() for r in late.reads)
    assert all((r.weights[:, T - 3 :].sum(-1) > 0).all() for r in late.reads)


def test_memory_search_is_exact_and_hides_files(model, tok):
    mem = memory_of(model, tok, [SRC, "import os\nprint(os.getcwd())\n"])
    q = torch.randn(1, 2, 5, 8)
    got = mem.search(1, q, 4)
    scores = q.reshape(-1, 8) @ mem.keys[1].T
    assert torch.equal(got.source.reshape(-1, 4), scores.topk(4).indices)
    assert torch.equal(got.tokens.reshape(-1, 4), mem.tokens[scores.topk(4).indices])
    mem.hide([0])
    hidden = mem.search(1, q, 4)
    assert (mem.files[hidden.source[hidden.mask]] == 1).all()


def test_a_planted_entry_is_read_and_changes_the_next_token(model, tok):
    """A memory entry whose key matches the query exactly and whose value is large dominates the
    head's softmax, so it must show up in the reads and move the output."""
    ids = ids_of(tok, "x = total(")
    out = model(ids)
    mem = memory_of(model, tok, [SRC])
    plain = model(ids, memory=mem)
    assert plain.reads and all(r.weights.shape == (1, ids.shape[1], 4) for r in plain.reads)
    # a strong key aligned with layer 1 head 0's memory query at the last position
    captured: list[Retrieved] = []

    class Spy:
        def search(self, slot, queries, k):
            got = mem.search(slot, queries, k)
            if slot == 0:
                q = queries[0, 0, -1]
                keys = got.keys.clone()
                keys[0, 0, -1, 0] = q / q.norm() * 50
                got = got._replace(keys=keys, values=got.values * 0 + 3)
            captured.append(got)
            return got

    planted = model(ids, memory=Spy())
    w = planted.reads[0].weights[0, -1]
    assert w[0] > 0.9  # the planted entry takes the head's attention
    assert not torch.allclose(planted.logits[0, -1], out.logits[0, -1], atol=1e-3)


def test_value_adapter_and_context_copy_gate_start_as_no_change_and_train(model, tok):
    """``value_rank``/``copy_context``: the new parts change nothing until trained, then change
    what the memory heads read and how much the copy is trusted, and gradients reach them."""
    cfg = model.cfg.with_memory(value_rank=2, copy_context=True)
    grown = MemorizingTransformer(cfg)
    grown.load_state_dict(model.state_dict(), strict=False)
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "y = total(lines)\n")
    with torch.no_grad():
        model.memory.copy_gate.fill_(0.0)
        grown.memory.copy_gate.fill_(0.0)
        torch.testing.assert_close(grown(ids, memory=mem).logits, model(ids, memory=mem).logits)
    for p in grown.parameters():
        p.requires_grad_(False)
    for p in grown.memory.parameters():
        p.requires_grad_(True)
    out = grown(ids, memory=mem)
    (-out.logits[0, :-1].gather(-1, ids[0, 1:, None]).mean()).backward()
    assert grown.memory.value_up.grad.abs().sum() > 0 and grown.memory.copy_proj.grad.abs().sum() > 0
    with torch.no_grad():
        plain = grown(ids, memory=mem, copy=False).logits
        grown.memory.value_up.normal_()
        assert not torch.allclose(grown(ids, memory=mem, copy=False).logits, plain, atol=1e-4)
        grown.memory.value_up.zero_()
        mixed = grown(ids, memory=mem).logits
        grown.memory.copy_proj.normal_()
        assert not torch.allclose(grown(ids, memory=mem).logits, mixed, atol=1e-4)
        torch.testing.assert_close(grown(ids, memory=mem, copy=False).logits, plain)  # the gate only


def test_gradient_reaches_only_the_memory_parameters(model, tok):
    mem = memory_of(model, tok, [SRC])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.memory.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.memory.copy_gate.fill_(0.0)
    ids = ids_of(tok, "y = total(lines)\n")
    out = model(ids, memory=mem)
    loss = -out.logits[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.memory.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["bias"].abs().sum() > 0 and grads["up"].abs().sum() > 0 and grads["copy_gate"].abs() > 0
    assert not mem.keys.requires_grad


def test_hidden_start_skips_the_frozen_layers(model, tok):
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "z = Cart()\n")
    h = model.hidden_at(ids, 1)
    torch.testing.assert_close(model(ids, memory=mem, hidden=h, from_layer=1).logits,
                               model(ids, memory=mem).logits, atol=1e-5, rtol=1e-5)


def test_copy_puts_mass_on_the_tokens_the_memory_heads_read(model, tok):
    """With the copy gate open, the next-token distribution gains the memory's tokens."""
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "x = ")
    with torch.no_grad():
        model.memory.bias.fill_(10.0)  # the memory heads attend to the memory
        model.memory.copy_gate.fill_(10.0)
    out = model(ids, memory=mem)
    plain = model(ids, memory=mem, copy=False)
    read = torch.cat([r.tokens[0, -1] for r in out.reads])
    weights = torch.cat([r.weights[0, -1] for r in out.reads])
    best = int(read[weights.argmax()])
    assert out.logits[0, -1, best] > plain.logits[0, -1, best]
    torch.testing.assert_close(out.logits[0, -1].exp().sum(), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_the_copy_mix_equals_mixing_the_whole_distribution(model, tok):
    """mix_copy computes only the cells the memory read; the result is the dense formula."""
    mem = memory_of(model, tok, [SRC])
    ids = ids_of(tok, "x = total(lines) + ")
    with torch.no_grad():
        model.memory.copy_gate.fill_(1.0)
        plain = model(ids, memory=mem, copy=False)
        mixed = model.mix_copy(plain.logits, plain.reads, last_only=False)
    weights = torch.stack([r.weights[0] for r in plain.reads])  # (M, T, k)
    tokens = torch.stack([r.tokens[0] for r in plain.reads]).clamp(min=0)
    V = plain.logits.shape[-1]
    for t in range(ids.shape[1]):
        mass = torch.zeros(V).index_add(0, tokens[:, t].flatten(), weights[:, t].flatten())
        g = torch.sigmoid(torch.tensor(1.0)) * weights[:, t].sum(-1).mean()
        want = torch.log((1 - g) * plain.logits[0, t].exp() + g * mass / mass.sum())
        ok = want > -60  # below that the dense formula's exp underflows
        torch.testing.assert_close(mixed[0, t][ok], want[ok], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[0].exp().sum(-1), torch.ones(ids.shape[1]), atol=1e-4, rtol=0)


def test_context_limit_is_enforced(model, tok):
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, model.cfg.max_context + 1, dtype=torch.long))


def test_the_cpu_runtime_norm_computes_what_rmsnorm_does():
    from mtlsp_model.runtime import CpuRMSNorm

    norm = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 5, 64) * 20
    torch.testing.assert_close(CpuRMSNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)
    fast = CpuRMSNorm(norm)(x.bfloat16())
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), norm(x.bfloat16().float()), atol=0.1, rtol=0.02)


def snapped_to_four_bits(model: MemorizingTransformer) -> MemorizingTransformer:
    """``model`` with every block linear's weights on a 4-bit grid per group of 32 (as a Q4_1
    base's are)."""
    for block in model.blocks:
        for lin in [m for m in block.modules() if isinstance(m, torch.nn.Linear)]:
            w = lin.weight.detach()
            g = w.view(w.shape[0], -1, 32)
            low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
            with torch.no_grad():
                lin.weight.copy_((torch.round((g - low) / step) * step + low).view_as(w))
    return model


@pytest.mark.parametrize("four_bits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_runtime_reads_prompts_and_decodes_in_either_product_precision(tok, dtype, four_bits):
    """Many rows go through ``dtype`` weights, few through 4-bit (weights on a 4-bit grid) or
    int8 ones; all stay close to float32."""
    import copy

    from mtlsp_model.runtime import FEW_ROWS, CpuLinear, for_inference

    model = random_model(tiny_config(tok.vocab_size), seed=1)  # inputs of 32 and 64: whole groups
    if four_bits:
        snapped_to_four_bits(model)
    ids = ids_of(tok, SRC * 3)
    assert ids.shape[1] > FEW_ROWS  # the prompt takes the many-row path, its last tokens the int8 one
    exact = model(ids).logits.float()
    fast = for_inference(copy.deepcopy(model), torch.device("cpu"), dtype)
    prompt = fast(ids).logits.float()
    tail = fast(ids[:, -FEW_ROWS:]).logits.float()  # read alone: a short context, through int8 weights
    assert fast.embed.weight.dtype == dtype
    packed = [hasattr(m, "w4") for m in fast.blocks.modules() if isinstance(m, CpuLinear)]
    assert packed and all(p == four_bits for p in packed)
    assert not hasattr(fast.lm_head, "w4")  # the random embedding is not on a grid: int8
    torch.testing.assert_close(prompt, exact, atol=0.1 if dtype == torch.bfloat16 else 1e-4, rtol=0.05)
    torch.testing.assert_close(tail, model(ids[:, -FEW_ROWS:]).logits.float(), atol=0.15, rtol=0.05)


def test_the_cpu_product_precision_can_be_forced(monkeypatch):
    from mtlsp_model import runtime

    for value, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        monkeypatch.setenv(runtime.PRECISION_ENV, value)
        runtime.cpu_product_dtype.cache_clear()
        assert runtime.cpu_product_dtype() == want
    monkeypatch.delenv(runtime.PRECISION_ENV)
    runtime.cpu_product_dtype.cache_clear()
    assert runtime.cpu_product_dtype() in (torch.float32, torch.bfloat16)  # measured on this CPU
    runtime.cpu_product_dtype.cache_clear()


def test_int8_encoding_stays_close_to_float_and_only_inside_encoding(tok, monkeypatch, tmp_path):
    """Encoding with int8 products (smoothed, a scale per token) gives entries close to float32
    ones; prompts and encoding outside ``encoding()`` are untouched; the activation maxima are
    kept in their cache file, and a damaged one is measured again."""
    import copy

    from mtlsp_model import runtime

    monkeypatch.setenv(runtime.ENCODING_ENV, "int8")
    runtime.int8_encoding_faster.cache_clear()
    model = random_model(tiny_config(tok.vocab_size), seed=1)
    ids = ids_of(tok, SRC * 3)
    fast = runtime.for_inference(copy.deepcopy(model), torch.device("cpu"), torch.float32)
    before = fast.encode(ids)
    cache = tmp_path / runtime.MAXIMA_FILE
    try:
        assert runtime.int8_encoding(fast, tok, tmp_path)
        assert cache.is_file()
        plain = fast.encode(ids)  # not inside encoding(): the float32 products
        torch.testing.assert_close(plain.keys, before.keys)
        with runtime.encoding():
            int8 = fast.encode(ids)
        assert not torch.equal(int8.keys, before.keys)  # the int8 path ran
        for got, want in ((int8.keys, before.keys), (int8.values, before.values)):
            assert ((got - want).norm() / want.norm()).item() < 0.05
        cache.write_bytes(b"not a tensor file")
        again = runtime.for_inference(copy.deepcopy(model), torch.device("cpu"), torch.float32)
        assert runtime.int8_encoding(again, tok, tmp_path)
        with runtime.encoding():
            torch.testing.assert_close(again.encode(ids).keys, int8.keys)
        monkeypatch.setenv(runtime.ENCODING_ENV, "float")
        runtime.int8_encoding_faster.cache_clear()
        assert not runtime.int8_encoding(runtime.for_inference(copy.deepcopy(model), torch.device("cpu"),
                                                               torch.float32), tok, None)
    finally:
        runtime.int8_encoding_faster.cache_clear()

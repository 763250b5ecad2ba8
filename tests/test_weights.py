"""Memory weights on a base: saved, verified, loaded; damage is named; another base gets its own
measured memory heads."""

import json

import pytest
import torch

from conftest import random_model, tiny_config
from mtlsp_model.base import save_base
from mtlsp_model.weights import CONFIG, MEMORY, WeightsError, load_weights, save_weights, store_fingerprint


@pytest.fixture()
def saved(tiny_base, tok, tmp_path):
    model = random_model(tiny_config(tok.vocab_size))
    with torch.no_grad():
        model.memory.bias.fill_(0.5)
        model.memory.up.normal_()
    return save_weights(model, tmp_path / "w", base={"fingerprint": tiny_base.name, "path": str(tiny_base)}), model


def test_round_trip_is_exact(saved):
    path, model = saved
    loaded = load_weights(path)
    assert loaded.trained
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], t, atol=0, rtol=0)
    assert loaded.config.memory_heads == model.cfg.memory_heads
    assert loaded.model.num_params(trained_only=True) == sum(p.numel() for p in model.memory.parameters())


def test_store_fingerprint_depends_on_what_entries_depend_on(saved, tiny_base):
    path, model = saved
    loaded = load_weights(path)
    assert loaded.store_fingerprint == store_fingerprint(tiny_base.name, model.cfg)
    other_heads = model.cfg.with_memory(memory_heads=((0, 0),))
    assert store_fingerprint(tiny_base.name, other_heads) != loaded.store_fingerprint
    retrained = model.cfg.with_memory(adapter_rank=4)  # adapters change queries, not entries
    assert store_fingerprint(tiny_base.name, retrained) == loaded.store_fingerprint


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(WeightsError, match="config.json is missing"):
        load_weights(tmp_path / "nowhere")


def test_damaged_memory_file_is_named(saved):
    path, _ = saved
    data = bytearray((path / MEMORY).read_bytes())
    data[-3] ^= 0xFF
    (path / MEMORY).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"memory\.safetensors does not match the checksum"):
        load_weights(path)


def test_missing_memory_file_is_named(saved):
    path, _ = saved
    (path / MEMORY).unlink()
    with pytest.raises(WeightsError, match="memory.safetensors is missing"):
        load_weights(path)


def test_corrupted_config(saved):
    path, _ = saved
    (path / CONFIG).write_text("{")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(path)
    (path / CONFIG).write_text(json.dumps({"base": {}}))
    with pytest.raises(WeightsError, match="does not describe mtlsp weights"):
        load_weights(path)


def test_another_base_gets_measured_heads_training_free(saved, tok, tmp_path):
    """The trained parameters fit one base; on another the memory heads are its own induction
    heads (measured once, cached) and the memory parameters start untrained."""
    path, _ = saved
    other = random_model(tiny_config(tok.vocab_size), seed=9)
    state = {k: v for k, v in other.state_dict().items() if not k.startswith("memory.")}
    base = save_base(other.cfg, state, tok, tmp_path / "1-other", {"name": "another tiny base"})
    loaded = load_weights(path, base=base)
    assert not loaded.trained
    assert len(loaded.config.memory_heads) == 3
    assert (base / "memory_heads.json").is_file()
    assert float(loaded.model.memory.bias[0].detach()) == loaded.config.mem_bias_init
    assert load_weights(path, base=base).config.memory_heads == loaded.config.memory_heads  # cached

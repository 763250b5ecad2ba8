"""Shared fixtures: a small real tokenizer trained on this repository's own sources and a tiny
random-initialised Llama with memory heads, saved as a real converted base plus real memory
weights, so tests run in seconds on a CPU.  The shipped model is tested in test_shipped.py."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtlsp_model.base import save_base
from mtlsp_model.model import MemorizingTransformer, ModelConfig
from mtlsp_model.tokenizer import Tokenizer, train_tokenizer
from mtlsp_model.weights import save_weights

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tests are many small ops: extra threads only add contention on a 2-core machine.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def code_texts() -> list[str]:
    return [p.read_text() for p in sorted((REPO / "model").glob("*.py"))]


@pytest.fixture(scope="session")
def tok(code_texts) -> Tokenizer:
    return train_tokenizer(code_texts, vocab_size=600)


def tiny_config(vocab_size: int, **memory) -> ModelConfig:
    """Three layers of width 32, four query heads on two key/value heads; memory heads in two
    layers and on two key/value heads, so every path (several heads per key/value head, several
    layers) is exercised."""
    memory = {"memory_heads": ((1, 0), (1, 1), (2, 3)), "knn_k": 4, "mem_distance": 64, "adapter_rank": 2,
              **memory}
    return ModelConfig(vocab_size=vocab_size, n_layer=3, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                       max_context=1024, **memory)


def random_model(cfg: ModelConfig, seed: int = 0) -> MemorizingTransformer:
    """GPT-2-style initialisation (normal, std 0.02): small logits, as a trained model has."""
    torch.manual_seed(seed)
    model = MemorizingTransformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith("memory."):
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


@pytest.fixture()
def tiny_cfg(tok) -> ModelConfig:
    return tiny_config(tok.vocab_size)


@pytest.fixture(scope="session")
def tiny_base(tok, tmp_path_factory) -> Path:
    """A converted-base folder holding a tiny random Llama (what ``convert`` writes)."""
    model = random_model(tiny_config(tok.vocab_size))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("memory.")}
    out = tmp_path_factory.mktemp("bases") / "1-tiny"
    return save_base(model.cfg, state, tok, out, {"name": "tiny random Llama"})


@pytest.fixture(scope="session")
def tiny_weights(tiny_base, tok, tmp_path_factory) -> Path:
    """A real weights directory (memory parameters) on the tiny base: what server tests start with."""
    model = random_model(tiny_config(tok.vocab_size))
    return save_weights(model, tmp_path_factory.mktemp("weights") / "tiny",
                        base={"fingerprint": tiny_base.name, "path": str(tiny_base)})


@dataclass
class VscodeBuild:
    root: Path  # a copy of editors/vscode, with node_modules/ and out/ built in it
    vsix: Path

    def npm(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return npm(self.root, *args, env=env)


def npm(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("npm")
    if exe is None:
        pytest.fail("npm is missing: the VS Code extension is built with Node and npm")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"npm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def vscode_build(tmp_path_factory) -> VscodeBuild:
    """editors/vscode copied to a temporary folder, then `npm ci`, compiled and packaged there:
    the tests write nothing into the source tree."""
    root = tmp_path_factory.mktemp("vscode") / "vscode"
    shutil.copytree(REPO / "editors" / "vscode", root,
                    ignore=shutil.ignore_patterns("node_modules", "out", "*.vsix"))
    npm(root, "ci", "--no-audit", "--no-fund")
    npm(root, "run", "compile")
    npm(root, "run", "package")
    return VscodeBuild(root, root / "mtlsp.vsix")

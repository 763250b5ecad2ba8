"""Shared fixtures: a small real tokenizer trained on this repository's own sources, and a
tiny random-initialised model config, so tests run in seconds on a CPU."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mtlsp_model.model import MemorizingTransformer, ModelConfig
from mtlsp_model.tokenizer import CodeTokenizer, train_tokenizer
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
def tok(code_texts) -> CodeTokenizer:
    return train_tokenizer(code_texts, vocab_size=600)


@pytest.fixture()
def tiny_cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, n_layer=3, n_head=2, d_model=32, seq_len=16,
                       mem_layer=1, knn_k=4)


@pytest.fixture(scope="session")
def tiny_weights(tok, tmp_path_factory) -> Path:
    """A real weights directory holding a tiny random model: what server tests start with."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=3, n_head=2, d_model=32, seq_len=128,
                      mem_layer=1, knn_k=4)
    return save_weights(MemorizingTransformer(cfg), tok, tmp_path_factory.mktemp("weights") / "tiny",
                        dtype="float32")


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

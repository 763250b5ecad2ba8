"""Training end to end at the tiny preset: corpus -> tokens -> train -> weights -> resume,
and the single-command GPU job run on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtlsp_model.cli import main as cli
from mtlsp_model.weights import load_weights

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A site-packages-like root made of real Python packages: this project's own sources."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "model", root / "modelpkg", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copytree(REPO / "tests", root / "testpkg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "benchmarks", root / "benchpkg")
    out = tmp_path_factory.mktemp("corpus")
    cli(["corpus", str(out), "--root", str(root), "--vocab-size", "700"])
    return root, out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_train_tiny_then_resume(corpus, tmp_path):
    _, data = corpus
    manifest = json.loads((data / "manifest.json").read_text())
    assert {d["name"] for d in manifest["documents"]} == {"modelpkg", "testpkg", "benchpkg"}
    run = tmp_path / "run"
    cli(["train", "--data", str(data), "--out", str(run), "--preset", "tiny"])
    log = read_log(run)
    assert log[-1]["event"] == "done" and log[-1]["steps"] == 6
    assert any(r.get("event") == "memory_on" for r in log)  # the memory phase was reached
    loaded = load_weights(run / "weights")
    assert loaded.config.vocab_size == 700
    card = json.loads((run / "weights" / "config.json").read_text())["training"]
    assert card["tokens_seen"] > 0 and card["hardware"].startswith("CPU")
    assert json.loads((run / "weights" / "corpus_manifest.json").read_text()) == manifest

    cli(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "9"])
    log = read_log(run)
    start = [r for r in log if r.get("event") == "start"][-1]
    assert start["resumed"] and start["step"] == 6
    assert log[-1]["steps"] == 9


def test_gpu_job_script_runs_at_tiny_size_on_cpu(corpus, tmp_path):
    root, data = corpus
    evalrepo = tmp_path / "heldout"
    (evalrepo / "src" / "heldout").mkdir(parents=True)
    (evalrepo / "src" / "heldout" / "__init__.py").write_text("def held():\n    return 42\n" * 20)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(REPO / "model" / "gpu_job.sh"), str(out), "--preset", "tiny", "--root", str(root),
         "--tokenizer", str(data / "tokenizer.json"), "--eval-repo", str(evalrepo),
         "--eval-files", f"{evalrepo}:src/heldout/*.py", "--scratch", str(tmp_path / "scratch")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())
    assert set(results["repositories"][0]["by_memory"]) == {"0", "8192", "65536", "all"}
    assert results["files"][0]["bits_per_byte"] > 0
    assert (out / "job.log").stat().st_size > 0
    assert all(f.stat().st_size <= 16 << 20 for f in out.rglob("*") if f.is_file())
    load_weights(out / "weights")


def test_eval_refuses_a_trained_on_repository(corpus, tmp_path):
    _, data = corpus
    run = tmp_path / "run"
    cli(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "2"])
    repo = tmp_path / "modelpkg"
    (repo / "modelpkg").mkdir(parents=True)
    (repo / "modelpkg" / "__init__.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="refusing to evaluate"):
        cli(["eval", "--weights", str(run / "weights"), "--repo", str(repo)])


def test_cli_reports_bad_weights_without_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "mtlsp_model", "demo", "--weights", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "config.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr

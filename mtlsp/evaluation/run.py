"""One repository, end to end: memory, bits per token, call sites, baselines, new functions.

The memory is built the way the language server builds it (``Indexer.refresh`` into the
repository's ``MemoryStore``, same scan rules, chunks and cap), in a store of its own so that an
evaluation never touches the memory a running server uses.  A second run on an unchanged
checkout reuses that store and encodes nothing.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mtlsp_model.corpus import refuse_trained_on

from ..complete import prompt
from ..complete.candidates import ModuleNames, Sources
from ..complete.completer import Completer, Recall
from ..complete.retrieval import StoreMemory
from ..complete.static import Jedi
from ..index.indexer import Indexer, Report
from ..index.indexer import Progress as IndexProgress  # this module's Progress is a callback
from ..index.scan import ScanOptions, read_text, walk
from ..lsp.settings import Settings
from ..store.files import default_cache_root
from ..store.memory_store import MemoryStore
from ..workspace import Engine
from . import bits, callsites, fresh, metrics
from .bm25 import BM25, query_before
from .sites import Site, cut, find_sites, sample

TYPED = (0, 1, 2)
CONDITIONS = ("memory", "memory_only", "none", "bm25")
_SERVER = Settings()
STUFFING_SIZES = (0, 128, 256, 384, 512)


@dataclass
class Options:
    limit: int | None = 200  # call sites, sampled by seed (None: all)
    seed: int = 0
    files: int | None = None  # files scored for bits per token (None: every Python file)
    curve_files: int = 8  # files scored at each memory size of the curve
    curve_sizes: tuple[int, ...] = (4_096, 16_384, 65_536, 262_144)
    fresh: int = 10  # new-function trials
    memory_cap: int = _SERVER.memory_cap  # the server's defaults: what a user gets
    store_root: Path | None = None  # evaluation stores live in <this>/eval (default: the cache root)
    max_tokens: int = _SERVER.max_tokens
    jedi: bool = True
    bm25: bool = True


# (stage, done, total): drives the progress bars
Progress = Callable[[str, int, int], None]


def repository_texts(root: Path, scan: ScanOptions) -> dict[str, str]:
    """The text of every file the indexer would read."""
    texts = {}
    for f in walk(root, scan):
        got = read_text(root, f.path, scan.max_bytes)
        if got is not None:
            texts[f.path] = got[1]
    return texts


def _sample_files(paths: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or n >= len(paths):
        return paths
    return sorted(random.Random(seed).sample(paths, n))


def _calibrate_stuffing(engine: Engine, completer: Completer, memory: StoreMemory, index: BM25, sites: list[Site],
                        texts: dict[str, str], max_tokens: int) -> dict:
    """The largest stuffing budget whose prompt reads no slower without memory than the plain
    prompt reads with memory (medians over a few sites): the equal-latency budget."""
    dec, tok = engine.decoder, engine.loaded.tokenizer
    probes = sites[:6]

    def timed(ids: list[int], mem) -> float:
        t0 = time.perf_counter()
        dec.prefill(ids, mem)
        return (time.perf_counter() - t0) * 1000

    prompts = []
    for s in probes:
        text, cursor = cut(texts[s.path], s, 0)
        p = prompt.build(tok, s.path, text, cursor, prefix_tokens=completer.prefix_tokens)
        prompts.append((s, p))
    with_memory = []
    for s, p in prompts:
        memory.hide = (s.path,)
        with_memory.append(timed(p.ids, memory))
    budget_ms = statistics.median(with_memory) if with_memory else 0.0
    chosen, measured = 0, {}
    room = dec.window - max_tokens - 8
    for size in STUFFING_SIZES:
        times = []
        for s, p in prompts:
            pre = index.preamble(tok, query_before(texts[s.path], s.offset), s.path, size)
            if len(pre) + len(p.ids) > room:
                continue
            times.append(timed(pre + p.ids, None))
        if not times:
            break
        measured[size] = statistics.median(times)
        if measured[size] <= budget_ms:
            chosen = size
    return {"tokens": chosen, "memory_prefill_ms": budget_ms, "stuffed_prefill_ms": measured}


@dataclass
class Prepared:
    """A repository ready to complete in, as every condition of an evaluation reads it."""

    texts: dict[str, str]  # every file the indexer would read
    store: MemoryStore
    indexer: Indexer
    report: Report  # what bringing the memory up to date took
    memory: StoreMemory  # the store as the model reads it (``hide`` the file being completed)
    lines: callsites.LineIndex  # lines of ``texts``, for provenance
    recall: Recall  # the server's view: memory and candidate names (jedi's too where asked)
    without: Recall  # the same candidate names without the memory


def prepare(engine: Engine, root: Path, texts: dict[str, str] | None = None, *,
            cap_tokens: int = _SERVER.memory_cap, store_root: Path | None = None, jedi: bool = True,
            progress: Callable[[IndexProgress], None] | None = None) -> Prepared:
    """The repository's memory, built the way the server builds it (``Indexer.refresh``, same
    scan rules, chunks and cap) but in a store of its own (``<store_root>/eval``, by default under
    the cache root) so that an evaluation never touches a running server's; brought up to date,
    its index ready; and the views the conditions compare.  ``texts``: ``repository_texts``,
    where the caller has read them."""
    scan = ScanOptions()
    texts = repository_texts(root, scan) if texts is None else texts
    store, indexer = engine.open_memory(root, cap_tokens=cap_tokens, scan=scan, ann_background=False,
                                        cache_root=(store_root or default_cache_root()) / "eval")
    report = indexer.refresh(progress)
    store.wait_for_index()
    names = Sources(lambda: [n for ns in store.names().values() for n in ns],
                    Jedi(root).names_at if jedi else None, ModuleNames(texts.get, indexer.gained))
    memory, lines = StoreMemory(store), callsites.LineIndex(texts)
    return Prepared(texts, store, indexer, report, memory, lines, Recall(memory, lines, names),
                    Recall(None, lines, names))


def evaluate(root: Path, engine: Engine, options: Options, manifest: dict, progress: Progress) -> dict:
    root = root.resolve()
    refuse_trained_on(root, manifest)
    torch.manual_seed(options.seed)
    t_start = time.perf_counter()
    texts = repository_texts(root, ScanOptions())
    py = sorted(p for p in texts if p.endswith(".py"))
    if not py:
        raise ValueError(f"{root} holds no Python files to evaluate")
    tok = engine.loaded.tokenizer
    model = engine.loaded.model

    ready = prepare(engine, root, texts, cap_tokens=options.memory_cap, store_root=options.store_root,
                    jedi=options.jedi, progress=lambda p: progress("index", p.files_done, p.files_total))
    store, indexer, memory, lines = ready.store, ready.indexer, ready.memory, ready.lines
    recall, without = ready.recall, ready.without
    stored = store.files()
    memory_tokens = sum(f.tokens for f in stored.values())

    # 1. bits per token, leave one file out
    bpt_files = _sample_files(py, options.files, options.seed)

    def tick(stage: str, total: int) -> Callable[[], None]:
        done = itertools.count(1)
        return lambda: progress(stage, next(done), total)

    with torch.no_grad():
        loo = bits.leave_one_out(model, tok, store, texts, bpt_files, tick("bits", len(bpt_files)))
        curve_files = _sample_files([p for p in py if p in stored], options.curve_files, options.seed + 1)
        curve = bits.memory_curve(model, tok, store, texts, curve_files, options.curve_sizes, options.seed,
                                  tick("curve", len(curve_files) * (len(options.curve_sizes) + 2)))

    # 2. cross-file call sites, with memory, without, with BM25 stuffing; and jedi
    all_sites = find_sites({p: texts[p] for p in py})
    sites = sample(all_sites, options.limit, options.seed)
    completer = engine.completer(_SERVER.context_tokens)
    conditions = [callsites.Condition("memory", recall), callsites.Condition("memory_only", recall, names=False),
                  callsites.Condition("none", without)]
    stuffing_info = None
    if options.bm25 and sites:
        index = BM25(texts)
        stuffing_info = _calibrate_stuffing(engine, completer, memory, index, sites, texts, options.max_tokens)
        stuffed = {
            callsites.site_key(s): index.preamble(tok, query_before(texts[s.path], s.offset), s.path,
                                                  stuffing_info["tokens"])
            for s in sites
        }
        conditions.append(callsites.Condition("bm25", without, stuffing=stuffed))
    judge = Jedi(root) if options.jedi else None
    rows = []
    for i, s in enumerate(sites):
        memory.hide = (s.path,)
        row = {"site": asdict(s), "attempts": [], "jedi": []}
        for c in conditions:
            row["attempts"] += [asdict(a) for a in callsites.complete_site(
                completer, s, texts[s.path], c, TYPED, options.max_tokens)]
        if judge is not None:
            for typed in TYPED:
                if typed >= len(s.name):
                    continue
                text, _ = cut(texts[s.path], s, typed)
                names, ms, error = judge.complete(s.path, text, s.line, s.column + typed)
                row["jedi"].append({"typed": typed, "candidates": names[:20], "ms": ms, "error": error,
                                    "reciprocal_rank": metrics.reciprocal_rank(s.name, names)})
        rows.append(row)
        progress("sites", i + 1, len(sites))
    memory.hide = ()

    # 3. newly defined functions
    trials = []
    plans = fresh.plan_trials(texts, set(stored), options.fresh, options.seed)
    for i, (module, caller, name, body) in enumerate(plans):
        trials.append(asdict(fresh.run_trial(completer, indexer, recall, without, lines, texts, module, caller, name,
                                             body, TYPED, options.max_tokens)))
        progress("fresh", i + 1, len(plans))

    bpt = bits.summarize(loo)
    return {
        "repository": root.name,
        "path": str(root),
        "memory": {
            "files": len(stored), "tokens": memory_tokens, "cap": options.memory_cap,
            "evicted_files": len(store.evicted()), "tokens_encoded": ready.report.tokens_encoded,
            "index_seconds": ready.report.seconds, "backend": store.stats().get("backend"),
        },
        "bits": bpt,
        "memory_curve": curve,
        "sites": {"found": len(all_sites), "evaluated": len(sites), "rows": rows},
        "stuffing": stuffing_info,
        "fresh": trials,
        "summary": summarize(rows, trials, bpt),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "seconds": time.perf_counter() - t_start,
    }


def _rate(values: list[bool | float]) -> float | None:
    return metrics.mean([float(v) for v in values])


def summarize(rows: list[dict], trials: list[dict], bpt: dict) -> dict:
    """The report's numbers: per condition and typed count, latencies, baselines, targets."""
    lines: dict[str, dict[int, dict]] = {}
    for cond in CONDITIONS:
        for typed in TYPED:
            got = [a for r in rows for a in r["attempts"] if a["condition"] == cond and a["typed"] == typed]
            if not got:
                continue
            lines.setdefault(cond, {})[typed] = {
                "n": len(got),
                "exact_match": _rate([a["exact"] for a in got]),
                "edit_similarity": _rate([a["similarity"] for a in got]),
                "identifier_match": _rate([a["identifiers"] for a in got]),
                "name_hit": _rate([a["name_hit"] for a in got]),
                "popup_top1": _rate([a["reciprocal_rank"] == 1.0 for a in got]),
                "popup_mrr": _rate([a["reciprocal_rank"] for a in got]),
                "definition_read": _rate([a["definition_read"] for a in got]),
            }
    jedi: dict[int, dict] = {}
    for typed in TYPED:
        got = [j for r in rows for j in r["jedi"] if j["typed"] == typed]
        if got:
            jedi[typed] = {
                "n": len(got),
                "top1": _rate([j["reciprocal_rank"] == 1.0 for j in got]),
                "mrr": _rate([j["reciprocal_rank"] for j in got]),
                "errors": sum(1 for j in got if j["error"]),
                "ms_p50": metrics.percentile([j["ms"] for j in got], 50),
            }
    latency = {}
    for cond in CONDITIONS:
        got = [a for r in rows for a in r["attempts"] if a["condition"] == cond]
        if not got:
            continue
        first = [a for a in got if a["typed"] == 0]
        later = [a for a in got if a["typed"] > 0]
        latency[cond] = {
            "inline_p50": metrics.percentile([a["inline_ms"] for a in got], 50),
            "inline_p95": metrics.percentile([a["inline_ms"] for a in got], 95),
            "inline_first_p50": metrics.percentile([a["inline_ms"] for a in first], 50),
            "inline_keystroke_p50": metrics.percentile([a["inline_ms"] for a in later], 50),
            "popup_p50": metrics.percentile([a["popup_ms"] for a in got], 50),
            "popup_p95": metrics.percentile([a["popup_ms"] for a in got], 95),
        }
    fresh_rates: dict[str, dict[int, float | None]] = {"memory": {}, "memory_only": {}, "none": {}}
    ghost_rates: dict[int, float | None] = {}
    retrieved: dict[int, float | None] = {}
    for typed in TYPED:
        for cond, key in (("memory", "hits"), ("memory_only", "spelled_hits"), ("none", "plain_hits")):
            got = [t[key][typed] for t in trials if typed in t[key]]
            fresh_rates[cond][typed] = _rate([g["popup_top1"] for g in got])
        ghost_rates[typed] = _rate([t["hits"][typed]["inline"] for t in trials if typed in t["hits"]])
        retrieved[typed] = _rate([t["hits"][typed]["retrieved"] for t in trials if typed in t["hits"]])
    first_ms = [t["first_correct_ms"] for t in trials if t["first_correct_ms"] is not None]
    warm_ms = [t["first_correct_warm_ms"] for t in trials if t.get("first_correct_warm_ms") is not None]
    summary = {
        "lines": lines,
        "jedi": jedi,
        "latency": latency,
        "fresh": {
            "trials": len(trials),
            "hit_rate": fresh_rates,  # popup top-1
            "ghost_rate": ghost_rates,  # ghost text starts with the new name
            "definition_retrieved": retrieved,
            "first_correct_ms_p50": metrics.percentile(first_ms, 50),
            "first_correct_ms_p95": metrics.percentile(first_ms, 95),
            "first_correct_trials": len(first_ms),
            "first_correct_warm_ms_p50": metrics.percentile(warm_ms, 50),
            "first_correct_warm_ms_p95": metrics.percentile(warm_ms, 95),
            "first_correct_warm_trials": len(warm_ms),
            "update_ms_p50": metrics.percentile([t["update_ms"] for t in trials], 50),
        },
        "bits": {k: v for k, v in bpt.items() if k != "per_file"},
    }
    summary["targets"] = targets(summary)
    return summary


def targets(s: dict) -> list[dict]:
    """The completion targets of the issue: met or not, and the margin."""
    out = []
    lines = s["lines"]
    mem0 = lines.get("memory", {}).get(0, {}).get("identifier_match")
    none0 = lines.get("none", {}).get(0, {}).get("identifier_match")
    bm0 = lines.get("bm25", {}).get(0, {}).get("identifier_match")
    if mem0 is not None and none0 is not None:
        out.append({"target": "identifier EM of ghost text at 0 typed: memory at least 2x no memory"
                              + (", and at least BM25 stuffing at equal latency" if bm0 is not None else ""),
                    "measured": f"{mem0:.1%} with memory, {none0:.1%} without"
                                + (f", {bm0:.1%} BM25" if bm0 is not None else ""),
                    "met": mem0 > 0 and mem0 >= 2 * none0 and (bm0 is None or mem0 >= bm0)})
    for typed, floor in ((1, 0.40), (2, 0.55)):
        ours = lines.get("memory", {}).get(typed, {}).get("popup_top1")
        theirs = s["jedi"].get(typed, {}).get("top1")
        if ours is not None and theirs is not None:
            out.append({"target": f"popup top-1 at {typed} typed: beats jedi, at least {floor:.0%}",
                        "measured": f"{ours:.1%} vs jedi {theirs:.1%}", "met": ours > theirs and ours >= floor})
    f = s["fresh"]
    for typed, what in ((1, "popup top-1"), (2, "ghost text")):
        rate = f["hit_rate"]["memory"].get(typed) if typed == 1 else f["ghost_rate"].get(typed)
        if rate is not None:
            out.append({"target": f"new-function trials: {what} hit at {typed} typed, at least 90%",
                        "measured": f"{rate:.0%} of {f['trials']}", "met": rate >= 0.9})
    for clock, key in (("the caller read afresh", "first_correct"), ("the caller's line read before", "first_correct_warm")):
        if f.get(f"{key}_ms_p95") is not None:
            out.append({"target": f"new-function trials: edit to first correct completion p95 at most 1 s ({clock})",
                        "measured": f"p95 {f[f'{key}_ms_p95']:.0f} ms over {f[f'{key}_trials']} trials "
                                    f"that hit, of {f['trials']}",
                        "met": f[f"{key}_ms_p95"] <= 1000 and f[f"{key}_trials"] == f["trials"]})
    r, c = s["bits"]["reduction"], s["bits"].get("cross_reduction")
    if r is not None:
        out.append({"target": "bits per token with memory: at least 12% lower on all tokens, 30% on cross-file "
                              "identifier tokens",
                    "measured": f"{r:.1%} lower ({s['bits']['bits_per_token_memory']:.3f} vs "
                                f"{s['bits']['bits_per_token_plain']:.3f}); cross-file identifiers "
                                f"{c:.1%} lower" if c is not None else f"{r:.1%} lower",
                    "met": r >= 0.12 and (c is None or c >= 0.3)})
    return out

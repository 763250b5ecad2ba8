"""Results → ``eval.json`` (every site), ``summary.json``, ``eval.md`` (tables) and two PNG plots.

The raw ``eval.json`` stays in the run's folder; ``summary.json`` drops the per-site and per-file
rows, so a report that is committed is small enough to read.

The Markdown report puts our numbers next to CrossCodeEval's published Python numbers for small
models, so a reader can place them.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

from .run import TYPED  # noqa: E402

CROSSCODEEVAL = (
    "CrossCodeEval (Ding et al., 2023), Python, identifier exact match: CodeGen-350M 7.92 in-file "
    "→ 13.70 with BM25 retrieval; StarCoderBase-1B 6.79 → 15.91."
)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def write(results: list[dict], out: Path, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "eval.json",
        "summary": out / "summary.json",
        "markdown": out / "eval.md",
        "curve": out / "bits_vs_memory.png",
        "typed": out / "hit_rate_vs_typed.png",
    }
    paths["json"].write_text(json.dumps({"meta": meta, "repositories": results}, indent=1, default=str) + "\n")
    paths["summary"].write_text(json.dumps({"meta": meta, "repositories": [summary(r) for r in results]},
                                           indent=1, default=str) + "\n")
    done = [r for r in results if "error" not in r]
    plot_curve(done, paths["curve"])
    plot_typed(done, paths["typed"])
    paths["markdown"].write_text(markdown(results, meta, paths))
    return paths


def summary(result: dict) -> dict:
    """One repository's result without its per-site, per-file and per-trial rows."""
    out = {k: v for k, v in result.items() if k not in ("fresh",)}
    if "bits" in out:
        out["bits"] = {k: v for k, v in out["bits"].items() if k != "per_file"}
    if "sites" in out:
        out["sites"] = {k: v for k, v in out["sites"].items() if k != "rows"}
    return out


def plot_curve(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        pts = r["memory_curve"]
        xs = [max(p["memory_tokens"], 1) for p in pts]
        ax.plot(xs, [p["bits_per_token"] for p in pts], marker="o", label=r["repository"])
    ax.set_xscale("log")
    ax.set_xlabel("tokens in memory (1 = no memory)")
    ax.set_ylabel("bits per token")
    ax.set_title("Bits per token against memory size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_typed(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for r in results:
        s = r["summary"]
        name = r["repository"]
        for cond, style in (("memory", "-o"), ("memory_only", "-.d"), ("none", "--s"), ("bm25", ":^")):
            row = s["lines"].get(cond)
            if row:
                xs = [t for t in TYPED if t in row]
                axes[0].plot(xs, [row[t]["popup_top1"] for t in xs], style, label=f"{name} {cond}")
        if s["jedi"]:
            xs = [t for t in TYPED if t in s["jedi"]]
            axes[0].plot(xs, [s["jedi"][t]["top1"] for t in xs], "-.x", label=f"{name} jedi")
        for cond, style in (("memory", "-o"), ("memory_only", ":^"), ("none", "--s")):
            rates = s["fresh"]["hit_rate"].get(cond, {})
            xs = [t for t in TYPED if rates.get(t) is not None]
            axes[1].plot(xs, [rates.get(t) for t in xs], style, label=f"{name} {cond}")
    axes[0].set_title("Cross-file call sites: right name first")
    axes[1].set_title("Newly defined functions: hit rate")
    for ax in axes:
        ax.set_xlabel("typed characters of the name")
        ax.set_xticks(list(TYPED))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: list[dict], meta: dict, paths: dict[str, Path]) -> str:
    out = ["# mtlsp evaluation", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", f"![bits per token against memory size]({paths['curve'].name})",
            f"![hit rate against typed characters]({paths['typed'].name})", ""]
    for r in results:
        if "error" in r:
            out += [f"## {r['repository']}", "", f"Not evaluated: {r['error']}", ""]
            continue
        s, m = r["summary"], r["memory"]
        out += [f"## {r['repository']}", "",
                f"Memory: {m['tokens']:,} tokens from {m['files']} files (cap {m['cap']:,}, "
                f"{m['evicted_files']} files evicted), {m['backend']}; "
                f"{m['tokens_encoded']:,} tokens encoded in {m['index_seconds']:.0f} s. "
                f"Whole evaluation: {r['seconds'] / 60:.1f} min.", ""]
        b = s["bits"]
        out += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in s["targets"]]
        out += ["", "### Bits per token (each file with the rest of the repository in memory)", "",
                "| tokens | files | count | no memory | memory | reduction |", "|---|---|---|---|---|---|",
                f"| all | {b['files']} | {b['tokens']:,} | {b['bits_per_token_plain']:.3f} | "
                f"{b['bits_per_token_memory']:.3f} | {_pct(b['reduction'])}% |",
                f"| cross-file identifiers | {b['files']} | {b['cross_tokens']:,} | {b['cross_bits_per_token_plain']:.3f} | "
                f"{b['cross_bits_per_token_memory']:.3f} | {_pct(b['cross_reduction'])}% |", ""]
        out += ["Memory-size curve: " + ", ".join(
            f"{p['memory_tokens']:,} → {p['bits_per_token']:.3f}" for p in r["memory_curve"]), ""]
        st = r["stuffing"]
        out += [f"### Cross-file call sites ({r['sites']['evaluated']} of {r['sites']['found']} found)", ""]
        if st:
            out += [f"BM25 stuffing budget at equal latency: {st['tokens']} tokens (prefill with memory "
                    f"{_ms(st['memory_prefill_ms'])} ms; stuffed prefills without memory: "
                    + ", ".join(f"{k} tokens {_ms(v)} ms" for k, v in st["stuffed_prefill_ms"].items()) + ").", ""]
        out += ["Line completion (ghost text) and popup, percent:", "",
                "| condition | typed | EM | ES | identifier EM | name first | popup top-1 | popup MRR | definition read |",
                "|---|---|---|---|---|---|---|---|---|"]
        for cond, rows in s["lines"].items():
            for typed in TYPED:
                v = rows.get(typed)
                if v:
                    out.append(f"| {cond} | {typed} | {_pct(v['exact_match'])} | {_pct(v['edit_similarity'])} | "
                               f"{_pct(v['identifier_match'])} | {_pct(v['name_hit'])} | {_pct(v['popup_top1'])} | "
                               f"{_pct(v['popup_mrr'])} | {_pct(v['definition_read'])} |")
        for typed in TYPED:
            v = s["jedi"].get(typed)
            if v:
                out.append(f"| jedi | {typed} | | | | | {_pct(v['top1'])} | {_pct(v['mrr'])} | |")
        out += ["", "*Definition read*: a file defining the callee is among the five files and lines whose "
                "memory entries the ghost text attended to most: the retrieval found it, whatever the model "
                "then wrote.", "", CROSSCODEEVAL, ""]
        if s["jedi"]:
            out += ["jedi: " + "; ".join(
                f"{t} typed: {s['jedi'].get(t)['errors']} errors, p50 {_ms(s['jedi'].get(t)['ms_p50'])} ms"
                for t in TYPED if s["jedi"].get(t)), ""]
        out += ["### Latency (ms, this machine)", "",
                "| condition | inline p50 | inline p95 | first at a site p50 | next keystroke p50 | popup p50 | popup p95 |",
                "|---|---|---|---|---|---|---|"]
        for cond, v in s["latency"].items():
            out.append(f"| {cond} | {_ms(v['inline_p50'])} | {_ms(v['inline_p95'])} | {_ms(v['inline_first_p50'])} | "
                       f"{_ms(v['inline_keystroke_p50'])} | {_ms(v['popup_p50'])} | {_ms(v['popup_p95'])} |")
        f = s["fresh"]
        out += ["", f"### Newly defined functions ({f['trials']} trials)", "",
                "| condition | " + " | ".join(f"{t} typed" for t in TYPED) + " |", "|---|---|---|---|"]
        for cond in ("memory", "memory_only", "none"):
            rates = f["hit_rate"].get(cond, {})
            out.append(f"| {cond}: popup top-1 | " + " | ".join(_pct(rates.get(t)) for t in TYPED) + " |")
        out.append("| memory: ghost text starts with the name | "
                   + " | ".join(_pct(f["ghost_rate"].get(t)) for t in TYPED) + " |")
        out.append("| memory: new lines among the top support | "
                   + " | ".join(_pct(f["definition_retrieved"].get(t)) for t in TYPED) + " |")
        out += ["", "Conditions: *memory* is the server (memory and candidate names ranked by the model); "
                "*memory_only* the same memory with the candidate ranking off (the model spells names itself); "
                "*none* the same candidate names, no memory; *bm25* no memory, BM25 chunks stuffed in the "
                "prompt.", ""]
        out += ["", f"Edit → first correct completion, the caller read afresh at `alias.`: p50 "
                f"{_ms(f['first_correct_ms_p50'])} ms, p95 {_ms(f['first_correct_ms_p95'])} ms over the "
                f"{f['first_correct_trials']} trials that hit; the caller's line read before the edit (as while "
                f"typing in it): p50 {_ms(f.get('first_correct_warm_ms_p50'))} ms, p95 "
                f"{_ms(f.get('first_correct_warm_ms_p95'))} ms over {f.get('first_correct_warm_trials', 0)}; "
                f"writing the edit into the memory: p50 {_ms(f['update_ms_p50'])} ms.", ""]
    return "\n".join(out) + "\n"

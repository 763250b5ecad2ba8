"""MODEL_CARD.md for a weights directory, written from what training and evaluation recorded.

Everything in the card comes from files next to the weights (``config.json``: base, memory
heads, training history; ``corpus_manifest.json``) and from ``python -m mtlsp_model eval``
results files, so the card cannot drift from the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .weights import CONFIG


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def _eval_rows(label: str, results: dict) -> list[str]:
    rows = []
    for r in results.get("repositories", []):
        for part, name, count in (("all", "all", r["tokens"]), ("cross", "cross-file identifiers", r["cross_tokens"])):
            b = r[part]["bits_per_token"]
            change = r[part].get("change_vs_none", {})

            def cell(cond: str) -> str:
                return f"{b[cond]:.3f} ({_pct(change.get(cond))})" if cond in b else "—"

            gap = r[part].get("gap_closed")
            rows.append(f"| {label} | {r['repository']} | {name} | {count:,} | {b['none']:.3f} | {cell('memory')} | "
                        f"{cell('control')} | {cell('stuffed')} | {'—' if gap is None else f'{100 * gap:.0f}%'} |")
    return rows


def write_model_card(weights: Path, evaluations: dict[str, Path], notes: str = "") -> Path:
    """Write ``weights/MODEL_CARD.md``; ``evaluations``: label (e.g. "trained") -> eval JSON."""
    weights = Path(weights)
    config = json.loads((weights / CONFIG).read_text())
    manifest_path = weights / "corpus_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    base, mem, training = config["base"], config["memory"], config.get("training") or {}
    heads = ", ".join(f"L{layer}H{h}" for layer, h in mem["memory_heads"])
    lines = [
        "# mtlsp memory heads for SmolLM2-135M-Instruct", "",
        f"- **Base** (fetched, not shipped): `{base.get('package')}=={base.get('version')}` "
        f"(wheel SHA-256 `{base.get('wheel_sha256')}`), `{base.get('source')}`, converted fingerprint "
        f"`{base['fingerprint']}`. 30 layers, width 576, 9 query and 3 key/value heads of 64, vocabulary 49,152.",
        f"- **Memory heads**: {heads}; top-{mem['knn_k']} per head; retrieved entries read at a distance of "
        f"{mem['mem_distance']}; rank-{mem['adapter_rank']} query adapters"
        + (f", rank-{mem['value_rank']} adapters on the values read" if mem.get("value_rank") else "")
        + ("; a kNN copy gate that reads the position's hidden state" if mem.get("copy_context") else "") + ".",
        "- **Shipped here**: the memory heads' parameters only (`memory.safetensors`).",
    ]
    runs = []  # the runs these parameters went through, oldest first (a warm start records its origin)
    while training:
        runs.insert(0, training)
        training = (training.get("warm_start") or {}).get("training") or {}
    for n, run in enumerate(runs, 1):
        hist = run.get("history", [])
        last = hist[-1] if hist else {}
        cfg = run.get("config", {})
        lines += [
            f"- **Training{f' ({n} of {len(runs)})' if len(runs) > 1 else ''}**: {run.get('recipe')}, "
            f"{last.get('step', 0)} steps of {cfg.get('accumulate')} windows of {cfg.get('window')} tokens, "
            f"learning rate {cfg.get('lr')}, {last.get('seconds', 0) / 60:.0f} min on {run.get('hardware')}"
            + (f"; held-out NLL (whole projects kept out) {hist[0]['nll']:.4f} → {last.get('nll', 0):.4f} "
               "nats/token." if hist else "."),
        ]
    docs = manifest.get("documents", [])
    if docs:
        lines.append(f"- **Training corpus**: {len(docs)} site-packages documents "
                     f"({sum(d['bytes'] for d in docs) / 1e6:.0f} MB); excluded by rule: "
                     f"{', '.join(manifest.get('exclude_list', []))} (found and left out: "
                     f"{', '.join(manifest.get('excluded', [])) or 'none'}). Full list in `corpus_manifest.json`.")
    lines += ["", "## Bits per token, leaving one file out", "",
              "Each scored file is read in 512-token windows behind its file header, with the rest of its "
              "repository in memory (its own entries hidden), and without. *control*: an unrelated "
              "repository's memory instead. *stuffed*: no memory; each window read after the most related "
              "chunks of other files (up to 1,024 tokens). *gap closed*: (none − memory) / (none − stuffed).", "",
              "| weights | repository | tokens | count | none | memory | control | stuffed | gap closed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, path in evaluations.items():
        lines += _eval_rows(label, json.loads(Path(path).read_text()))
    lines += ["", notes.strip(), ""]
    out = weights / "MODEL_CARD.md"
    out.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return out

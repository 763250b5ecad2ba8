"""MODEL_CARD.md for a weights directory, written from what training and evaluation recorded.

Everything in the card comes from files next to the weights (``config.json``'s training summary,
``corpus_manifest.json``) and from an evaluation results file, so the card cannot drift from
the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from .model import ModelConfig
from .weights import CONFIG


def _eval_table(results: dict) -> list[str]:
    lines = []
    repos = results.get("repositories", [])
    if repos:
        sizes = list(repos[0]["by_memory"])
        head = " | ".join(f"memory {s}" for s in sizes)
        lines += [
            "Bits per token (bits per byte in brackets); each repository's Python files streamed as"
            " one document in 512-token segments with the XL cache; memory = the most recent N tokens"
            " of that document (`all` = everything before the segment).",
            "",
            f"| repository | tokens scored | {head} | change at `all` |",
            "|---|---|" + "---|" * len(sizes) + "---|",
        ]
        for r in repos:
            rows = r["by_memory"]
            cells = " | ".join(f"{rows[s]['bits_per_token']:.3f} ({rows[s]['bits_per_byte']:.3f})" for s in sizes)
            change = ""
            if "0" in rows and "all" in rows:
                change = f"{100 * (rows['all']['bits_per_token'] / rows['0']['bits_per_token'] - 1):+.1f}%"
            name = Path(r["repository"]).name
            lines.append(f"| {name} | {rows[sizes[0]]['tokens']:,} | {cells} | {change} |")
        lines.append("")
    for f in results.get("files", []):
        lines.append(
            f"- `{Path(f['repo']).name}/{f['glob']}` ({f['files']} files, each alone behind its path header, "
            f"512-token windows, stride 256, memory off): **{f['bits_per_byte']:.3f} bits per byte** "
            f"({f['bits_per_token']:.3f} bits per token)."
        )
    return lines


def write_model_card(weights: Path, results: dict, *, title: str, notes: str = "") -> Path:
    weights = Path(weights)
    config = json.loads((weights / CONFIG).read_text())
    training = config.get("training", {})
    manifest = json.loads((weights / "corpus_manifest.json").read_text())
    totals = manifest["totals"]
    cfg = ModelConfig.from_dict(config["model"])
    size = sum(f.stat().st_size for f in weights.glob("model-*.safetensors"))
    rates = training.get("tokens_per_s", {})
    val = training.get("val", {})
    kv = cfg.mem_kv_heads
    lines = [
        f"# {title}",
        "",
        notes.strip(),
        "",
        "## Model",
        "",
        f"- Memorizing transformer, {training.get('params', 0) / 1e6:.2f}M parameters: {cfg.n_layer} layers, "
        f"width {cfg.d_model}, {cfg.n_head} heads, {cfg.vocab_size:,}-token byte-level BPE, segments of "
        f"{cfg.seq_len} tokens, Transformer-XL cache of the previous segment "
        f"({'on' if cfg.xl_cache else 'off'}).",
        f"- kNN memory layer: block {cfg.memory_layer + 1}"
        f" of {cfg.n_layer}, top-{cfg.knn_k} retrieval, {'one shared key/value head' if kv == 1 else f'{kv} key/value heads'}: "
        f"{cfg.bytes_per_memory_token} bytes per memorised token in fp16.",
        f"- Weights: {config['dtype']} safetensors, {size / 1e6:.1f} MB.",
        "",
        "## Training",
        "",
        f"- Corpus: {totals['documents']} repository-documents ({totals['files']:,} files, "
        f"{totals['bytes'] / 1e6:.0f} MB, {totals['tokens'] / 1e6:.1f}M tokens; "
        f"{totals['train_tokens'] / 1e6:.1f}M in the training split) from {', '.join(manifest['roots'])}.",
        f"- Evaluation repositories found in the roots and excluded: {', '.join(manifest['excluded']) or 'none'}. "
        "Full list of what was included: `corpus_manifest.json`.",
        f"- Tokens seen: {training.get('tokens_seen', 0):,} in {training.get('steps', 0):,} steps; "
        f"wall time {training.get('wall_time_s', 0) / 60:.1f} min of training steps on {training.get('hardware', '?')}.",
        f"- Throughput: {rates.get('off')} tokens/s with the memory off, {rates.get('on')} tokens/s with it on"
        " (the memory is switched on for the last part of training).",
        f"- Held-out validation documents at the end: {val.get('val_bits_nomem')} bits per token without memory, "
        f"{val.get('val_bits_mem')} with it.",
        "",
        "## Evaluation",
        "",
        *_eval_table(results),
        "",
    ]
    out = weights / "MODEL_CARD.md"
    out.write_text("\n".join(lines))
    return out

"""What a cheaper prompt read costs in completions: shorter prompt windows, and int8 products.

The first request at a new place reads the whole prompt (384 tokens by default) before any
name is ranked, and on a 2-core CPU that read is most of the wait (``docs/benchmarks.md``).
There are two ways to read less: a shorter window (fewer tokens), or int8 products instead
of float32 (``runtime.quantize_encoding``, the products the encoder may use, applied here to
the prompt, the tries of names and the decoding passes of more than a few tokens).  This
script measures both where users see them, at ``mtlsp eval``'s call sites (same sample, the
calling file hidden from the memory, the server's condition *memory*):

- ghost text at 0 typed: how long the first request takes, whether it starts with the
  callee's name, identifier exact match of the line;
- the popup at 0 and 1 typed: top-1.

Every variant completes every site, in turns that rotate from site to site, so that the
VM's slow and fast phases fall on all of them alike.

    python benchmarks/prompt_cost.py --repo /work/evalrepos/flask --cache-dir /work/runs/evalcache \\
        --out /tmp/prompt_cost.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass

from mtlsp_model.runtime import encoding, quantize_encoding
from repository import open_repository, parser, provenance

from mtlsp.complete.completer import Completer
from mtlsp.evaluation import metrics
from mtlsp.evaluation.sites import cut, find_sites, sample
from mtlsp.lsp.settings import Settings

TYPED = (0, 1)


@dataclass(frozen=True)
class Variant:
    window: int
    int8: bool

    @property
    def name(self) -> str:
        return f"{self.window} tokens, {'int8' if self.int8 else 'float32'}"

    def products(self) -> contextlib.AbstractContextManager:
        """The products this variant reads with: ``encoding()`` switches many-row products to
        int8 on this thread (jedi's thread computes nothing of the model)."""
        return encoding() if self.int8 else contextlib.nullcontext()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sites", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="mtlsp eval's default: the same sites")
    ap.add_argument("--windows", default="384,256,192", help="float32 variants' prompt windows")
    ap.add_argument("--int8", type=int, default=384, help="the int8 variant's window (0: none)")
    a = ap.parse_args()
    server = Settings()
    engine, ready = open_repository(a)
    texts = ready.texts
    variants = [Variant(int(w), False) for w in a.windows.split(",")]
    if a.int8:
        quantize_encoding(engine.loaded.model, engine.loaded.tokenizer, engine.loaded.info.get("base_folder"))
        variants.append(Variant(a.int8, True))
    completers = {v: Completer(engine.decoder, prefix_tokens=v.window) for v in variants}
    py = sorted(p for p in texts if p.endswith(".py"))
    sites = sample(find_sites({p: texts[p] for p in py}), a.sites, a.seed)
    rows: dict[Variant, list[dict]] = {v: [] for v in variants}
    for i, s in enumerate(sites):
        ready.memory.hide = (s.path,)
        for v in variants[i % len(variants):] + variants[: i % len(variants)]:
            completer, uri, row = completers[v], f"bench://{v.name}/{i}", {}
            with v.products():
                for typed in TYPED:
                    if typed >= len(s.name):
                        continue
                    text, cursor = cut(texts[s.path], s, typed)
                    ghost = completer.inline(uri, s.path, text, cursor, ready.recall, max_tokens=server.max_tokens)
                    line = s.name[:typed] + ghost.text.split("\n", 1)[0]
                    t0 = time.perf_counter()
                    _, items = completer.popup(uri, s.path, text, cursor, ready.recall)
                    row[typed] = {"ghost_ms": ghost.ms, "popup_ms": (time.perf_counter() - t0) * 1000,
                                  "identifiers": metrics.identifier_match(line, s.target),
                                  "name_first": metrics.first_name(line) == s.name,
                                  "popup_top1": bool(items) and items[0].word == s.name}
            completer.forget(uri)
            rows[v].append(row)
        print(f"site {i + 1}/{len(sites)}", flush=True)
    ready.memory.hide = ()

    def share(got: list[dict], typed: int, key: str) -> float:
        at = [r[typed][key] for r in got if typed in r]
        return 100 * sum(at) / len(at)

    result = {"repository": a.repo.name, "sites": len(sites), "seed": a.seed, **provenance(), "variants": {}}
    for v, got in rows.items():
        first = [r[0]["ghost_ms"] for r in got if 0 in r]
        result["variants"][v.name] = {
            "first_ghost_ms_p50": statistics.median(first), "first_ghost_ms_p95": metrics.percentile(first, 95),
            "ghost_identifier_em_0": share(got, 0, "identifiers"), "ghost_name_first_0": share(got, 0, "name_first"),
            **{f"popup_top1_{t}": share(got, t, "popup_top1") for t in TYPED},
        }
        print(v.name, json.dumps({k: round(x, 1) for k, x in result["variants"][v.name].items()}))
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

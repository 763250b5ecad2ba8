"""Ghost text at cross-file call sites with and without the memory, on more sites than ``mtlsp eval``.

``mtlsp eval`` scores 40 sites per repository under four conditions and three typed counts; at
that size one site is 2.5 points, so a gap of two sites between the memory and no memory says
little.  This script asks only for ghost text at 0 typed characters, under:

- ``none``: the server's candidate names, no memory (``mtlsp eval``'s *none*);
- ``memory``: the server (``mtlsp eval``'s *memory*);
- ``nocopy``: the memory with the kNN copy switched off (``Decoder(copy=False)``), to see
  whether copying tokens from the memory is what changes the line;
- ``greedy``: the memory, with plain greedy decoding: no call closed early where that whole
  line is likelier (``Completer(closings=0)``, ``Completer._closed_early``).

Sites are sampled with their own seed, so they are not ``mtlsp eval``'s 40.  The memory is the
evaluation store ``mtlsp eval --cache-dir DIR`` builds (built here if missing), the calling
file hidden as there.

    python benchmarks/ghost_memory.py --repo /work/evalrepos/flask --sites 160 \\
        --cache-dir /work/runs/evalcache --out /tmp/ghost_memory.json
"""

from __future__ import annotations

import json
import statistics

from repository import open_repository, parser, provenance

from mtlsp.complete.completer import Completer
from mtlsp.complete.decode import Decoder
from mtlsp.evaluation import metrics
from mtlsp.evaluation.sites import cut, find_sites, sample
from mtlsp.lsp.settings import Settings

VARIANTS = ("none", "memory", "nocopy", "greedy")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sites", type=int, default=160)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    root = a.repo.resolve()
    server = Settings()
    engine, ready = open_repository(a)
    texts, memory = ready.texts, ready.memory
    py = sorted(p for p in texts if p.endswith(".py"))
    plain = engine.completer(server.context_tokens)
    nocopy = Completer(Decoder(engine.loaded.model, engine.loaded.tokenizer, copy=False),
                       prefix_tokens=server.context_tokens)
    greedy = Completer(engine.decoder, prefix_tokens=server.context_tokens, closings=0)
    runs = {"none": (plain, ready.without), "memory": (plain, ready.recall), "nocopy": (nocopy, ready.recall),
            "greedy": (greedy, ready.recall)}
    sites = sample(find_sites({p: texts[p] for p in py}), a.sites, a.seed)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i, s in enumerate(sites):
        memory.hide = (s.path,)
        text, cursor = cut(texts[s.path], s, 0)
        for v in VARIANTS:
            completer, view = runs[v]
            uri = f"bench://{v}/{i}"
            got = completer.inline(uri, s.path, text, cursor, view, max_tokens=server.max_tokens)
            completer.forget(uri)
            line = got.text.split("\n", 1)[0]
            rows[v].append({"path": s.path, "target": s.target, "prediction": line,
                            "identifiers": metrics.identifier_match(line, s.target),
                            "name_first": metrics.first_name(line) == s.name,
                            "exact": metrics.exact_match(line, s.target), "ms": got.ms})
        print(f"{i + 1}/{len(sites)}", {v: sum(r["identifiers"] for r in rows[v]) for v in VARIANTS}, flush=True)
    summary = {v: {"identifier_em": 100 * statistics.mean(r["identifiers"] for r in rs),
                   "name_first": 100 * statistics.mean(r["name_first"] for r in rs),
                   "exact": 100 * statistics.mean(r["exact"] for r in rs),
                   "ms_p50": statistics.median(r["ms"] for r in rs)} for v, rs in rows.items()}
    differ = sum(rows["memory"][i]["prediction"] != rows["none"][i]["prediction"] for i in range(len(sites)))
    result = {"repo": str(root), "sites": len(sites), "seed": a.seed, "memory_tokens": ready.store.stats()["entries"],
              "lines_that_differ_memory_vs_none": differ, "summary": summary, "rows": rows,
              **provenance()}
    a.out.write_text(json.dumps(result, indent=1))
    for v, x in summary.items():
        print(f"{v}: identifier EM {x['identifier_em']:.1f}%, name first {x['name_first']:.1f}%, "
              f"EM {x['exact']:.1f}%, ghost text p50 {x['ms_p50']:.0f} ms")
    print(f"lines that differ, memory vs none: {differ} of {len(sites)}")


if __name__ == "__main__":
    main()

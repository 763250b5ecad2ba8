"""Popup top-1 at cross-file call sites with and without the static-analysis prior (``rank.Prior``).

The popup ranks names that exist; a name jedi does not list at the cursor loses ``--unbound``
nats (the server's ``Completer.unbound``).  This script asks for the popup at 0, 1 and 2 typed
characters of the callee at each site, once without the prior (0 nats) and once with it, the
two completers sharing one model and one memory, next to jedi's own order.  Sites, memory and
candidate names are ``mtlsp eval``'s (``run.prepare``, the calling file hidden), sampled with
this script's seed.

    python benchmarks/popup_prior.py --repo /work/evalrepos/flask --sites 60 \\
        --cache-dir /work/runs/evalcache --out /tmp/popup_prior.json
"""

from __future__ import annotations

import json
import time

from repository import open_repository, parser, provenance

from mtlsp.complete.static import Jedi
from mtlsp.evaluation import metrics
from mtlsp.evaluation.run import TYPED
from mtlsp.evaluation.sites import cut, find_sites, sample
from mtlsp.lsp.settings import Settings


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sites", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unbound", type=float, default=4.0, help="the prior's nats (0 is the other variant)")
    a = ap.parse_args()
    root = a.repo.resolve()
    engine, ready = open_repository(a)
    texts = ready.texts
    context_tokens = Settings().context_tokens
    variants = {"without": engine.completer(context_tokens), "with": engine.completer(context_tokens)}
    variants["without"].unbound, variants["with"].unbound = 0.0, a.unbound
    judge = Jedi(root)
    sites = sample(find_sites({p: t for p, t in texts.items() if p.endswith(".py")}), a.sites, a.seed)
    rows = []
    for i, s in enumerate(sites):
        ready.memory.hide = (s.path,)
        row = {"path": s.path, "line": s.line, "name": s.name}
        for typed in TYPED:
            if typed >= len(s.name):
                continue
            text, cursor = cut(texts[s.path], s, typed)
            for v, completer in variants.items():
                t0 = time.perf_counter()
                _, items = completer.popup(f"bench://{v}/{i}", s.path, text, cursor, ready.recall)
                words = [c.word for c in items]
                row[f"{v}/{typed}"] = {"top": words[:3], "rr": metrics.reciprocal_rank(s.name, words),
                                       "ms": (time.perf_counter() - t0) * 1000}
            names = judge.complete(s.path, text, s.line, s.column + typed)[0]
            row[f"jedi/{typed}"] = {"top": names[:3], "rr": metrics.reciprocal_rank(s.name, names)}
        for v, completer in variants.items():
            completer.forget(f"bench://{v}/{i}")
        rows.append(row)
        print(i + 1, s.name, {k: round(v["rr"], 2) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    summary = {}
    for key in [f"{v}/{t}" for t in TYPED for v in (*variants, "jedi")]:
        got = [r[key] for r in rows if key in r]
        summary[key] = {"top1": 100 * sum(g["rr"] == 1.0 for g in got) / len(got), "n": len(got)}
        if key.split("/")[0] in variants:
            summary[key]["ms_p50"] = metrics.percentile([g["ms"] for g in got], 50)
    for t in TYPED:  # sites whose top-1 the prior made right / wrong
        pairs = [(r[f"without/{t}"]["rr"] == 1.0, r[f"with/{t}"]["rr"] == 1.0) for r in rows if f"with/{t}" in r]
        summary[f"changed/{t}"] = {"won": sum(w and not o for o, w in pairs), "lost": sum(o and not w for o, w in pairs)}
    a.out.write_text(json.dumps({
        "repo": str(root), "sites": len(sites), "seed": a.seed, "unbound": a.unbound, "summary": summary, "rows": rows,
        **provenance(),
    }, indent=1))
    for key, v in summary.items():
        print(key, v)


if __name__ == "__main__":
    main()

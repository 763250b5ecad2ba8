"""Edit → first correct completion of a function typed a moment ago: ``mtlsp eval``'s new-function
trials alone, with their two clocks, in a few minutes instead of a whole evaluation.

The trials are those ``mtlsp eval --fresh N --seed S`` runs (same plan, same code:
``mtlsp.evaluation.fresh``), on the evaluation store ``mtlsp eval --cache-dir DIR`` builds
(built here if missing).  Printed per trial and as medians / p95:

- ``update_ms``: writing the edited module into the memory;
- ``cold``: that plus the first request that named the function, the caller read afresh;
- ``warm``: the same with the caller's line read before the edit, as while typing in it.

``--no-kept-contexts`` encodes every edit after reading its file's context again (what the
encoder did before it kept them), for an A/B in one process.

    python benchmarks/new_function.py --repo /work/evalrepos/flask --trials 10 \\
        --cache-dir /work/runs/evalcache --out /tmp/new_function.json
"""

from __future__ import annotations

import json
from dataclasses import asdict

from repository import open_repository, parser, provenance

from mtlsp.evaluation import fresh, metrics
from mtlsp.evaluation.run import TYPED
from mtlsp.lsp.settings import Settings

CLOCKS = ("update_ms", "first_correct_ms", "first_correct_warm_ms")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="as mtlsp eval's --seed")
    ap.add_argument("--no-kept-contexts", action="store_true")
    a = ap.parse_args()
    root = a.repo.resolve()
    server = Settings()
    read_again = (lambda e: setattr(e.encoder, "kept_contexts", 0)) if a.no_kept_contexts else None
    engine, ready = open_repository(a, read_again)
    texts = ready.texts
    completer = engine.completer(server.context_tokens)
    # in ``mtlsp eval`` the trials follow the call sites: the first requests of a process (jedi's
    # imports, the first passes of each shape) are paid before them, as here
    warm = sorted(p for p in texts if p.endswith(".py"))[0]
    middle = len(texts[warm]) // 2
    completer.inline("bench://warm-up", warm, texts[warm], middle, ready.recall, max_tokens=server.max_tokens)
    completer.popup("bench://warm-up", warm, texts[warm], middle, ready.recall)
    completer.forget("bench://warm-up")
    trials = []
    for module, caller, name, body in fresh.plan_trials(texts, set(ready.store.files()), a.trials, a.seed):
        t = asdict(fresh.run_trial(completer, ready.indexer, ready.recall, ready.without, ready.lines, texts, module,
                                   caller, name, body, TYPED, server.max_tokens))
        trials.append(t)
        print(f"{module} -> {caller}: " + ", ".join(f"{k} {_ms(t[k])}" for k in CLOCKS), flush=True)
    summary = {}
    for k in CLOCKS:
        got = [t[k] for t in trials if t[k] is not None]
        summary[k] = {"p50": metrics.percentile(got, 50), "p95": metrics.percentile(got, 95), "n": len(got)}
        print(f"{k}: p50 {_ms(summary[k]['p50'])} ms, p95 {_ms(summary[k]['p95'])} ms, {len(got)} of {len(trials)}")
    a.out.write_text(json.dumps({
        "repo": str(root), "trials": trials, "summary": summary, "kept_contexts": engine.encoder.kept_contexts,
        **provenance(),
    }, indent=1))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


if __name__ == "__main__":
    main()

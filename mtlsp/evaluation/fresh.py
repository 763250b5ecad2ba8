"""Newly defined functions: can a completion use a function a moment after it was written?

A trial writes a function with a freshly made name, found nowhere in the repository, at the end
of one module, through ``Indexer.update_text`` (the path the server feeds unsaved buffers
through).  Another file then imports that module and starts a call: ``alias.`` with 0, 1 and 2
characters of the new name typed.  A hit is ghost text that starts with the name, or the name
at the top of the popup list.  While the trial runs the edited module is also the module's text
that candidate names are read from, as an open, unsaved buffer is in the server.  The clock
runs from the start of the update to the end of the first completion that hits (the server adds
its debounce, 250 ms by default, in front).  At one place the ghost text is asked first, then
the popup, and one decoding worker answers them in turn, so a hit of the popup alone is counted
at the end of both.

Two clocks, because the caller's prompt may or may not have been read before.  *Cold*: the
caller is read afresh at ``alias.``, as in a file opened just then.  *Warm*: the caller was read
before the edit at the line's start (``    return ``), as the server reads it at each keystroke
of a user typing there; a memory that changed since is read again only by the prompt's last
positions (``Decoder.prefill``).  Both count the edit's write into the memory, after the server
read the module's context when it was opened (``Indexer.prepare``).  The
same prompts without memory are the control: a name the model never saw cannot come from its
weights; the memory with the candidate names switched off (``memory_only``) shows what the
memory does alone.  With the candidate names (memory and control alike), the new name is one
the module gained a moment ago, so it leads after ``alias.`` (``Indexer.gained``).  The module is put back as it was after each trial.
"""

from __future__ import annotations

import keyword
import random
import time
from dataclasses import dataclass, field

from ..complete.completer import Completer, Recall
from ..index.indexer import Indexer
from . import metrics
from .callsites import LineIndex

_VERBS = ["reconcile", "tabulate", "coalesce", "summarize", "stitch", "harvest", "distill", "tally",
          "braid", "sift", "quench", "splice", "collate", "winnow", "marshal"]
_ADJECTIVES = ["quarterly", "dormant", "sparse", "nested", "stale", "orphaned", "pending", "brittle",
               "tidal", "amber", "lunar", "woven", "hollow", "crimson"]
_NOUNS = ["ledgers", "manifests", "tallies", "bundles", "cohorts", "fragments", "receipts", "lanterns",
          "harbors", "ribbons", "parcels", "glyphs", "orchards", "beacons"]

_BODIES = [
    '''def {name}(records, key="id"):
    """Group ``records`` by ``key``, keeping the order they came in."""
    grouped = {{}}
    for record in records:
        grouped.setdefault(record[key], []).append(record)
    return grouped
''',
    '''def {name}(values, threshold=0.5):
    """How many of ``values`` lie above ``threshold``."""
    return sum(1 for value in values if value > threshold)
''',
    '''def {name}(text, width=80):
    """Split ``text`` into lines of at most ``width`` characters, at spaces."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{{line}} {{word}}" if line else word
    return lines + [line] if line else lines
''',
]


def fresh_name(rng: random.Random, corpus: str) -> str:
    """A three-word snake_case name that occurs nowhere in ``corpus``."""
    while True:
        name = f"{rng.choice(_VERBS)}_{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}"
        if name not in corpus:
            return name


def module_name(path: str) -> str | None:
    """The dotted import name of a repository file (src layout understood), None if it has none."""
    if not path.endswith(".py"):
        return None
    parts = path[:-3].split("/")
    if parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return None
    return ".".join(parts)


@dataclass
class Trial:
    name: str
    defined_in: str
    called_from: str
    update_ms: float  # encoding the edited module into the memory
    hits: dict[int, dict] = field(default_factory=dict)  # typed -> {inline, popup_top1, reciprocal_rank, retrieved}
    plain_hits: dict[int, dict] = field(default_factory=dict)  # the same without memory
    spelled_hits: dict[int, dict] = field(default_factory=dict)  # memory, no candidate names
    # storing the edit plus the latency of the first request, in typing order, that hit (None: no hit)
    first_correct_ms: float | None = None  # the caller read afresh at ``alias.`` (cold)
    first_correct_warm_ms: float | None = None  # the caller's line read before the edit (warm)


def caller_text(text: str, module: str, alias: str, typed: str) -> str:
    return f"{text.rstrip()}\n\n\nimport {module} as {alias}\n\n\ndef _check_new_helper():\n    return {alias}.{typed}"


def _score(completer: Completer, uri: str, path: str, text: str, recall: Recall | None, name: str,
           max_tokens: int, new_lines: tuple[str, int], names: bool) -> dict:
    """Hits of ghost text and popup; ``retrieved``: the new function's lines (file, first line)
    are among the ghost text's top memory support, whatever the model then wrote."""
    t0 = time.perf_counter()
    inline = completer.inline(uri, path, text, len(text), recall, max_tokens=max_tokens, names=names)
    t1 = time.perf_counter()
    typed_part = text[text.rfind(".") + 1 :]
    _, items = completer.popup(uri, path, text, len(text), recall, names=names)
    t2 = time.perf_counter()
    words = [c.word for c in items]
    return {
        "inline": metrics.first_name(typed_part + inline.text) == name,
        "popup_top1": bool(words) and words[0] == name,
        "reciprocal_rank": metrics.reciprocal_rank(name, words),
        "retrieved": any(sp.path == new_lines[0] and sp.line >= new_lines[1] for sp in inline.support),
        "inline_ms": (t1 - t0) * 1000,
        "popup_ms": (t2 - t1) * 1000,
    }


def run_trial(
    completer: Completer,
    indexer: Indexer,
    recall: Recall,
    control: Recall | None,  # the same candidate names, no memory
    lines: LineIndex,  # recall's line_of: follows the edit, for the provenance check
    texts: dict[str, str],
    defined_in: str,
    called_from: str,
    name: str,
    body: str,
    typed_counts: tuple[int, ...],
    max_tokens: int,
) -> Trial:
    module = module_name(defined_in)
    assert module is not None
    alias = module.rsplit(".", 1)[-1]
    original = texts[defined_in]
    edited = f"{original.rstrip()}\n\n\n{body.format(name=name)}"
    new_lines = (defined_in, original.rstrip().count("\n") + 4)
    indexer.prepare(defined_in, original)  # the module open in the editor, as the server reads it
    warm_uri = f"eval://fresh-warm/{called_from}"
    line_start = caller_text(texts[called_from], module, alias, "")[: -len(alias) - 1]
    completer.inline(warm_uri, called_from, line_start, len(line_start), recall, max_tokens=max_tokens)
    t0 = time.perf_counter()
    try:
        indexer.update_text(defined_in, edited)
        lines.set(defined_in, edited)
        texts[defined_in] = edited
        trial = Trial(name, defined_in, called_from, (time.perf_counter() - t0) * 1000)
        for typed in typed_counts:  # the warm clock first: the request right after the edit
            got = _score(completer, warm_uri, called_from, caller_text(texts[called_from], module, alias, name[:typed]),
                         recall, name, max_tokens, new_lines, True)
            if got["inline"] or got["popup_top1"]:
                trial.first_correct_warm_ms = trial.update_ms + got["inline_ms"] + (
                    0.0 if got["inline"] else got["popup_ms"])
                break
        completer.forget(warm_uri)
        conditions = (("memory", recall, True, trial.hits), ("memory_only", recall, False, trial.spelled_hits),
                      ("none", control, True, trial.plain_hits))
        for condition, rec, names, into in conditions:
            uri = f"eval://fresh-{condition}/{called_from}"
            for typed in typed_counts:
                text = caller_text(texts[called_from], module, alias, name[:typed])
                got = _score(completer, uri, called_from, text, rec, name, max_tokens, new_lines, names)
                into[typed] = got
                if condition == "memory" and trial.first_correct_ms is None and (got["inline"] or got["popup_top1"]):
                    # the wait a user sees: the edit stored, then the request that answered right
                    # (earlier requests, at fewer typed characters, ran while the user typed on)
                    answer = got["inline_ms"] + (0.0 if got["inline"] else got["popup_ms"])
                    trial.first_correct_ms = trial.update_ms + answer
            completer.forget(uri)
    finally:
        texts[defined_in] = original
        indexer.update_text(defined_in, original)
        lines.set(defined_in, original)
    return trial


def plan_trials(texts: dict[str, str], stored: set[str], count: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``count`` (module, caller, name, body) choices, reproducible by ``seed``."""
    rng = random.Random(seed)
    modules = sorted(p for p in texts if p in stored and module_name(p) is not None)
    callers = sorted(p for p in texts if p.endswith(".py"))
    if not modules or len(callers) < 2:
        return []
    corpus = "\n".join(texts.values())
    plans, used = [], set()
    for _ in range(count):
        module = rng.choice(modules)
        caller = rng.choice([c for c in callers if c != module])
        name = fresh_name(rng, corpus)
        while name in used:
            name = fresh_name(rng, corpus)
        used.add(name)
        plans.append((module, caller, name, rng.choice(_BODIES)))
    return plans

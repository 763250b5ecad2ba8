"""Scores of one completion against the true line, and of a ranked candidate list.

Line completion follows CrossCodeEval: exact match of the whitespace-stripped line, edit
similarity, and identifier exact match (the sequence of identifiers in the completion equals
the target's).  Identifiers are counted as CrossCodeEval's ``extract_identifiers`` counts them:
string literals and comments removed first, so a guessed URL or message does not decide the
match; Python's keywords left out, except ``True`` and ``False``, which it counts.  Edit
similarity here is ``1 - Levenshtein / max(len)``, the CodeXGLUE/RepoBench form;
CrossCodeEval's ``fuzz.ratio`` is an Indel ratio and reads a little higher on the same pairs.
Popup lists (ours and jedi's) are scored by top-1 and mean reciprocal rank of the right name.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Sequence

import numpy as np

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'""")  # closed literals; an unclosed one stays code
_KEYWORDS = frozenset(keyword.kwlist) - {"True", "False"}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def edit_similarity(prediction: str, target: str) -> float:
    p, t = prediction.strip(), target.strip()
    if not p and not t:
        return 1.0
    return 1.0 - levenshtein(p, t) / max(len(p), len(t))


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def identifiers(code: str) -> list[str]:
    """Identifiers in order of appearance, outside string literals and comments (see above)."""
    code = "\n".join(line.split("#", 1)[0] for line in _STRING.sub("", code).split("\n"))
    return [w for w in _IDENT.findall(code) if w not in _KEYWORDS]


def identifier_match(prediction: str, target: str) -> bool:
    return identifiers(prediction) == identifiers(target)


def first_name(prediction: str) -> str:
    """The identifier the completion starts with ('' if it starts with anything else)."""
    m = _IDENT.match(prediction.strip())
    return m.group(0) if m else ""


def reciprocal_rank(name: str, candidates: Sequence[str]) -> float:
    """1/rank of ``name`` among ``candidates`` (0 when absent)."""
    for i, c in enumerate(candidates, 1):
        if c == name:
            return 1.0 / i
    return 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None

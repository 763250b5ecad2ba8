"""Python's static analysis: jedi, the engine of jedi-language-server.

Jedi resolves the imports of the file inside the workspace (its project path, plus ``src/`` for
src-layout repositories) and lists the names valid at the cursor, filtered by the typed
characters.  mtlsp uses that list twice: as popup candidates for the model to rank
(``candidates.py``), and as the baseline ``mtlsp eval`` compares the popup against.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import jedi

from .prompt import word_before


class Jedi:
    def __init__(self, root: Path) -> None:
        extra = [str(root / "src")] if (root / "src").is_dir() else []
        self.root = root
        self.project = jedi.Project(root, added_sys_path=extra)
        # (path, text before the word, text after the cursor) -> (when asked, names)
        self._answers: OrderedDict[tuple[str, str, str], tuple[float, list[str]]] = OrderedDict()

    def names_at(self, path: str, text: str, cursor: int, keep_s: float = 10.0) -> list[str]:
        """Names valid where the word at character ``cursor`` of ``text`` starts, whatever its
        typed part (the caller filters).  jedi is asked once per place and the answer is kept
        for ``keep_s`` seconds, so ghost text, the popup and the keystrokes of one word share
        it (a first question in a file costs jedi up to a second).  The time limit matters
        because jedi also reads other files, which may change while this one does not.
        The list is empty where jedi cannot tell."""
        line_start = text.rfind("\n", 0, cursor) + 1
        start = cursor - len(word_before(text[line_start:cursor]))
        key = (path, text[:start], text[cursor:])
        got = self._answers.get(key)
        now = time.monotonic()
        if got is None or now - got[0] > keep_s:
            got = (now, self.complete(path, key[1] + key[2], text.count("\n", 0, start), start - line_start)[0])
            self._answers[key] = got
            while len(self._answers) > 16:
                self._answers.popitem(last=False)
        self._answers.move_to_end(key)
        return got[1]

    def complete(self, path: str, text: str, line: int, column: int) -> tuple[list[str], float, str | None]:
        """Names jedi offers at 0-based ``line``/``column``, its time in ms, and its error if any."""
        t0 = time.perf_counter()
        try:
            script = jedi.Script(code=text, path=self.root / path, project=self.project)
            names = [c.name for c in script.complete(line + 1, column)]
            error = None
        except Exception as e:  # jedi raises on code it cannot infer; the site then scores 0
            names, error = [], f"{type(e).__name__}: {e}"
        return names, (time.perf_counter() - t0) * 1000, error

"""The static-analysis baseline: jedi, the engine of jedi-language-server, on the same sites.

Jedi resolves the imports of the calling file inside the repository (its project path, plus
``src/`` for src-layout repositories) and lists the names valid at the cursor, filtered by the
typed characters.  Its list is scored exactly like mtlsp's popup list.
"""

from __future__ import annotations

import time
from pathlib import Path

import jedi


class Jedi:
    def __init__(self, root: Path) -> None:
        extra = [str(root / "src")] if (root / "src").is_dir() else []
        self.root = root
        self.project = jedi.Project(root, added_sys_path=extra)

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

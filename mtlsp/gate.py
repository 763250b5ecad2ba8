"""Taking turns at the model: completions, which a user is waiting for, before memory writes.

The server runs the model from two kinds of threads: the completion worker, and the threads
that write the memory (the first indexing pass, and the debounced writes of edited buffers).
On a CPU both at once is worse than either after the other: each brings its own team of compute
threads, and the two teams fight over the cores.  Measured with ``benchmarks/server.py`` on 2
cores, the writes made the first popup at a site 2.1x slower (845 vs 397 ms p50) and the slowest
keystrokes 1.6-1.9x slower.  So the writes run only while no completion is running or waiting,
and pause between two blocks of the model (``pause``) as soon as one arrives: a completion waits
for at most one block of a write, not for the whole write.  Editors ask in bursts (ghost text
and popup for one keystroke, then the next keystroke), so a write resumes only after completions
have been quiet for ``grace`` seconds; a write that has waited ``patience`` seconds for such a
lull takes the next gap between two completions instead, so that typing without a pause does not
keep a function just written out of the memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ModelGate:
    def __init__(self, grace: float = 0.2, patience: float = 1.0) -> None:
        self.grace = grace
        self.patience = patience
        self._cond = threading.Condition()
        self._completions = 0  # running or waiting
        self._writing = False  # a write is computing (not paused)
        self._quiet_since = 0.0  # when the last completion ended (monotonic)

    @contextmanager
    def completion(self) -> Iterator[None]:
        """Hold the model for a completion: waits only for a write to reach its next pause."""
        with self._cond:
            self._completions += 1
            while self._writing:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._completions -= 1
                self._quiet_since = time.monotonic()
                self._cond.notify_all()

    @contextmanager
    def write(self, grace: float | None = None, patience: float | None = None) -> Iterator[Callable[[], None]]:
        """Hold the model for a memory write, one write at a time; yields ``pause``, which the
        write calls between two pieces of work to let waiting completions go first.
        ``grace``/``patience``: other than the gate's, for work that cannot pause (a garbage
        collection, ``process.py``) and so should wait for a longer lull."""
        grace = self.grace if grace is None else grace
        patience = self.patience if patience is None else patience
        self._claim(grace, patience)
        try:
            yield self._pause
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _claim(self, grace: float, patience: float) -> None:
        with self._cond:
            start = time.monotonic()
            while True:
                if self._completions or self._writing:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if now - start >= patience:
                    break
                quiet = now - self._quiet_since
                if quiet >= grace:
                    break
                self._cond.wait(min(grace - quiet, patience - (now - start)))
            self._writing = True

    def _pause(self) -> None:
        with self._cond:
            if not self._completions:
                return
            self._writing = False
            self._cond.notify_all()
        self._claim(self.grace, self.patience)

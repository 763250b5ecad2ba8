"""Process-wide tuning for the long-running commands (``mtlsp serve``, ``mtlsp index``).

It lives apart from the code that motivates it (encoding, completion latency) because it
changes the whole process: only a command's entry point should call it, never a library module
on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable

from .gate import ModelGate


def bound_heap_retention(threshold: int = 2 << 20, arenas: int = 1) -> bool:
    """Make glibc return large freed blocks to the system at once (``M_MMAP_THRESHOLD``), and
    keep every thread's smaller blocks in ``arenas`` heaps (``M_ARENA_MAX``).

    Why the threshold: encoding allocates activations of ever-changing shapes; glibc's adaptive
    threshold then serves them from the heap and keeps the freed memory.  Measured while
    encoding 450k tokens of pydantic on the dev machine: peak RSS 943 MB by default, 474 MB
    with a fixed 2 MB threshold (427 MB at 256 KB, but 1.9x slower).

    Why one arena: the server's model runs on a worker thread and jedi on another, and glibc
    gives such threads heaps of their own, which keep what they free.  ``benchmarks/server.py``
    with a 1M-token memory, 30 sites (2026-12-03): RSS at the end 2,924 MiB with glibc's
    default (8 arenas per core), 2,808 with 2, 2,457 with 1; latencies no worse.  The model's
    work holds the interpreter lock or runs in torch's own threads, so threads rarely wait on
    one heap.

    Process-wide and best set before threads start, so the long-running commands (``mtlsp
    index``, the server) call it first; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
        return bool(libc.mallopt(-8, arenas)) and ok  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class IdleCollector:
    """Python's full garbage collections, run when completions are quiet, not in the middle of one.

    Why: the interpreter starts a full (oldest-generation) collection at whatever allocation
    crosses its threshold, and in the server that is often inside jedi or the candidate ranking.
    Its cost grows with every object alive, and jedi keeps hundreds of thousands (parse trees
    of the files it has read).  Measured in a replay of ``benchmarks/server.py`` on flask: full
    collections of 249, 408 and 555 ms inside ghost-text requests.  So automatic full
    collections are turned off (the younger generations still collect as usual, in 1-50 ms),
    and a thread runs one once there is something to collect (as many younger collections as
    would have triggered it) and completions have been quiet for ``quiet`` seconds, holding the
    model gate as a write does (``gate_of()``: the current engine's gate, None while there is
    none).  During ``patience`` seconds of typing without such a pause it takes the next gap.
    """

    def __init__(self, gate_of: Callable[[], ModelGate | None], *, quiet: float = 1.0, patience: float = 60.0,
                 check_s: float = 1.0) -> None:
        self.gate_of, self.quiet, self.patience, self.check_s = gate_of, quiet, patience, check_s
        self.collections = 0
        self._saved = gc.get_threshold()
        self._stop = threading.Event()
        young, middle, self._oldest = self._saved
        gc.set_threshold(young, middle, 1 << 30)  # the oldest generation: only here
        self._thread = threading.Thread(target=self._run, name="mtlsp-gc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            if gc.get_count()[2] < self._oldest:
                continue
            gate = self.gate_of()
            if gate is None:
                gc.collect()
            else:
                with gate.write(grace=self.quiet, patience=self.patience):
                    gc.collect()
            self.collections += 1

    def stop(self) -> None:
        """Stop the thread and give the interpreter its own full collections back."""
        self._stop.set()
        self._thread.join()
        gc.set_threshold(*self._saved)

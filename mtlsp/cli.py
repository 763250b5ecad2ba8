"""The ``mtlsp`` command.

``mtlsp serve`` is the language server (stdio, or ``--tcp HOST:PORT``); ``mtlsp demo`` runs a
real LSP session against it on a sample workspace with the shipped weights; ``mtlsp index
PATH... [--watch | --status]`` builds and keeps fresh the persistent memory of workspace
folders; ``mtlsp eval REPO...`` measures completion with and without the memory on real
repositories, against jedi and BM25 retrieval; ``mtlsp model ...`` is the model package's own command line (corpus, train, eval).
"""

from __future__ import annotations

import sys

from mtlsp_model.cli import main as model_main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: mtlsp serve [--tcp HOST:PORT] | mtlsp demo | mtlsp index PATH... [--watch | --status]"
              " | mtlsp eval REPO... | mtlsp model COMMAND ...  (each takes --help)")
        return
    if argv[0] == "serve":
        from .serve_cli import main as serve_main

        serve_main(argv[1:])
    elif argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
    elif argv[0] == "index":
        from .index_cli import main as index_main

        index_main(argv[1:])
    elif argv[0] == "eval":
        from .eval_cli import main as eval_main

        eval_main(argv[1:])
    elif argv[0] == "model":
        model_main(argv[1:])
    else:
        sys.exit(f"mtlsp: unknown command {argv[0]!r} (try: mtlsp serve, mtlsp demo, mtlsp index --help, mtlsp eval --help, mtlsp model --help)")
